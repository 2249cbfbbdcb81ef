"""AnalysisModule: Lightning launches the processes, ``sensitivity.engine`` does the analysis.

``trainer.predict(AnalysisModule(...), dataloaders=one_step_loader())`` runs one predict step
per process. Lightning's strategy (ddp, torchrun, SLURM) starts the processes, sets
their device and the process group; each process calls ``run_analysis`` on its shard of the
design, the accumulators' sync gives every process the global result, and rank zero writes the
results file, the heatmaps and (with activation storage) the merged activation file.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sensitivity.activations import ActivationWriter, merge_shards
from sensitivity.config import EngineConfig, build_design
from sensitivity.distributed import shard_path
from sensitivity.engine import run_analysis
from sensitivity.plan import layer_shapes
from sensitivity.problem import AugmentationProblem
from sensitivity.report import save_heatmaps
from sensitivity.store import ResultsStore

RESULTS_FILE = "results.h5"


def next_version_dir(parent: Path) -> Path:
    """Create and return ``parent/version_<n>`` with the smallest unused n."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = parent / f"version_{n}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def one_step_loader() -> DataLoader:
    """The predict loader: one item per process (each process analyses its own shard)."""
    return DataLoader(range(1), batch_size=None)


@dataclass
class AnalysisOutputs:
    """Where rank zero stores an analysis and what it records.

    name: analysis name (/analyses/<name>, file names). output: run directory, or None for
    ``<runs_dir>/analysis/<name>/version_<n>`` (chosen by rank zero, broadcast to the others).
    metadata: keyword arguments of ``ResultsStore.write_metadata`` (model, dataset, image_size,
    seed, config, weights, weights_sha256, attrs). analysis_attrs: extra attributes of the
    analysis group. config_text: the run's configuration, saved as ``config.yaml`` in the run
    directory with the results (never before: a refused or killed run leaves the folder's
    config.yaml that of its results and of any pending resume state).
    """

    name: str
    output: Path | None = None
    runs_dir: Path = Path("runs")
    overwrite: bool = False
    store_activations: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    analysis_attrs: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""

    def state_path(self, run_dir: Path) -> Path:
        """The engine's resume file for this analysis (one per rank under DDP)."""
        return run_dir / f"{self.name}.resume.pt"


class AnalysisModule(pl.LightningModule):
    """Run ``sensitivity.engine.run_analysis`` in Lightning's predict loop and store the result.

    network: the model, ``network(x in [0, 1]) -> logits`` (an ImageClassifier); hooks go on
    ``layer_root`` (default ``network.net``). problem, probe, config: as ``run_analysis``.
    The predict step returns {"run_dir"} on every rank; on rank zero also "results", "figures"
    (PNG paths), "heatmaps" ({value key: PNG path}), "activations" (paths as str), "method",
    "epoch", "summary" (``AnalysisResult.summary()``), "seconds" and "evaluations".
    """

    def __init__(
        self,
        network: nn.Module,
        problem: AugmentationProblem,
        probe: Tensor | Dataset,
        config: EngineConfig,
        outputs: AnalysisOutputs,
        layer_root: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.problem = problem
        self.probe = probe
        self.config = config
        self.outputs = outputs
        self.layer_root = layer_root

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _run_dir(self) -> Path:
        """The run directory, identical on every rank (rank zero decides, then broadcasts)."""
        chosen = None
        if self.global_rank == 0:
            if self.outputs.output is not None:
                chosen = Path(self.outputs.output)
                chosen.mkdir(parents=True, exist_ok=True)
            else:
                parent = Path(self.outputs.runs_dir) / "analysis" / self.outputs.name
                chosen = next_version_dir(parent)
            print(f"analysing into {chosen}", flush=True)
        return Path(self.trainer.strategy.broadcast(str(chosen) if chosen else None, src=0))

    def _writer(self, run_dir: Path, world_size: int) -> ActivationWriter | None:
        if not self.outputs.store_activations:
            return None
        name = self.outputs.name
        path = shard_path(run_dir / f"activations_{name}.h5", self.global_rank, world_size)
        height, width = _probe_size(self.probe)
        design_rows, row_kinds = _design_layout(self.problem, self.config)
        return ActivationWriter(
            path,
            name,
            layer_shapes(self.network, (height, width), self.config, self.layer_root),
            self.problem.d,
            row_kinds,
            n_rows=design_rows,
            attrs={"method": self.config.method, "rank": self.global_rank,
                   "world_size": world_size},
        )

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        run_dir = self._run_dir()
        world_size = self.trainer.world_size
        writer = self._writer(run_dir, world_size)
        # the writer publishes its shard on success and deletes it on any error
        with nullcontext() if writer is None else writer:
            result = run_analysis(
                self.network,
                self.problem,
                self.probe,
                self.config,
                layer_root=self.layer_root,
                device=self.device,
                state_path=None if writer is not None else self.outputs.state_path(run_dir),
                activation_writer=writer,
                rank=self.global_rank,
                world_size=world_size,
            )
        # Every shard is on disk before rank zero merges them.
        self.trainer.strategy.barrier("analysis_shards_written")
        written: dict[str, Any] = {"run_dir": str(run_dir)}
        if self.global_rank == 0:
            written.update(self._store(run_dir, result, world_size))
        return written

    def _store(self, run_dir: Path, result: Any, world_size: int) -> dict[str, Any]:
        """Rank zero: activations (merged), results file, config.yaml, heatmaps."""
        name, out = self.outputs.name, self.outputs
        store = ResultsStore(run_dir / RESULTS_FILE)
        activations = None
        if out.store_activations:
            activations = run_dir / f"activations_{name}.h5"
            if world_size > 1:
                shards = [shard_path(activations, r, world_size) for r in range(world_size)]
                merge_shards(shards, activations, remove_shards=True)
        store.write_metadata(problem=self.problem, **out.metadata)
        store.write_analysis(name, result, attrs=out.analysis_attrs, overwrite=out.overwrite)
        if activations is not None:
            store.add_activations(name, activations, overwrite=out.overwrite)
        if out.config_text:
            (run_dir / "config.yaml").write_text(out.config_text)
        figures = save_heatmaps(result, run_dir / "figures", name)
        return {
            "results": str(store.path),
            "figures": [str(p) for p in figures.values()],
            "heatmaps": {key: str(p) for key, p in figures.items()},
            "method": result.method,
            "epoch": result.epoch,
            "activations": None if activations is None else str(activations),
            "summary": result.summary(),
            "seconds": result.seconds,
            "evaluations": result.evaluations,
        }


def _probe_size(probe: Tensor | Dataset) -> tuple[int, int]:
    if isinstance(probe, Tensor):
        return int(probe.shape[2]), int(probe.shape[3])
    item = probe[0]
    image = item[0] if isinstance(item, tuple | list) else item
    return int(image.shape[1]), int(image.shape[2])


def _design_layout(problem: AugmentationProblem, config: EngineConfig) -> tuple[int, list[str]]:
    design = build_design(problem, config)
    return design.n_rows, design.row_kinds()
