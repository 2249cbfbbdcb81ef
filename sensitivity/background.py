"""The analysis's background thread: work that runs beside the forward passes.

With ``EngineConfig.background`` (automatic: on the CPU when the process has more than one
core) one thread takes, in the order they are submitted, the loading and augmentation of the
next batch, the sums of each layer as the caller's forward makes its output, and each batch's
bookkeeping (``BatchForward.batches``, ``engine._forward_all``). Off, every job runs at once in
the caller's thread: the same code, the same order of the same floating-point operations, so
the results are identical either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from sensitivity.config import EngineConfig

T = TypeVar("T")


def uses_background(config: EngineConfig, device: torch.device) -> bool:
    """``config.background``, or when it is None, on the CPU when this process may run on more
    than one core, whatever ``config.threads`` says: beside a forward on 1 or on 2 threads it
    was the fastest setting on 2 cores, quiet and under a competing load (docs/PERFORMANCE.md,
    "Threads"). Not on CUDA, where it is unmeasured."""
    if config.background is not None:
        return config.background
    return device.type == "cpu" and len(os.sched_getaffinity(0)) > 1


class Background:
    """Jobs run one after the other by one background thread, or inline when disabled.

    A job runs in the inference mode its submitter was in and, on CUDA, on the stream that was
    current when the Background was made (both are per thread): its kernels are queued behind
    the forward that produced their inputs. ``close()`` (also on leaving a ``with``) drops the
    jobs not started and waits for the running one, so no thread outlives the analysis.

    Args:
        enabled: run the jobs in the thread (``uses_background``); else inline.
        device: the analysis's device.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="analysis-background") if enabled else None
        )
        self._stream = (
            torch.cuda.current_stream(device) if enabled and device.type == "cuda" else None
        )

    def submit(self, job: Callable[..., T], *args: object) -> Future[T]:
        """Queue ``job(*args)``; inline (disabled): run it now, its error raised here.

        Returns:
            Its future; ``result()`` re-raises an error of the job.
        """
        if self._pool is None:
            done: Future[T] = Future()
            done.set_result(job(*args))
            return done
        return self._pool.submit(self._run, torch.is_inference_mode_enabled(), job, *args)

    def _run(self, inference: bool, job: Callable[..., T], *args: object) -> T:
        with torch.inference_mode(inference), torch.cuda.stream(self._stream):
            return job(*args)

    def close(self) -> None:
        """Drop the queued jobs, wait for the running one."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
