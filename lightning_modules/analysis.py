"""AnalysisModule: Lightning launches the processes, ``sensitivity.engine`` does the analysis.

``trainer.predict(AnalysisModule(...), dataloaders=one_step_loader())`` runs one predict step
per process. Lightning's strategy (ddp, torchrun, SLURM) starts the processes, sets
their device and the process group; each process calls ``run_analysis`` on its shard of the
design, the accumulators' sync gives every process the global result, and rank zero writes the
results file, the heatmaps and (with activation storage) the merged activation file.

``ShardModule`` does the same for any work that shards itself over the processes (masking,
single-class): one call of ``work(rank, world_size)`` per process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sensitivity.activations import ActivationWriter
from sensitivity.config import EngineConfig
from sensitivity.distributed import shard_path
from sensitivity.engine import run_analysis
from sensitivity.plan import AnalysisPlan, plan_analysis
from sensitivity.problem import AugmentationProblem
from sensitivity.publish import next_version_dir, publish_analysis
from sensitivity.store import ResultsStore

RESULTS_FILE = "results.h5"


def one_step_loader() -> DataLoader:
    """The predict loader: one item per process (each process analyses its own shard).

    Returns:
        A DataLoader of one unbatched item.
    """
    return DataLoader(range(1), batch_size=None)


class ShardModule(pl.LightningModule):
    """Run ``work(rank, world_size)`` once per process in Lightning's predict loop.

    Args:
        network: the model the work runs (Lightning moves it to the process's device).
        work: this process's share of the work (every rank calls it, so collectives inside it
            meet).

    Attributes:
        output: what ``work`` returned in this process (None before the predict step). Kept
            here rather than returned: Lightning would walk through the predictions (and
            refuses frozen dataclasses).
    """

    def __init__(self, network: nn.Module, work: Callable[[int, int], Any]) -> None:
        super().__init__()
        self.network = network
        self.work = work
        self.output: Any = None

    def forward(self, x: Tensor) -> Tensor:
        """The network's forward: (B, 3, H, W) images in [0, 1] -> its output (logits)."""
        return self.network(x)

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        """``output = work(global rank, world size)`` (batch: the one item of
        ``one_step_loader``)."""
        self.output = self.work(self.global_rank, self.trainer.world_size)


@dataclass
class AnalysisOutputs:
    """Where rank zero stores an analysis and what it records.

    Attributes:
        name: analysis name (/analyses/<name>, file names).
        output: run directory, or None for ``<runs_dir>/analysis/<name>/version_<n>`` (chosen
            by rank zero, broadcast to the others).
        runs_dir: root of the default run directories.
        overwrite: replace an analysis of the same name.
        store_activations: also store every design row's captured outputs
            (``activations_<name>.h5`` in the run directory).
        metadata: keyword arguments of ``ResultsStore.write_metadata`` besides the problem
            (model, dataset, image_size, seed, config, weights, weights_sha256, attrs).
        analysis_attrs: attributes of the analysis group besides the settings its result
            carries (provenance, the run's config text).
        config_text: the run's configuration, saved as ``config.yaml`` in the run directory
            with the results (never before: a refused or killed run leaves the folder's
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
        """The engine's resume file for this analysis (one per rank under DDP).

        Args:
            run_dir: the run directory.

        Returns:
            ``<run_dir>/<name>.resume.pt``.
        """
        return run_dir / f"{self.name}.resume.pt"

    def activations_path(self, run_dir: Path) -> Path:
        """The merged raw-activation file of this analysis.

        Args:
            run_dir: the run directory.

        Returns:
            ``<run_dir>/activations_<name>.h5``.
        """
        return run_dir / f"activations_{self.name}.h5"


class AnalysisModule(pl.LightningModule):
    """Run ``sensitivity.engine.run_analysis`` in Lightning's predict loop and store the result.

    Args:
        network: the model, ``network(x in [0, 1]) -> logits`` (an ImageClassifier).
        problem, probe, config: as ``run_analysis``.
        outputs: where rank zero stores the result and what it records.
        layer_root: the module that names the layers (default ``network.net``).
        plan: ``plan_analysis(network, problem, probe, config, layer_root)`` made by the caller
            while checking its inputs; None plans in the predict step. Either way each process
            builds the design and makes the dry forward once.

    The predict step returns {"run_dir"} on every rank; on rank zero also "results", "figures"
    (PNG paths), "heatmaps" ({value key: PNG path}), "activations" (paths as str), "method",
    "epoch", "summary" (``AnalysisResult.summary()``), "top_shares"
    (``AnalysisResult.top_variable_shares()``), "seconds" and "evaluations".
    """

    def __init__(
        self,
        network: nn.Module,
        problem: AugmentationProblem,
        probe: Tensor | Dataset,
        config: EngineConfig,
        outputs: AnalysisOutputs,
        layer_root: nn.Module | None = None,
        plan: AnalysisPlan | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.problem = problem
        self.probe = probe
        self.config = config
        self.outputs = outputs
        self.layer_root = layer_root
        self.plan = plan

    def forward(self, x: Tensor) -> Tensor:
        """The network's forward: (B, 3, H, W) images in [0, 1] -> its output (logits)."""
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
                chosen = next_version_dir(parent, create=True)
            print(f"analysing into {chosen}", flush=True)
        return Path(self.trainer.strategy.broadcast(str(chosen) if chosen else None, src=0))

    def _writer(
        self, plan: AnalysisPlan, run_dir: Path, world_size: int
    ) -> ActivationWriter | None:
        """This rank's activation shard writer, built from the plan (None: no storage)."""
        if not self.outputs.store_activations:
            return None
        path = shard_path(self.outputs.activations_path(run_dir), self.global_rank, world_size)
        return ActivationWriter(
            path, self.outputs.name, plan.unit_shapes, self.problem.d, plan.design.row_kinds(),
            n_rows=plan.n_rows,
            attrs={"method": self.config.method, "rank": self.global_rank,
                   "world_size": world_size},
        )

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Analyse this process's shard; rank zero stores the global result.

        Args:
            batch, batch_idx: the one item of ``one_step_loader`` (unused).

        Returns:
            {"run_dir"}; on rank zero also what was written (class docstring).
        """
        run_dir = self._run_dir()
        world_size = self.trainer.world_size
        plan = self.plan or plan_analysis(
            self.network, self.problem, self.probe, self.config, self.layer_root
        )
        writer = self._writer(plan, run_dir, world_size)
        # the writer publishes its shard on success and deletes it on any error
        with nullcontext() if writer is None else writer:
            result = run_analysis(
                self.network, self.problem, self.probe, self.config, plan=plan,
                layer_root=self.layer_root, device=self.device,
                state_path=None if writer is not None else self.outputs.state_path(run_dir),
                activation_writer=writer, rank=self.global_rank, world_size=world_size,
            )
        # Every shard is on disk before rank zero merges them.
        self.trainer.strategy.barrier("analysis_shards_written")
        written: dict[str, Any] = {"run_dir": str(run_dir)}
        if self.global_rank == 0:
            written.update(self._store(run_dir, result, world_size))
        return written

    def _store(self, run_dir: Path, result: Any, world_size: int) -> dict[str, Any]:
        """Rank zero: activations (merged), results file, config.yaml, heatmaps."""
        out = self.outputs
        published = publish_analysis(
            ResultsStore(run_dir / RESULTS_FILE), out.name, result,
            figures=run_dir / "figures", attrs=out.analysis_attrs, overwrite=out.overwrite,
            metadata={"problem": self.problem, **out.metadata},
            activations=out.activations_path(run_dir) if out.store_activations else None,
            world_size=world_size, config_text=out.config_text,
        )
        activations = published.activations
        return {
            "results": str(published.results),
            "figures": [str(p) for p in published.heatmaps.values()],
            "heatmaps": {key: str(p) for key, p in published.heatmaps.items()},
            "method": result.method,
            "epoch": result.epoch,
            "activations": None if activations is None else str(activations),
            "summary": result.summary(),
            "top_shares": result.top_variable_shares(),
            "seconds": result.seconds,
            "evaluations": result.evaluations,
        }
