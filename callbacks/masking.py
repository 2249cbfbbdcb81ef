"""MaskingCallback: guided-masking accuracy of a model while it trains (METHOD.md section 8).

At the end of every ``every_n_epochs``-th training epoch (and of the last one) the callback reads
the sensitivity maps of an analysis from the run's results file - by default the analysis a
``SensitivityCallback`` wrote for the same epoch (``epoch_XXXX``; list MaskingCallback after it,
callbacks run in list order) - and runs ``sensitivity.masking.evaluate_masking`` on a probe set
from the datamodule (``probe_set(images_per_class, split)``): top-1/top-5 accuracy on original
and singly-augmented inputs under the 17 mask configurations of every mask variable, with
per-class accuracies, confusion matrices and (``cluster``) the hierarchical clustering of the
(input, mask variable) profiles.

Outputs (rank zero), in the run directory (``output_dir``, default
``trainer.default_root_dir``): /masking/<analysis> in the results file (docs/RESULTS_FORMAT.md),
``<figures_dir>/<analysis>_masking_specificity.png`` and ``..._masking_dendrogram.png``, and on
W&B (``masking_record``): the accuracy tables, the unmasked accuracies, the specificity matrix,
its heatmap and the dendrogram against ``analysis/epoch``.

Distributed (DDP): rank zero reads the maps and broadcasts them (and its buffers, such as the
BatchNorm statistics); every rank evaluates its shard of the probe images and the accuracy sums
are reduced through the process group, so every rank must reach the hook (Lightning guarantees
it). An epoch whose analysis is missing from the
results file (e.g. the SensitivityCallback runs less often) is skipped with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from callbacks.schedule import epoch_is_due, run_directory
from callbacks.sensitivity import analysis_name
from callbacks.wandb_logging import STEP_METRIC, define_metrics, wandb_run
from sensitivity import masking, report
from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.distributed import broadcast_buffers
from sensitivity.masking.figures import save_dendrogram
from sensitivity.probe import probe_size
from sensitivity.store import ResultsStore

PREFIX = "masking"
TABLE_COLUMNS = ["epoch", "input", "variable", "configuration", "acc1", "acc5"]
SPLITS = ("train", "val")


def masking_record(
    result: masking.MaskingResult, heatmap: str | Path, dendrogram: str | Path | None = None
) -> dict[str, Any]:
    """What ``run.log`` receives for one masking evaluation.

    Args:
        result: the masking result (its epoch, or -1, is the step).
        heatmap: the specificity PNG.
        dendrogram: the dendrogram PNG of its clustering, if any.

    Returns:
        {``masking/unmasked/<input>/acc1`` and ``.../acc5``,
        ``masking/specificity/<input>/<variable>`` (Spearman of the result's profiles),
        ``masking/table`` (every accuracy), ``masking/class_table`` (per-class top-1
        accuracies, one column ``acc1/<class>`` per class, the rows of ``masking/table``),
        ``masking/specificity_heatmap``, ``masking/dendrogram``, the step metric}.
    """
    import wandb

    epoch = -1 if result.epoch is None else int(result.epoch)
    record: dict[str, Any] = {STEP_METRIC: epoch}
    for i, name in enumerate(result.inputs):
        record[f"{PREFIX}/unmasked/{name}/acc1"] = float(result.unmasked_acc1[i])
        record[f"{PREFIX}/unmasked/{name}/acc5"] = float(result.unmasked_acc5[i])
    for i, name in enumerate(result.inputs[1:]):
        for v, variable in enumerate(result.variables):
            record[f"{PREFIX}/specificity/{name}/{variable}"] = float(result.specificity[i, v])
    record[f"{PREFIX}/table"] = wandb.Table(
        columns=TABLE_COLUMNS, data=[[epoch, *row] for row in result.table()]
    )
    class_rows = result.class_table()
    if class_rows:
        record[f"{PREFIX}/class_table"] = wandb.Table(
            columns=[*TABLE_COLUMNS[:4], *(f"acc1/{name}" for name in result.classes or [])],
            data=[[epoch, *row[:3], *row[3]] for row in class_rows],
        )
    record[f"{PREFIX}/specificity_heatmap"] = wandb.Image(
        str(heatmap), caption=f"masking specificity, epoch {epoch}"
    )
    if dendrogram is not None:
        record[f"{PREFIX}/dendrogram"] = wandb.Image(
            str(dendrogram), caption=f"masking profile clusters, epoch {epoch}"
        )
    return record


class MaskingCallback(pl.Callback):
    """Track guided-masking accuracies during ``fit``.

    Args:
        every_n_epochs: evaluate after epochs k-1, 2k-1, ... (0-based) and after the last.
        analysis: the analysis whose maps are used; None: ``epoch_XXXX`` of the current epoch
            (what SensitivityCallback writes).
        results_file: results file, relative to the run directory (SensitivityCallback's).
        value: "S1" | "ST" | "shapley_normalized"; None: ST, else shapley_normalized.
        layers: masked layers; None: the analysed layers whose output has positions (maps
            (C, H, W) or (H, W, C), tokens (L, D)).
        variables: mask variables; None: every variable of the analysis.
        augmentations: input augmentations; None: the analysis's augmentations.
        k: parameter draws per probe image and input augmentation.
        images_per_class, split: the probe set (``datamodule.probe_set``).
        ties: "strict" | "inclusive" (``sensitivity.masking.quantile_mask``).
        batch_images, reuse_prefix, seed, batch_rows: as ``evaluate_masking`` (batch_rows
            None: the device's default, ``masking.default_batch_rows``).
        progress: report the image forwards on rank zero (stderr), as ``evaluate_masking``;
            off by default: the training's own progress bar shares the terminal.
        figures_dir: PNG folder, relative to the run directory.
        output_dir: the run directory; None: ``trainer.default_root_dir``.
        profile, max_confusion_classes: as ``evaluate_masking`` ("top1" | "per_class" |
            "confusion").
        cluster: cluster the (input, mask variable) profiles (``masking.cluster_masking``
            with ``cluster_method``, ``cluster_metric``, ``cluster_threshold``).

    Raises:
        ValueError: non-positive counts, an unknown value, ties, split, augmentation, profile
            or clustering option.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        analysis: str | None = None,
        results_file: str = "sensitivity.h5",
        value: str | None = None,
        layers: list[str] | None = None,
        variables: list[str] | None = None,
        augmentations: list[str] | None = None,
        k: int = 2,
        images_per_class: int = 4,
        split: str = "val",
        ties: str = "strict",
        batch_images: int = 16,
        reuse_prefix: bool = True,
        seed: int = 0,
        progress: bool = False,
        figures_dir: str = "sensitivity",
        output_dir: str | None = None,
        profile: str = "top1",
        max_confusion_classes: int = 100,
        cluster: bool = True,
        cluster_method: str = "average",
        cluster_metric: str = "spearman",
        cluster_threshold: float | None = None,
        batch_rows: int | None = None,
    ) -> None:
        super().__init__()
        for label, number in (("every_n_epochs", every_n_epochs), ("k", k),
                              ("images_per_class", images_per_class),
                              ("batch_images", batch_images)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {number!r}")
        if batch_rows is not None and (isinstance(batch_rows, bool) or batch_rows < 0):
            raise ValueError(f"batch_rows must be an integer >= 0 or None, got {batch_rows!r}")
        if value is not None and value not in masking.VALUE_KEYS:
            raise ValueError(f"value must be one of {list(masking.VALUE_KEYS)}, got {value!r}")
        if ties not in masking.TIES:
            raise ValueError(f"ties must be one of {list(masking.TIES)}, got {ties!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if profile not in masking.PROFILES:
            raise ValueError(f"profile must be one of {list(masking.PROFILES)}, got {profile!r}")
        if cluster:
            masking.check_clustering(cluster_method, cluster_metric, cluster_threshold)
        unknown = [a for a in augmentations or [] if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentations {unknown}; valid: {list(AUGMENTATIONS)}")
        self.every_n_epochs = every_n_epochs
        self.analysis = analysis
        self.results_file = results_file
        self.value = value
        self.layers = layers
        self.variables = variables
        self.augmentations = augmentations
        self.k = k
        self.images_per_class = images_per_class
        self.split = split
        self.ties = ties
        self.batch_images = batch_images
        self.reuse_prefix = reuse_prefix
        self.batch_rows = batch_rows
        self.seed = seed
        self.progress = progress
        self.figures_dir = figures_dir
        self.output_dir = output_dir
        self.profile = profile
        self.max_confusion_classes = max_confusion_classes
        self.cluster = cluster
        self.cluster_method = cluster_method
        self.cluster_metric = cluster_metric
        self.cluster_threshold = cluster_threshold
        self.results: list[masking.MaskingResult] = []
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._class_names: list[str] | None = None
        self._run_dir: Path | None = None
        self._wandb_ready = False

    @property
    def results_path(self) -> Path:
        """The results file (known once fit has started; ValueError before)."""
        if self._run_dir is None:
            raise ValueError("the run directory is known once fit has started (setup)")
        return self._run_dir / self.results_file

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take the probe set from the datamodule and agree on the run directory ("fit" only).

        Args:
            trainer: the trainer; its datamodule needs ``probe_set``.
            pl_module: the model.
            stage: Lightning's stage; anything but "fit" is ignored.

        Raises:
            ValueError: a datamodule without ``probe_set``.
        """
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "probe_set"):
            raise ValueError(
                "MaskingCallback needs a datamodule with probe_set(images_per_class, split) "
                f"(PlantedFactorDataModule, ImageFolderDataModule); got "
                f"{type(datamodule).__name__}: pass datamodule= to trainer.fit"
            )
        self._probe = datamodule.probe_set(self.images_per_class, split=self.split)
        self._class_names = getattr(datamodule, "class_names", None)
        self._run_dir = run_directory(trainer, self.output_dir)
        self._wandb_ready = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate when the epoch is due (``schedule.epoch_is_due``)."""
        if epoch_is_due(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module)

    def _read(self, name: str) -> masking.StoredAnalysis | None:
        """Rank zero: the analysis and its problem, or None when the file lacks it."""
        store = ResultsStore(self.results_path)
        if not store.path.is_file() or not store.has_analysis(name):
            return None
        return masking.read_stored_analysis(store, name)

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> masking.MaskingResult | None:
        """Evaluate guided masking on the current weights.

        Every rank calls it and gets the global result; rank zero stores and logs it.

        Args:
            trainer: the fitting trainer.
            pl_module: the model, on its device.

        Returns:
            The masking result with its epoch set; None (and a warning) when the results file
            lacks the analysis.

        Raises:
            ValueError: called before ``setup``, or maps, layers, variables or augmentations
                that ``masking_maps`` / ``evaluate_masking`` refuse.
        """
        if self._probe is None:
            raise ValueError("MaskingCallback.evaluate runs during fit, after setup")
        epoch = trainer.current_epoch
        name = self.analysis or analysis_name(epoch)
        stored = trainer.strategy.broadcast(
            self._read(name) if trainer.is_global_zero else None, src=0
        )
        if stored is None:
            rank_zero_warn(f"MaskingCallback: no analysis {name!r} in {self.results_path} at "
                           f"epoch {epoch}; skipped")
            return None
        # Every shard must see rank zero's BatchNorm statistics (DDP leaves each rank its own).
        broadcast_buffers(pl_module, trainer.world_size)
        images, labels = self._probe
        chosen = masking.masking_maps(
            stored.result, pl_module, probe_size(images), value=self.value, layers=self.layers,
            augmentations=self.augmentations,
        )
        result = masking.evaluate_masking(
            pl_module, chosen.maps, stored.result.group_names, images, labels,
            chosen.augmentations, value=chosen.value, analysis=name,
            mask_variables=self.variables, k=self.k, seed=self.seed, problem=stored.problem,
            ties=self.ties, batch_images=self.batch_images, reuse_prefix=self.reuse_prefix,
            batch_rows=self.batch_rows,
            rank=trainer.global_rank, world_size=trainer.world_size, valid=chosen.valid,
            progress=self.progress, layouts=chosen.layouts, profile=self.profile,
            max_confusion_classes=self.max_confusion_classes, class_names=self._class_names,
        )
        result.epoch = epoch
        if self.cluster:
            result.clustering = masking.cluster_masking(
                result, method=self.cluster_method, metric=self.cluster_metric,
                threshold=self.cluster_threshold)
        self.results.append(result)
        if trainer.is_global_zero:
            self._write(trainer, name, result)
        return result

    def _write(self, trainer: pl.Trainer, name: str, result: masking.MaskingResult) -> None:
        """Rank zero: /masking/<name> in the results file, the specificity PNG and the
        dendrogram, W&B."""
        store = ResultsStore(self.results_path)
        group = store.write_result(masking.GROUP_KIND, name, result, overwrite=True)
        figures = self.results_path.parent / self.figures_dir
        heatmap = report.save_specificity(result, figures, name)
        dendrogram = (None if result.clustering is None
                      else save_dendrogram(result.clustering, figures, name))
        rank_zero_info(
            f"MaskingCallback: epoch {result.epoch}, unmasked top-1 "
            f"{result.unmasked_acc1[0]:.3f} -> {store.path} [/{group}]"
        )
        run = wandb_run(trainer)
        if run is not None:
            if not self._wandb_ready:
                define_metrics(run, PREFIX)
                self._wandb_ready = True
            run.log(masking_record(result, heatmap, dendrogram))
