"""SensitivityCallback: the augmentation-sensitivity decomposition of a model while it trains.

At the end of every ``every_n_epochs``-th training epoch (and of the last one, never in the
sanity check) the callback runs ``sensitivity.engine.run_analysis`` on the current weights over
a probe set of the trainer's datamodule; the engine restores the train/eval flags, so training
continues unaffected. How it fits with the rest: ARCHITECTURE.md "The application layer".

Outputs (rank zero, in the run directory): ``sensitivity.h5`` with /analyses/epoch_XXXX per
analysis (RESULTS_FORMAT.md; each records the SHA-256 of that epoch's state dict), with
``store_activations`` ``sensitivity_activations/epoch_XXXX.h5``, the PNGs
``sensitivity/epoch_XXXX_<key>.png`` and ``history_<key>.png``, and the W&B records.

Under DDP every rank analyses its shard, after rank zero's buffers (BatchNorm statistics) are
broadcast so that every shard sees the weights the checkpoint stores. ``state_dict`` holds the
history, so a fit resumed with ``ckpt_path=`` keeps numbering epochs where it stopped and its
history figures include the earlier epochs (the history is in a checkpoint saved at or after the
train-epoch end, Lightning's default when validation runs every epoch).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from callbacks.schedule import epoch_is_due, run_directory
from callbacks.wandb_artifacts import log_results_artifact
from callbacks.wandb_config import problem_summary
from callbacks.wandb_logging import AnalysisLog, wandb_run
from lightning_modules.weights import state_dict_sha256
from sensitivity.activations import ActivationWriter
from sensitivity.config import EngineConfig
from sensitivity.distributed import broadcast_buffers, shard_path
from sensitivity.engine import run_analysis
from sensitivity.plan import AnalysisPlan, plan_analysis
from sensitivity.problem import PAPER_METHODS, AugmentationProblem
from sensitivity.provenance import provenance
from sensitivity.publish import publish_analysis
from sensitivity.report import save_history
from sensitivity.results import PER_VARIABLE_KEYS, AnalysisResult
from sensitivity.store import ResultsStore, check_name

# 2: history summaries hold median, p10, p90, mean and valid_fraction per layer and variable.
STATE_VERSION = 2
SPLITS = ("train", "val")
DEFAULT_PROBLEM: dict[str, Any] = {"augmentations": 1}
# Set from the datamodule, never by the user.
_DATA_KEYS = ("n_classes", "images_per_class")


def analysis_name(epoch: int) -> str:
    """The results-file name of the analysis after a training epoch.

    Args:
        epoch: the 0-based training epoch.

    Returns:
        "epoch_0003" for epoch 3.
    """
    return f"epoch_{epoch:04d}"


class SensitivityCallback(pl.Callback):
    """Track Sobol indices / Shapley effects of a model's activations during ``fit``.

    Args:
        every_n_epochs: analyse after epochs k-1, 2k-1, ... (0-based) and after the last epoch.
        engine: the analysis settings (``sensitivity.config.EngineConfig``: method, n, seed,
            layers, reduction, ...), the same object analyze.py builds from its options; None:
            ``EngineConfig()``'s defaults. The seed fixes the design: every analysis of a fit
            uses the same design rows, so the epochs differ only by the weights. In YAML a
            mapping of its fields: ``engine: {method: shapley, n: 64, reduction:
            channel_mean}``.
        problem: the AugmentationProblem as a mapping of its constructor's keys:
            ``augmentations`` (1, 2 or a list of names), ``p_on``, ``auxiliaries``,
            ``postprocess``, ``bounds``, or ``preset: paper``. None: augmentation set 1 with
            order, class and image. The class count and images per class come from the data.
        images_per_class: probe images per class, from ``split``; with a ``partition``
            auxiliary that many from train followed by that many from val.
        split: "val" or "train".
        store_activations: also store every design row's captured outputs (one file per
            analysis; keep n small).
        results_file: results file name, relative to the run directory.
        figures_dir: PNG folder, relative to the run directory.
        output_dir: the run directory; None: ``trainer.default_root_dir``.

    LightningCLI builds the callback from YAML (``trainer.callbacks: [{class_path:
    callbacks.SensitivityCallback, init_args: {engine: {...}, ...}}]``).

    Raises:
        ValueError: bad settings, here; those that need the model and data (layer names,
            probe size) in ``setup``, before any training step.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        engine: EngineConfig | None = None,
        problem: dict[str, Any] | None = None,
        images_per_class: int = 4,
        split: str = "val",
        store_activations: bool = False,
        results_file: str = "sensitivity.h5",
        figures_dir: str = "sensitivity",
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("every_n_epochs", every_n_epochs),
                             ("images_per_class", images_per_class)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not results_file.endswith((".h5", ".hdf5")):
            raise ValueError(f"results_file must end in .h5 or .hdf5, got {results_file!r}")
        # A deep copy (asdict), validated again: later changes to the caller's object (or its
        # layers list) do not reach the fit.
        self.config = EngineConfig(**(engine or EngineConfig()).to_dict())
        # Recorded in the results file: the arguments as given, the engine as used.
        self.settings = {
            "engine": self.config.to_dict(), "every_n_epochs": every_n_epochs,
            "problem": problem, "images_per_class": images_per_class, "split": split,
            "store_activations": store_activations, "results_file": results_file,
            "figures_dir": figures_dir, "output_dir": output_dir,
        }
        self.every_n_epochs = every_n_epochs
        self.images_per_class = images_per_class
        self.split = split
        self.store_activations = store_activations
        self.results_file = results_file
        self.figures_dir = figures_dir
        self.output_dir = output_dir
        self.problem_config = self._problem_config(problem, self.config.method)
        # Fail now on a bad problem; the real one needs the data's class count.
        AugmentationProblem.from_config(self.problem_config, n_classes=1, images_per_class=1)
        self._history: list[dict[str, Any]] = []
        self.problem: AugmentationProblem | None = None
        self.probe: Tensor | None = None
        self.plan: AnalysisPlan | None = None
        self.run_dir: Path | None = None
        self._config_file: Path | None = None
        self._metadata_written = False
        self._wandb: AnalysisLog | None = None

    @staticmethod
    def _problem_config(problem: Mapping[str, Any] | None, method: str) -> dict[str, Any]:
        """The problem mapping without the data's keys; a paper preset gets the method."""
        config = dict(DEFAULT_PROBLEM if problem is None else problem)
        given = sorted(set(config) & set(_DATA_KEYS))
        if given:
            raise ValueError(
                f"problem keys {given} come from the datamodule (its class count) and "
                f"images_per_class; remove them from the problem"
            )
        if config.get("preset") == "paper" and "method" not in config and method in PAPER_METHODS:
            config["method"] = method
        return config

    # ------------------------------------------------------------------------------ properties
    @property
    def method(self) -> str:
        """The engine's method."""
        return self.config.method

    @property
    def state_key(self) -> str:
        """The checkpoint key of this instance's state (method and results file)."""
        # Several instances (e.g. one per method) keep separate histories in a checkpoint.
        return self._generate_state_key(method=self.method, results_file=self.results_file)

    @property
    def results_path(self) -> Path:
        """The results file (known once fit has started)."""
        return self._require_run_dir() / self.results_file

    @property
    def figures_path(self) -> Path:
        """The PNG folder (known once fit has started)."""
        return self._require_run_dir() / self.figures_dir

    @property
    def activations_path(self) -> Path:
        """The folder of raw-activation files (with ``store_activations``)."""
        return self._require_run_dir() / f"{Path(self.results_file).stem}_activations"

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every analysis so far, resumed ones first (a copy).

        Each entry: {"epoch", "global_step", "method", "group_names", "n", "evaluations",
        "seconds", "summary"}, summary being ``AnalysisResult.summary()``.
        """
        return copy.deepcopy(self._history)

    @property
    def epochs(self) -> list[int]:
        """The training epochs analysed so far (including those of a resumed fit)."""
        return [entry["epoch"] for entry in self._history]

    def _require_run_dir(self) -> Path:
        """The run directory, or a ValueError before ``setup``."""
        if self.run_dir is None:
            raise ValueError("the run directory is known once fit has started (setup)")
        return self.run_dir

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpointed state: {"version", "history"}."""
        return {"version": STATE_VERSION, "history": copy.deepcopy(self._history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of a checkpoint.

        Args:
            state_dict: what ``state_dict`` returned.

        Raises:
            ValueError: a state of another version.
        """
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"checkpoint holds SensitivityCallback state version {state_dict.get('version')}"
                f"; this software reads version {STATE_VERSION}"
            )
        self._history = copy.deepcopy(list(state_dict["history"]))

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the problem, probe and plan from the datamodule and model (stage "fit" only).

        Runs before the first training step; every rank agrees on rank zero's run directory.

        Args:
            trainer: the trainer; its datamodule needs ``num_classes`` and ``probe_set``.
            pl_module: the model to analyse.
            stage: Lightning's stage; anything but "fit" is ignored.

        Raises:
            ValueError: a datamodule without ``probe_set``/``num_classes``, or what
                ``plan_analysis`` refuses (layers, probe size, design).
        """
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "probe_set") or not hasattr(datamodule, "num_classes"):
            raise ValueError(
                "SensitivityCallback needs a datamodule with num_classes and "
                "probe_set(images_per_class, split) (PlantedFactorDataModule, "
                f"ImageFolderDataModule); got {type(datamodule).__name__}: pass datamodule= "
                "to trainer.fit"
            )
        self.problem = AugmentationProblem.from_config(
            self.problem_config,
            n_classes=int(datamodule.num_classes),
            images_per_class=self.images_per_class,
        )
        splits = SPLITS if "partition" in self.problem.auxiliaries else (self.split,)
        self.probe = torch.cat(
            [datamodule.probe_set(self.images_per_class, split=s)[0] for s in splits]
        )
        # One design and one dry forward per fit: every epoch's analysis runs from this plan.
        self.plan = plan_analysis(pl_module, self.problem, self.probe, self.config)
        for layer in self.plan.unit_shapes:
            check_name("layer", layer)
        # Every rank writes its activation shard where rank zero merges it.
        self.run_dir = run_directory(trainer, self.output_dir)
        # LightningCLI saves the run's config in the log directory (a collective: every rank).
        self._config_file = Path(trainer.log_dir or self.run_dir) / "config.yaml"
        self._metadata_written = False
        self._wandb = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Analyse when the epoch is due (``schedule.epoch_is_due``)."""
        if epoch_is_due(trainer, self.every_n_epochs):
            self.analyze(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the results file as a W&B artifact (offline too), when the trainer has a W&B
        run."""
        run = wandb_run(trainer)
        if run is not None and self.run_dir is not None:
            log_results_artifact(run, self.results_path,
                                 {"method": self.method, "epochs": self.epochs})

    # ------------------------------------------------------------------------------ analysis
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AnalysisResult:
        """Analyse the current weights as epoch ``trainer.current_epoch``.

        Every rank calls it and gets the global result; rank zero stores and logs it.

        Args:
            trainer: the fitting trainer.
            pl_module: the model, on its device.

        Returns:
            The analysis, with epoch and global step set.

        Raises:
            ValueError: called before ``setup``.
        """
        if self.problem is None or self.probe is None or self.plan is None:
            raise ValueError("SensitivityCallback.analyze runs during fit, after setup")
        epoch = trainer.current_epoch
        name = analysis_name(epoch)
        world_size = trainer.world_size
        broadcast_buffers(pl_module, world_size)
        writer = self._activation_writer(name, trainer.global_rank, world_size, epoch)
        # the writer publishes its shard on success and deletes it on any error
        with nullcontext() if writer is None else writer:
            result = run_analysis(
                pl_module, self.problem, self.probe, self.config, plan=self.plan,
                device=pl_module.device, activation_writer=writer,
                rank=trainer.global_rank, world_size=world_size,
            )
        if writer is not None:
            trainer.strategy.barrier("sensitivity_activations_written")
        result.epoch, result.global_step = epoch, trainer.global_step
        self._history.append({
            "epoch": epoch,
            "global_step": trainer.global_step,
            "method": result.method,
            "group_names": list(result.group_names),
            "n": result.n,
            "evaluations": result.evaluations,
            "seconds": result.seconds,
            "summary": result.summary(),
        })
        if trainer.is_global_zero:
            self._write(trainer, pl_module, name, result)
        return result

    def _activation_file(self, name: str, rank: int, world_size: int) -> Path:
        """This rank's raw-activation shard of analysis ``name``."""
        return shard_path(self.activations_path / f"{name}.h5", rank, world_size)

    def _activation_writer(
        self, name: str, rank: int, world_size: int, epoch: int
    ) -> ActivationWriter | None:
        """This rank's activation shard writer for one epoch, built from the fit's plan."""
        if not self.store_activations:
            return None
        design = self.plan.design
        return ActivationWriter(
            self._activation_file(name, rank, world_size), name, self.plan.unit_shapes,
            self.problem.d, design.row_kinds(), n_rows=self.plan.n_rows,
            attrs={"method": self.method, "epoch": epoch, "rank": rank,
                   "world_size": world_size},
        )

    def _write(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str,
        result: AnalysisResult,
    ) -> None:
        """Rank zero: results file (+ merged activations), PNGs, W&B."""
        metadata = self._metadata(trainer, pl_module)
        published = publish_analysis(
            ResultsStore(self.results_path), name, result, figures=self.figures_path,
            attrs=self._analysis_attrs(metadata, pl_module), overwrite=True,
            # the root metadata once per fit: it describes the run, not an epoch
            metadata=None if self._metadata_written else {"problem": self.problem, **metadata},
            activations=self._activation_file(name, 0, 1) if self.store_activations else None,
            world_size=trainer.world_size,
        )
        self._metadata_written = True
        history = self._history_results()
        if history:
            save_history(history, self.figures_path)
        rank_zero_info(
            f"SensitivityCallback: {result.method} of epoch {result.epoch}, "
            f"{result.evaluations} rows in {result.seconds:.1f} s -> {self.results_path} "
            f"[{name}]"
        )
        run = wandb_run(trainer)
        if run is not None:
            self._log_wandb(run, result, published.heatmaps)

    def _log_wandb(self, run: Any, result: AnalysisResult, heatmaps: Mapping[str, Path]) -> None:
        """Rank zero: the analysis to the trainer's W&B run; with the first one, this
        callback's settings and the problem summary to the run config."""
        if self._wandb is None or self._wandb.run is not run:
            self._wandb = AnalysisLog(run, self.method)
            summary = problem_summary(self.problem, self.method, self.config.n,
                                      type(self.plan.design).__name__, result.interval)
            # the settings as given, with the resolved layers and problem filled in; W&B
            # replaces a top-level key whole, so the other callbacks' entries are kept
            block: dict[str, Any] = {"sensitivity": {
                **dict(run.config.get("sensitivity") or {}),
                self.method: {
                    **self.settings,
                    "engine": {**self.settings["engine"],
                               "layers": list(self.plan.unit_shapes)},
                    "problem": {**self.problem_config, **summary},
                },
            }}
            if "problem" not in run.config:  # the first analysis callback describes the run
                block["problem"] = summary
            run.config.update(block, allow_val_change=True)
        latest = self._history[-1]
        history = [(entry["epoch"], entry["summary"]) for entry in self._history
                   if entry["method"] == latest["method"]
                   and entry["group_names"] == latest["group_names"]]
        self._wandb.log(result.epoch, latest["summary"], heatmaps,
                        result.top_variable_shares(), history)

    def _history_results(self) -> list[AnalysisResult]:
        """The history as AnalysisResults of per-layer medians over valid units (unit shape
        ()), for the figures: the entries with the latest entry's method and variables."""
        if not self._history or not self._history[-1]["summary"]:
            return []
        latest = self._history[-1]
        names = latest["group_names"]
        results = []
        for entry in self._history:
            if entry["method"] != latest["method"] or entry["group_names"] != names:
                continue
            layers: dict[str, dict[str, np.ndarray]] = {}
            for key in entry["summary"]:
                if key not in PER_VARIABLE_KEYS:
                    continue
                for layer, values in entry["summary"][key].items():
                    layers.setdefault(layer, {})[key] = np.array(
                        [values[g]["median"] for g in names]
                    )
            results.append(AnalysisResult(
                method=entry["method"], group_names=names, layers=layers, n=entry["n"],
                evaluations=entry["evaluations"], seconds=entry["seconds"],
                epoch=entry["epoch"], global_step=entry["global_step"],
            ))
        return results

    def _metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's root metadata: model, weights, dataset, image size, seed, config."""
        hparams = getattr(pl_module, "hparams", {})
        datamodule = trainer.datamodule
        source = getattr(pl_module, "weights_source", None) or "random initialisation"
        config_file = self._config_file
        seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "model": str(hparams.get("arch", type(pl_module).__name__)),
            "weights": f"trained from {source}",
            "dataset": _describe_data(datamodule),
            "image_size": self.plan.image_size,
            "seed": None if seed is None else int(seed),
            "config": config_file.read_text() if config_file and config_file.is_file() else None,
            "attrs": {
                "class_names": [str(c) for c in getattr(datamodule, "class_names", [])],
                "sensitivity_callback": self.settings,
            },
        }

    def _analysis_attrs(
        self, metadata: Mapping[str, Any], pl_module: pl.LightningModule
    ) -> dict[str, Any]:
        """Settings and provenance of one epoch's analysis: the weights change every epoch, so
        each analysis records the SHA-256 of the state dict it analysed. The engine's settings
        come with the result (``AnalysisResult.settings``)."""
        return {
            **provenance(
                model=metadata["model"], weights=metadata["weights"],
                weights_sha256=state_dict_sha256(pl_module), dataset=metadata["dataset"],
                image_size=metadata["image_size"], problem=self.problem,
            ),
            "split": self.split,
            "images_per_class": self.images_per_class,
        }


def _describe_data(datamodule: Any) -> str:
    """"planted:colour", an image-folder path, or the datamodule's class name."""
    factor = getattr(datamodule, "factor", None)
    if factor is not None:
        return f"planted:{factor}"
    root = getattr(datamodule, "root", None)
    return str(root) if root is not None else type(datamodule).__name__

