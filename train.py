"""Train an ImageClassifier with LightningCLI; ``python train.py`` alone runs the CPU demo.

configs/demo.yaml is the embedded default config: a small-input ResNet18 learns the planted
colour factor (4 classes, 64 px). Any option can be overridden (``--trainer.max_epochs 5``,
``--config my.yaml``); ``python train.py fit --help`` lists them all. Without a subcommand,
``fit`` runs.

Outputs go to ``<runs_dir>/<run_name>/version_<n>/``: config.yaml, checkpoints/ (best-*.ckpt
by val/acc1, last.ckpt the final state) and wandb/ (the W&B run: offline, for ``wandb sync``,
unless WANDB_MODE=online or --wandb_project is given). The demo config also analyses the
network after every epoch with ``callbacks.SensitivityCallback``: sensitivity.h5 (one
/analyses/epoch_XXXX per epoch), sensitivity_activations/ and sensitivity/*.png.

Settings that cannot work with the data are found before the run directory or the W&B run
exists: a callback's probe set larger than a split (e.g. the demo's 4 validation images per
class on a small image folder) or data that cannot be set up exit with status 2 and a message
naming the option to change; a failed attempt leaves no version directory behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from callbacks import SensitivityCallback
from callbacks.masking import MaskingCallback
from callbacks.wandb_config import (
    NAME_OPTIONS,
    augmentation_set,
    check_run_names,
    default_group,
    resolve_names,
    version_info,
)
from callbacks.wandb_logging import DEFAULT_PROJECT
from callbacks.wandb_training import WandbTrainingRun
from lightning_modules import ImageClassifier
from sensitivity.problem import AugmentationProblem
from sensitivity.publish import next_version_dir
from sensitivity.results import ranked_variables

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class InputError(ValueError):
    """Settings or data that cannot work, found before anything is written.

    train.py exits with status 2 and the message.
    """


def probe_splits(callback: SensitivityCallback | MaskingCallback) -> tuple[str, ...]:
    """The splits from which a callback takes ``images_per_class`` images of every class.

    Args:
        callback: an analysis callback.

    Returns:
        Both splits with a ``partition`` auxiliary (SensitivityCallback), else its split.
    """
    if isinstance(callback, SensitivityCallback):
        problem = AugmentationProblem.from_config(
            callback.problem_config, n_classes=1, images_per_class=1
        )
        if "partition" in problem.auxiliaries:
            return ("train", "val")
    return (callback.split,)


def check_probes(callbacks: Sequence[pl.Callback], datamodule: Any) -> None:
    """Check that every analysis callback's probe set fits the data.

    Sets the datamodule up (once: fit reuses it); a no-op for datamodules without
    ``class_counts``.

    Args:
        callbacks: the trainer's callbacks (others than the analysis callbacks are skipped).
        datamodule: the fit's datamodule.

    Raises:
        InputError: a probe set (``images_per_class`` images of every class of a split) larger
            than the data, or data that cannot be set up.
    """
    if not hasattr(datamodule, "class_counts"):
        return
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, SensitivityCallback | MaskingCallback):
            continue
        for split in probe_splits(callback):
            try:
                counts = datamodule.class_counts(split)
            except ValueError as error:
                raise InputError(f"the data cannot be used: {error}") from error
            if min(counts) < callback.images_per_class:
                last = index == len(callbacks) - 1
                raise InputError(probe_message(callback, index, last, split, counts, datamodule))


def probe_message(
    callback: SensitivityCallback | MaskingCallback, index: int, last: bool, split: str,
    counts: list[int], datamodule: Any,
) -> str:
    """Why a callback's probe does not fit, and the options that fix it.

    Args:
        callback: the callback.
        index: its position in ``trainer.callbacks``.
        last: it is the last callback (a dotted command-line option reaches it).
        split: the split that is too small.
        counts: images per class in that split.
        datamodule: the datamodule (class names, ``more_images_hint``).

    Returns:
        The message: a smaller images_per_class (the most every class has), more images in
        the split, or no callback.
    """
    fewest = min(counts)
    names = getattr(datamodule, "class_names", None) or [str(c) for c in range(len(counts))]
    where = f"{type(callback).__name__} (trainer.callbacks[{index}])"
    fixes = []
    if fewest >= 1:
        # On the command line the dotted option changes the last callback of the list.
        option = (f"--trainer.callbacks.images_per_class={fewest}" if last else
                  f"init_args.images_per_class: {fewest} of trainer.callbacks[{index}] in the "
                  f"config")
        fixes.append(f"lower its images_per_class ({option})")
    fixes.append(f"give the {split} split more images ({datamodule.more_images_hint(split)})")
    fixes.append("train without the analysis callbacks (--trainer.callbacks=[])")
    return (
        f"{where} takes {callback.images_per_class} probe images of every class from the "
        f"{split} split, but class {names[counts.index(fewest)]!r} has only {fewest} there; "
        + "; or ".join(fixes)
    )


def wandb_offline(project: str | None) -> bool:
    """Whether the training's W&B logger runs offline.

    Args:
        project: --wandb_project.

    Returns:
        True unless a project is given or WANDB_MODE is set to another mode than offline.
    """
    return project is None and os.environ.get("WANDB_MODE", "offline") == "offline"


class TrainCLI(LightningCLI):
    """LightningCLI with run directories, a W&B logger and best/last ModelCheckpoints by default.

    A logger or ModelCheckpoint given in the config replaces the defaults.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add --run_name, --runs_dir and --wandb_project; link the model to the data."""
        parser.add_argument(
            "--run_name", type=str, default="demo", help="outputs go to <runs_dir>/<run_name>/"
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="root of all runs")
        parser.add_argument(
            "--wandb_project",
            type=str | None,
            default=None,
            help=f"W&B project; setting it logs online (default: offline run under the run dir, "
                 f"project {DEFAULT_PROJECT})",
        )
        for name, kind, text in NAME_OPTIONS:
            parser.add_argument(f"--{name}", type=kind, default=None, help=text)
        parser.add_argument(
            "--wandb_checkpoints", type=bool, default=True,
            help="log the best and last checkpoints as W&B artifacts (by reference) at the end "
                 "of fit, for the lineage training -> checkpoint -> analysis",
        )
        # The small-input choice and the head size follow the data.
        parser.link_arguments("data.init_args.image_size", "model.image_size")
        parser.link_arguments(
            "data",
            "model.num_classes",
            compute_fn=lambda dm: dm.num_classes,
            apply_on="instantiate",
        )

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """Check the probes (fit), make the run directory, add the default logger and checkpoints.

        Raises:
            InputError: what ``check_probes`` refuses, before anything is written.
        """
        config = self.config.get(str(self.subcommand), self.config)
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        try:
            check_run_names(config.wandb_project, config.wandb_group, config.wandb_job_type,
                            config.wandb_tags)
        except ValueError as error:
            raise InputError(str(error)) from None
        if self.subcommand == "fit":
            # Before the run directory and the W&B run exist: a failed attempt leaves nothing.
            check_probes(callbacks, self.datamodule)
        self.run_dir = next_version_dir(Path(config.runs_dir).resolve() / config.run_name)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        if trainer_config.get("logger") in (None, True):
            kwargs.setdefault("logger", self.wandb_logger(config, callbacks))
            callbacks.append(WandbTrainingRun(log_checkpoints=config.wandb_checkpoints))
            # The run config holds every resolved option (run_config); Lightning's own logging
            # of the model's and datamodule's hyperparameters would repeat them at top level.
            kwargs.setdefault("enable_autolog_hparams", False)
        if trainer_config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            # Lightning's save_last only refreshes last.ckpt when a best checkpoint is written,
            # so the final state gets its own unmonitored callback.
            directory = self.run_dir / "checkpoints"
            best = ModelCheckpoint(
                dirpath=directory,
                filename="best-epoch={epoch}-val_acc1={val/acc1:.4f}",
                auto_insert_metric_name=False,
                monitor="val/acc1",
                mode="max",
            )
            last = ModelCheckpoint(dirpath=directory, filename="last", enable_version_counter=False)
            callbacks += [best, last]
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    def wandb_logger(self, config: Namespace, callbacks: Sequence[pl.Callback]) -> WandbLogger:
        """The default logger: a W&B run (offline unless told otherwise) under the run directory.

        Its group is the run directory's (``<run_name>-version_<n>``: the group of the analyses
        of its checkpoints), job type "train", tags the architecture and the augmentation set of
        the first SensitivityCallback; ``--wandb_*`` options win. Its config is the complete
        resolved configuration (``run_config``).

        Args:
            config: the subcommand's parsed configuration.
            callbacks: the configured callbacks (the set tag comes from them).

        Returns:
            The WandbLogger (its run starts on first use, after these checks).
        """
        arch = self.model.hparams.arch
        sensitivity = [c for c in callbacks if isinstance(c, SensitivityCallback)]
        tags = [arch]
        if sensitivity:
            problem = AugmentationProblem.from_config(
                sensitivity[0].problem_config, n_classes=1, images_per_class=1)
            tags.append(f"set-{augmentation_set(problem.augmentations)}")
        names = resolve_names(
            config, job_type="train", group=default_group(self.run_dir), tags=tags,
            project=DEFAULT_PROJECT,
        )
        return WandbLogger(
            name=f"{config.run_name}/{self.run_dir.name}", save_dir=str(self.run_dir),
            project=names.project, entity=names.entity, group=names.group,
            job_type=names.job_type, tags=list(names.tags), config=self.run_config(),
            offline=wandb_offline(config.wandb_project), log_model=False,
        )

    def run_config(self) -> dict[str, Any]:
        """The W&B run config: every option as resolved (nulls and linked values included,
        the callbacks' init_args too), the model's inferred values (classes, image size, the
        small-input choice), ``arch``, ``seed`` (the seed actually used) and ``version``; the
        SensitivityCallback adds its settings and the ``problem`` summary with its first
        analysis."""
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False,
                                                 skip_link_targets=False))
        dumped = dumped.get(str(self.subcommand), dumped)
        dumped["trainer"]["enable_autolog_hparams"] = False  # as instantiate_trainer sets it
        hparams = self.model.hparams
        dumped["model"] = {**dumped.get("model", {}), "num_classes": hparams.num_classes,
                           "image_size": hparams.image_size,
                           "small_input": bool(self.model.small_input)}
        seed = dumped.get("seed_everything")
        return {**dumped, "command": f"train.py {self.subcommand}", "arch": hparams.arch,
                "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                "version": version_info()}

    def after_fit(self) -> None:
        """Report the outputs."""
        self.report_outputs()

    @rank_zero_only
    def report_outputs(self) -> None:
        """Finish the W&B run (flushes offline files) and print where everything went."""
        trainer = self.trainer
        lines = [f"run directory    {self.run_dir}"]
        val_acc1 = trainer.callback_metrics.get("val/acc1")
        if val_acc1 is not None:
            lines.append(f"final val/acc1   {float(val_acc1):.4f}")
        for checkpoint in trainer.checkpoint_callbacks:
            if checkpoint.best_model_path:
                kind = "best" if checkpoint.monitor else "last"
                lines.append(f"{kind} checkpoint  {checkpoint.best_model_path}")
        for callback in trainer.callbacks:
            if isinstance(callback, SensitivityCallback):
                lines += sensitivity_lines(callback)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                wandb_dir = Path(run.dir).parent  # run.dir is <run>/files
                offline = run.settings.mode in ("offline", "dryrun")
                run.finish()
                if offline:
                    lines.append(f"W&B offline run  {wandb_dir}")
                    lines.append(f"upload with      wandb sync {wandb_dir}")
                else:
                    lines.append(f"W&B run          {run.url or wandb_dir}")
        print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines)]))


def sensitivity_lines(callback: SensitivityCallback) -> list[str]:
    """The "Outputs:" lines of a SensitivityCallback.

    Args:
        callback: the callback after fit.

    Returns:
        Where it wrote and the largest median indices at its last layer; [] when it wrote
        nothing.
    """
    if callback.run_dir is None or not callback.results_path.is_file():
        return []
    epochs = callback.epochs
    lines = [
        f"sensitivity      {callback.results_path}  ({callback.method}, analyses "
        f"epoch_{epochs[0]:04d} .. epoch_{epochs[-1]:04d})",
        f"sensitivity PNGs {callback.figures_path}",
    ]
    summary = callback.history[-1]["summary"]
    if summary:
        key = next(iter(summary))
        layer, values = list(summary[key].items())[-1]
        top = ranked_variables(values)[:4]
        valid = next(iter(values.values()))["valid_fraction"]
        lines.append(
            f"  median {key} at {layer}, epoch {epochs[-1]} ({valid:.0%} of units valid): "
            + (", ".join(f"{name} {values[name]['median']:.2f}" for name in top)
               or "no valid unit")
        )
    return lines


def with_subcommand(args: Sequence[str]) -> list[str]:
    """Default the subcommand to ``fit``.

    Args:
        args: the command line.

    Returns:
        ``args`` with ``fit`` in front unless they start with a subcommand or ask for help.
    """
    args = list(args)
    return args if args and args[0] in (*SUBCOMMANDS, "-h", "--help") else ["fit", *args]


def main(args: Sequence[str] | None = None) -> TrainCLI:
    """Run the CLI, ``fit`` if no subcommand is given.

    Args:
        args: the arguments (default: the command line).

    Returns:
        The finished TrainCLI.

    Raises:
        SystemExit: status 2 with a message for settings or data that cannot work.
    """
    if args is None:
        # LightningCLI reads sys.argv itself (and warns when given both), so edit it in place.
        sys.argv[1:] = with_subcommand(sys.argv[1:])
    else:
        args = with_subcommand(args)
    try:
        return make_cli(args)
    except InputError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def make_cli(args: Sequence[str] | None) -> TrainCLI:
    """Build (and run) the TrainCLI, configs/demo.yaml the default config.

    Args:
        args: the arguments (None: sys.argv).

    Returns:
        The TrainCLI.
    """
    defaults = {"default_config_files": [str(DEMO_CONFIG)]}
    return TrainCLI(
        ImageClassifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": (
                "Train an image classifier. Without a subcommand runs `fit` with "
                "configs/demo.yaml (the CPU demo); `python train.py fit --help` lists all options."
            ),
            **{name: defaults for name in SUBCOMMANDS},
        },
        args=args,
    )


if __name__ == "__main__":
    main()
