"""The device side of an analysis: a batch's images augmented, forwarded, their outputs captured.

``BatchForward`` takes a ``batches.Batch`` (CPU, possibly pinned) to the model's device, applies
each row's augmentations, runs the model under autocast (``precision``) in the chosen memory
format with the capture hooks active, and returns the captured outputs of the rows it forwarded;
``expand`` gives them to every row (copies of deduplicated rows). With a background thread
(``sensitivity.background``) the next batch is loaded and augmented there while the current one
is forwarded. ``channels_last_weights`` converts the model's weights for channels-last and back;
``Stopwatch`` charges the time to the engine's phases (``run_analysis(timings=)``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import torch
from torch import Tensor, nn

from sensitivity.background import Background
from sensitivity.batches import Batch
from sensitivity.capture import ActivationCapture, model_device
from sensitivity.estimators.partial_sums import intra_op_threads
from sensitivity.plan import AnalysisPlan


class Stopwatch:
    """Adds the seconds since the previous mark to ``timings[phase]``; no-op without a dict.

    Args:
        timings: the caller's dict (``run_analysis``'s ``timings``), or None.
        device: a CUDA device is synchronised at every mark, charging each phase its kernels.
        start: ``time.perf_counter()`` at the start of the analysis.
        suffix: appended to every phase ("_background": the background thread's own seconds).
    """

    def __init__(
        self, timings: dict[str, float] | None, device: torch.device, start: float,
        suffix: str = "",
    ) -> None:
        self.timings = timings
        self.sync = timings is not None and device.type == "cuda"
        self.device = device
        self.last = start
        self.suffix = suffix

    def background(self) -> Stopwatch:
        """A stopwatch for a job of the background thread, started now: its phases are charged
        as "<phase>_background", beside the caller's."""
        return Stopwatch(self.timings, self.device, time.perf_counter(), "_background")

    def mark(self, phase: str) -> None:
        """Charge the seconds since the previous mark to ``phase``."""
        if self.timings is None:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        phase += self.suffix
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now

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

    def augment(self, batch: Batch, watch: Stopwatch) -> list[Tensor]:
        """The batch's images to forward, on the device and augmented, in chunks of at most
        ``batch_rows`` rows (a permutation-Shapley block can be larger than a batch).

        Each distinct augmented image (``Batch.distinct``) is made once; without deduplication
        the copies are then taken for the rows that repeat one.

        Args:
            batch: the batch (CPU, possibly pinned).
            watch: charged "data" and "augment" (in the background thread: its own).

        Returns:
            [(F_c, 3, H, W) in the model's dtype and memory format], the chunks in row order:
            of the distinct rows with deduplication, else of every row.
        """
        unique = batch.images.to(self.device, self.dtype, non_blocking=True)
        image_of, decoded = batch.distinct_images()
        image_of = image_of.to(self.device)
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
                # Two buffers in turn: the caller forwards one while the background thread
                # fills the other.
                self.turn = 1 - self.turn
                images = rows_into(self.inputs, f"images{self.turn}", images, index,
                                   self.format)
        watch.mark("augment")
        return list(images.split(self.batch_rows))

    def run(
        self, batch: Batch, augmented: list[Tensor],
        sink: Callable[[str, Tensor], None] | None = None,
    ) -> dict[str, Tensor] | None:
        """Forward ``augmented`` (``augment(batch)``) with the hooks: {layer: (F, *unit_shape)}
        for the F rows forwarded (``expand`` gives every row its own).

        Args:
            sink: hands each layer's output to ``sink(layer, output)`` as the forward makes
                it (``ActivationCapture.sink``), and None is returned; only for a batch
                forwarded in one chunk.
        """
        if sink is not None and len(augmented) != 1:
            raise ValueError(f"a sink takes a batch of one chunk, got {len(augmented)}")
        chunks = []
        self.capture.sink = sink
        try:
            for images in augmented:
                with self.autocast:
                    self.module(images)
                chunks.append(self.capture.pop())
        finally:
            self.capture.sink = None
        self.watch.mark("forward")
        self.watch.count(len(batch.rows), sum(len(images) for images in augmented))
        if sink is not None:
            return None
        if len(chunks) == 1:
            return chunks[0]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def expand(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``run``'s outputs for every row of ``batch``: {layer: (R, *unit_shape)}, the copies of
        deduplicated rows written into buffers kept from batch to batch (valid until the next
        call: the background thread expands and sums one batch after the other)."""
        if not batch.deduplicate:
            return outputs
        copies = batch.copies.to(self.device)
        return {k: rows_into(self.expanded, k, v, copies) for k, v in outputs.items()}

    def batches(
        self, loader: Iterable[Batch], background: Background
    ) -> Iterator[tuple[Batch, list[Tensor]]]:
        """Each batch of ``loader`` with its augmented chunks (``augment``).

        Args:
            loader: the batches, in order.
            background: where the next batch is loaded and augmented: with a thread, it is
                queued when this batch is handed out, so it runs while the caller forwards this
                one (after the previous batch's accumulation, queued before it). "augment" is
                then the time the caller waited for it; "data_background" and
                "augment_background" the seconds the thread spent.
        """
        if not background.enabled:
            for batch in loader:
                yield batch, self.augment(batch, self.watch)
            return
        batches = iter(loader)
        job = background.submit(self._next_augmented, batches)
        while (ready := self._waited(job)) is not None:
            job = background.submit(self._next_augmented, batches)
            yield ready

    def _next_augmented(self, batches: Iterator[Batch]) -> tuple[Batch, list[Tensor]] | None:
        """The next batch and its ``augment``, in the background thread; None after the last."""
        watch = self.watch.background()
        batch = next(batches, None)
        if batch is None:
            return None
        return batch, self.augment(batch, watch)

    def _waited(
        self, job: Future[tuple[Batch, list[Tensor]] | None]
    ) -> tuple[Batch, list[Tensor]] | None:
        """The background thread's result; the wait is charged to "augment"."""
        ready = job.result()
        self.watch.mark("augment")
        return ready


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

