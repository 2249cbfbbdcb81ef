"""Plain helpers shared by the test modules; the fixtures built on them live in conftest.py.

Import them by name (``from helpers import cli``): pytest puts tests/ on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from sensitivity.estimators.partial_sums import intra_op_threads

T = TypeVar("T")

# The engine sums each batch's float32 outputs in float32 before adding them to float64 states
# (sensitivity/estimators/partial_sums.py). Against a float64 accumulation of the same outputs
# an index moves by float32 round-off, below the results files' own float32 resolution (two
# units in the last place of 1 are 1.2e-7), and an output moment by a few float32 ulps.
FLOAT32_SUMS = {"rtol": 1e-6, "atol": 1e-7}


# Runs the body with a given number of intra-op threads, then restores the previous count.
torch_threads = intra_op_threads


def fork_ranks(worker: Callable[..., None], world_size: int, *args: object) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` forked processes (they reuse
    this process's imports; spawn would import everything again, slowly), each inside a gloo
    process group on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(_in_process_group, args=(world_size, port, worker, args),
                                          nprocs=world_size, start_method="fork")


def _in_process_group(
    rank: int, world_size: int, port: int, worker: Callable[..., None], args: tuple
) -> None:
    """One forked rank of ``fork_ranks``: join the group, run the worker, leave the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def cli(*args: object, quiet: bool = False) -> int:
    """``analyze.main`` on ``args`` (made strings) in this process; its exit status.

    quiet: discard what it prints to stdout (stderr still reaches pytest); otherwise the
    output stays readable through ``capsys``.
    """
    import analyze  # here: modules that only need requires_cuda skip Lightning's import

    argv = [str(a) for a in args]
    if not quiet:
        return analyze.main(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        return analyze.main(argv)


def requires_cuda(test: T) -> T:
    """Mark ``test`` (a function or class) ``gpu`` and skip it, with a reason, where no CUDA
    device is present: ``pytest -m gpu`` selects every test that needs one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))



USER_AUGMENTATIONS = ("channel_swap", "posterize")  # what tests/user_augmentations.py registers


def forget_user_augmentations() -> None:
    """What a fresh process knows: no user registration, tests/user_augmentations.py not
    imported (importing it again registers its augmentations again)."""
    import sys

    from sensitivity.augmentations import AUGMENTATIONS, unregister_augmentation

    for name in USER_AUGMENTATIONS:
        if name in AUGMENTATIONS:
            unregister_augmentation(name)
    sys.modules.pop("user_augmentations", None)
