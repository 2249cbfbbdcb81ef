"""The device side of an analysis: a batch's images augmented, forwarded, their outputs captured.

``BatchForward`` takes a ``batches.Batch`` (CPU, possibly pinned) to the model's device, applies
each row's augmentations, runs the model under autocast (``precision``) in the chosen memory
format with the capture hooks active, and returns every row's captured outputs (copies of
deduplicated rows expanded); where ``augments_ahead`` says so, the next batch is augmented in a
background thread while the current one is forwarded and summed. ``channels_last_weights``
converts the model's weights for channels-last and back; ``Stopwatch`` charges the time to the
engine's phases (``run_analysis(timings=)``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from sensitivity.batches import Batch
from sensitivity.capture import ActivationCapture, model_device
from sensitivity.config import EngineConfig
from sensitivity.estimators.partial_sums import intra_op_threads
from sensitivity.plan import AnalysisPlan


class Stopwatch:
    """Adds the seconds since the previous mark to ``timings[phase]``; no-op without a dict.

    Args:
        timings: the caller's dict (``run_analysis``'s ``timings``), or None.
        device: a CUDA device is synchronised at every mark, charging each phase its kernels.
        start: ``time.perf_counter()`` at the start of the analysis.
    """

    def __init__(self, timings: dict[str, float] | None, device: torch.device, start: float):
        self.timings = timings
        self.sync = timings is not None and device.type == "cuda"
        self.device = device
        self.last = start

    def mark(self, phase: str) -> None:
        """Charge the seconds since the previous mark to ``phase``."""
        if self.timings is None:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` measured elsewhere (another thread) to ``timings[phase]``."""
        if self.timings is not None:
            self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def count(self, rows: int, forwarded: int) -> None:
        """Add a batch's rows and the rows actually forwarded."""
        if self.timings is not None:
            self.timings["rows"] = self.timings.get("rows", 0) + rows
            self.timings["forwarded"] = self.timings.get("forwarded", 0) + forwarded


class BatchForward:
    """The device side of a batch: its images augmented and forwarded, the outputs captured.

    Args:
        model: the analysed model, on ``device``.
        plan: the analysis plan (problem, batch_rows, precision, memory format).
        capture: the hooks, entered around the whole loop.
        device: the model's device.
        watch: the phases' timings.
    """

    def __init__(
        self, model: nn.Module, plan: AnalysisPlan, capture: ActivationCapture,
        device: torch.device, watch: Stopwatch,
    ) -> None:
        config = plan.config
        self.problem, self.capture = plan.problem, capture
        self.device, self.dtype, self.watch = device, model_device(model)[1], watch
        self.batch_rows = config.batch_rows
        self.autocast = torch.autocast(
            device.type,
            dtype=torch.float16 if config.precision == "16" else torch.bfloat16,
            enabled=config.precision != "32",
        )
        self.format = torch.channels_last if config.channels_last else torch.contiguous_format
        # The model or, with ``compile``, its compiled forward (set inside the loop's context).
        self.module: nn.Module = model
        self.expanded: dict[str, Tensor] = {}  # reused across batches (deduplicate)
        self.inputs: dict[str, Tensor] = {}  # the augmented images' buffers, likewise
        self.turn = 0
        # Augmenting ahead: starts the next batch's job (set by ``batches``), and that job.
        self._start_next: Callable[[], Future[tuple[Batch, list[Tensor]] | None]] | None = None
        self._next_job: Future[tuple[Batch, list[Tensor]] | None] | None = None

    def augment(self, batch: Batch, watch: Stopwatch | None) -> list[Tensor]:
        """The batch's images to forward, on the device and augmented, in chunks of at most
        ``batch_rows`` rows (a permutation-Shapley block can be larger than a batch).

        Each distinct augmented image (``Batch.distinct``) is made once; without deduplication
        the copies are then taken for the rows that repeat one.

        Args:
            batch: the batch (CPU, possibly pinned).
            watch: charged "data" and "augment"; None in the background thread (``ahead``).

        Returns:
            [(F_c, 3, H, W) in the model's dtype and memory format], the chunks in row order:
            of the distinct rows with deduplication, else of every row.
        """
        unique = batch.images.to(self.device, self.dtype, non_blocking=True)
        image_of, decoded = batch.distinct_images()
        image_of = image_of.to(self.device)
        if watch is not None:
            watch.mark("data")
        parts = []
        # One intra-op thread (EngineConfig.threads): many short kernels, whose parallel
        # regions stall under a competing load.
        with intra_op_threads(1):
            for first in range(0, len(image_of), self.batch_rows):
                rows = slice(first, first + self.batch_rows)
                parts.append(self.problem.augment(unique[image_of[rows]], decoded.select(rows)))
            images = parts[0] if len(parts) == 1 else torch.cat(parts)
            index = None
            if not batch.deduplicate and len(batch.distinct) < len(batch.copies):
                index = batch.copies.to(self.device)
            elif not images.is_contiguous(memory_format=self.format):
                index = torch.arange(len(images), device=self.device)
            if index is not None:
                # Two buffers in turn: with ``ahead`` the caller forwards one while the
                # background thread fills the other.
                self.turn = 1 - self.turn
                images = rows_into(self.inputs, f"images{self.turn}", images, index,
                                   self.format)
        if watch is not None:
            watch.mark("augment")
        return list(images.split(self.batch_rows))

    def run(self, batch: Batch, augmented: list[Tensor]) -> dict[str, Tensor]:
        """Forward ``augmented`` (``augment(batch)``) with the hooks: {layer: (R, *unit_shape)}
        for every row of ``batch`` (copies of deduplicated rows expanded)."""
        chunks = []
        for images in augmented:
            with self.autocast:
                self.module(images)
            chunks.append(self.capture.pop())
        self.watch.mark("forward")
        if self._start_next is not None:
            self._next_job, self._start_next = self._start_next(), None
        outputs = (
            chunks[0] if len(chunks) == 1
            else {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        )
        if batch.deduplicate:
            copies = batch.copies.to(self.device)
            outputs = {k: rows_into(self.expanded, k, v, copies) for k, v in outputs.items()}
        self.watch.count(len(batch.rows), sum(len(images) for images in augmented))
        return outputs

    def batches(self, loader: Iterable[Batch], ahead: bool) -> Iterator[tuple[Batch, list[Tensor]]]:
        """Each batch of ``loader`` with its augmented chunks (``augment``).

        Args:
            loader: the batches, in order.
            ahead: load and augment the next batch in a background thread while the caller
                forwards and sums this one (``EngineConfig.augment_ahead``). The images are the
                same; "augment" is then the time the caller waited for them, "augment_ahead"
                the seconds the thread spent (loading the batch and the copy to the device
                included).
        """
        if not ahead:
            for batch in loader:
                yield batch, self.augment(batch, self.watch)
            return
        batches = iter(loader)
        # The caller's CUDA stream (streams are per thread): the thread's kernels are queued
        # behind the forward that last read the buffer it fills.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        with ThreadPoolExecutor(1, thread_name_prefix="augment-ahead") as pool:

            def start() -> Future[tuple[Batch, list[Tensor]] | None]:
                return pool.submit(self._next_augmented, batches, stream)

            job = start()
            while (ready := self._waited(job)) is not None:
                # The next batch starts when this one's forward is done (``run``): alongside
                # the accumulation, not the forward, which shares the cores' cache with it
                # (a forward beside the thread ran 3-7% slower).
                self._start_next, self._next_job = start, None
                yield ready
                job = self._next_job or start()
                self._start_next = None

    def _next_augmented(
        self, batches: Iterator[Batch], stream: torch.cuda.Stream | None
    ) -> tuple[Batch, list[Tensor]] | None:
        """The next batch and its ``augment``, in the background thread (with its own inference
        mode and CUDA stream: they are per thread); None after the last."""
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.inference_mode(), torch.cuda.stream(stream):
            chunks = self.augment(batch, None)
        self.watch.add("augment_ahead", time.perf_counter() - started)
        return batch, chunks

    def _waited(
        self, job: Future[tuple[Batch, list[Tensor]] | None]
    ) -> tuple[Batch, list[Tensor]] | None:
        """The background thread's result; the wait is charged to "augment"."""
        ready = job.result()
        self.watch.mark("augment")
        return ready


def augments_ahead(config: EngineConfig, device: torch.device) -> bool:
    """Whether batches are augmented ahead (``BatchForward.batches``): ``config.augment_ahead``,
    or when it is None, on the CPU when the forward's intra-op threads (``config.threads``)
    leave one of this process's cores free for the background thread. Never when the
    forward may use every core: the thread would stall its parallel regions."""
    if config.augment_ahead is not None:
        return config.augment_ahead
    return (device.type == "cpu" and config.threads is not None
            and config.threads < len(os.sched_getaffinity(0)))


def rows_into(
    buffers: dict[str, Tensor], key: str, values: Tensor, index: Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """``values[index]``, written into a buffer kept in ``buffers[key]`` from batch to batch: a
    fresh outputs-sized tensor per batch costs page faults on CPU (hundreds of MB).

    Args:
        buffers: the kept buffers, by key; a buffer too small or of another kind is replaced.
        key: the layer, or which images.
        values: (F, *u) outputs of the forwarded rows, or images.
        index: (R,) int64 row -> index into ``values``, on ``values``' device.
        memory_format: the buffer's (channels_last for 4-D images in that format).

    Returns:
        (R, *u): a view of the buffer, valid until the next call with ``key``.
    """
    buffer = buffers.get(key)
    if (
        buffer is None
        or buffer.shape[0] < len(index)
        or buffer.shape[1:] != values.shape[1:]
        or buffer.dtype != values.dtype
        or buffer.device != values.device
        or not buffer.is_contiguous(memory_format=memory_format)
    ):
        buffer = buffers[key] = torch.empty(
            (len(index), *values.shape[1:]), dtype=values.dtype, device=values.device,
            memory_format=memory_format,
        )
    return torch.index_select(values, 0, index, out=buffer[: len(index)])


@contextlib.contextmanager
def channels_last_weights(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Inside: the model's 4-D parameters and buffers in channels-last format (when asked).

    The ones converted are made contiguous again on exit, also after an error: the model may
    go on training.

    Args:
        model: the analysed model.
        channels_last: False leaves the model as it is.
    """
    converted = []
    if channels_last:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.ndim == 4 and tensor.is_contiguous():
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
                converted.append(tensor)
    try:
        yield
    finally:
        for tensor in converted:
            tensor.data = tensor.data.contiguous()

