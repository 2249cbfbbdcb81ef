"""``analyze.py masking | single-class``: guided masking and the single-class analysis with the
maps of a stored analysis (METHOD.md sections 8-9); results go into the same results file (and
a specificity PNG next to it).

Every process of the run options (--devices, --strategy: Lightning launches them, as for the
analyses) evaluates its share of the probe images (``lightning_modules.analysis.ShardModule``);
the counts are summed over the processes and rank zero writes. Masking resumes from
``state_path`` (``--masking.checkpoint_every``).

``masking_inputs`` checks and builds everything before anything is written: the stored
analysis (``sensitivity.masking.read_stored_analysis``), the probe and the model of the
options, and the maps (``sensitivity.masking.masking_maps``, as the MaskingCallback takes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from jsonargparse import Namespace
from torch import Tensor
from torch.utils.data import Dataset

from callbacks.masking import masking_record
from callbacks.wandb_logging import single_class_record
from cli.analysis import check_run_options, predict_per_process
from cli.inputs import build_model, build_probe, device_of
from cli.reporting import (
    INPUT_ERRORS,
    Log,
    input_error,
    log_wandb,
    print_outputs,
    record_log,
    wandb_settings,
)
from lightning_modules import ImageClassifier
from lightning_modules.analysis import ShardModule
from sensitivity import masking, report, single_class
from sensitivity.capture import classification_layer
from sensitivity.masking.figures import save_dendrogram
from sensitivity.probe import probe_size
from sensitivity.store import ResultsStore, check_name


@dataclass(frozen=True)
class MaskingInputs:
    """What masking and single-class run on, checked.

    Attributes:
        store: the results file holding the analysis (and receiving the result).
        name: the analysis whose maps are used.
        output: the name of the result's group (/masking/<output>, /single_class/<output>).
        stored: the analysis with its problem and image size.
        model: the network, on its device.
        probe: the probe images (N, 3, H, W) in [0, 1], class-major (a tensor, or a Dataset).
        labels: (N,) int64, the class of every probe image.
        class_names: the data's class names.
        chosen: the value type, layers, input augmentations and maps.
    """

    store: ResultsStore
    name: str
    output: str
    stored: masking.StoredAnalysis
    model: ImageClassifier
    probe: Tensor | Dataset
    labels: Tensor
    class_names: list[str]
    chosen: masking.MaskingMaps


def run_masking(cfg: Namespace) -> int:
    """Run masking or single-class (``cfg.method``) on the parsed options, in every process of
    the run options (``cli.analysis.predict_per_process``); rank zero writes and reports.

    Args:
        cfg: the parsed options.

    Returns:
        The exit status: 0 (also on ranks other than zero), 2 for bad input (no results file
        or analysis, maps that do not fit the model, a resume state of other inputs...) with
        nothing written, 1 when W&B failed.
    """
    masking_run = cfg.method == "masking"
    try:
        mode = wandb_settings(cfg)
        check_run_options(cfg)
        options = cfg.masking
        if not masking_run and options.checkpoint_every:
            raise ValueError("--masking.checkpoint_every resumes masking only; run "
                             "single-class without it")
        if masking_run and options.cluster:  # bad clustering options fail before the forwards
            masking.check_clustering(options.cluster_method, options.cluster_metric,
                                     options.cluster_threshold)
        inputs = masking_inputs(cfg)
        evaluate = _evaluate_masking if masking_run else _evaluate_single_class
        module = ShardModule(inputs.model, partial(evaluate, cfg, inputs))
        trainer, _ = predict_per_process(cfg, module)
        if not (trainer.is_global_zero and module.output is not None):
            return 0
        write = _write_masking if masking_run else _write_single_class
        lines, log = write(cfg, inputs, module.output)
    except INPUT_ERRORS as error:
        return input_error(cfg.method, error)
    wandb_lines, status = log_wandb(
        cfg, mode, inputs.store.path, f"{cfg.method} {inputs.output}", log, inputs.name,
        analysis=inputs.name, name=inputs.output,
    )
    print_outputs(lines + wandb_lines)
    return status


def state_path(inputs: MaskingInputs) -> Path:
    """The masking run's resume file: ``<results dir>/<name>.masking.resume.pt`` (one per rank
    under several processes, ``distributed.shard_path``)."""
    return inputs.store.path.parent / f"{inputs.output}.masking.resume.pt"


def open_stored_analysis(
    cfg: Namespace, command: str, usage: str = ""
) -> tuple[ResultsStore, str, masking.StoredAnalysis]:
    """The results file of --results, the analysis of --analysis (else the file's only one) and
    what is stored of it: the start of every command that reads sensitivity maps.

    Args:
        cfg: the parsed options.
        command: the command's name, for the messages.
        usage: further options the command needs, for the message without --results.

    Raises:
        FileNotFoundError: no results file.
        ValueError: no --results, or several analyses and no --analysis.
    """
    if cfg.results is None:
        raise ValueError(f"{command} reads sensitivity maps from a stored analysis: pass "
                         f"--results RUN/results.h5 --analysis NAME{usage}")
    store = ResultsStore(Path(cfg.results).expanduser())
    if not store.path.is_file():
        raise FileNotFoundError(f"no results file at {store.path}")
    name = cfg.analysis
    if name is None:
        available = store.analyses()
        if len(available) != 1:
            raise ValueError(f"{store.path} holds the analyses {available}; choose one with "
                             f"--analysis NAME")
        name = available[0]
    return store, name, masking.read_stored_analysis(store, name)


def new_result_group(store: ResultsStore, group: str, overwrite: bool) -> None:
    """ValueError when ``store`` holds ``group`` already and --overwrite was not given."""
    if store.has_group(group) and not overwrite:
        raise ValueError(f"{store.path} already holds /{group}; pass --overwrite or --name")


def seeded_model(cfg: Namespace, n_classes: int) -> ImageClassifier:
    """The model of the model options (random weights drawn from --seed), on its device."""
    torch.manual_seed(cfg.seed)
    model, _, _ = build_model(cfg, n_classes)
    return model.to(device_of(cfg.accelerator))


def masking_inputs(cfg: Namespace) -> MaskingInputs:
    """Everything masking and single-class need, checked before anything is written.

    Args:
        cfg: the parsed options.

    Returns:
        The stored analysis and its maps, the model (on its device) and the probe.

    Raises:
        FileNotFoundError: no results file (or checkpoint, weights, data).
        ValueError: no --results, an ambiguous or missing analysis, an existing result without
            --overwrite, a probe of another image size, maps that do not fit the model, or no
            layer to mask.
    """
    method = cfg.method
    store, name, stored = open_stored_analysis(cfg, method)
    output = check_name("output", cfg.name or name)
    new_result_group(store, f"{'masking' if method == 'masking' else 'single_class'}/{output}",
                     cfg.overwrite)
    probe, n_classes, class_names, _ = build_probe(cfg, partition=False)
    size = probe_size(probe)
    recorded = stored.image_size or size
    if recorded != size:
        raise ValueError(f"analysis {name!r} was computed on {recorded[0]}x{recorded[1]} images "
                         f"but the probe images are {size[0]}x{size[1]}; pass --data.image_size "
                         f"{recorded[0]} (and the data the analysis used)")
    model = seeded_model(cfg, n_classes)
    options = cfg.masking
    chosen = masking.masking_maps(stored.result, model, size, value=options.value,
                                  layers=options.layers, augmentations=options.augmentations)
    if not chosen.layers:
        raise ValueError(f"analysis {name!r} has no layer with map or token outputs to mask; "
                         f"name layers with --masking.layers")
    labels = torch.arange(n_classes).repeat_interleave(cfg.data.images_per_class)
    return MaskingInputs(store, name, output, stored, model, probe, labels, class_names, chosen)


def _evaluate_masking(
    cfg: Namespace, inputs: MaskingInputs, rank: int, world_size: int
) -> masking.MaskingResult:
    """Guided masking of this process's share of the probe images; every rank gets the global
    result."""
    options, chosen = cfg.masking, inputs.chosen
    return masking.evaluate_masking(
        inputs.model, chosen.maps, inputs.stored.result.group_names, inputs.probe,
        inputs.labels, chosen.augmentations, value=chosen.value, analysis=inputs.name,
        mask_variables=options.variables, k=options.k, seed=cfg.seed,
        problem=inputs.stored.problem, ties=options.ties, batch_images=options.batch_images,
        batch_rows=options.batch_rows, reuse_prefix=options.reuse_prefix, rank=rank,
        world_size=world_size, valid=chosen.valid, progress=cfg.progress,
        layouts=chosen.layouts, profile=options.profile,
        max_confusion_classes=options.max_confusion_classes, class_names=inputs.class_names,
        state_path=state_path(inputs), checkpoint_every=options.checkpoint_every,
    )


def _write_masking(
    cfg: Namespace, inputs: MaskingInputs, out: masking.MaskingResult
) -> tuple[list[str], Log]:
    """Rank zero: the clustering of the profiles, the result stored and drawn; the lines to
    print."""
    options = cfg.masking
    if options.cluster:
        out.clustering = masking.cluster_masking(
            out, method=options.cluster_method, metric=options.cluster_metric,
            threshold=options.cluster_threshold)
    store = inputs.store
    group = store.write_result(masking.GROUP_KIND, inputs.output, out, overwrite=cfg.overwrite)
    figures = store.path.parent / "figures"
    figure = report.save_specificity(out, figures, inputs.output)
    dendrogram = (None if out.clustering is None
                  else save_dendrogram(out.clustering, figures, inputs.output))
    lines = _masking_lines(out, store, group, figure, dendrogram)
    return lines, record_log(lambda: masking_record(out, figure, dendrogram), "masking")


def _masking_lines(
    out: masking.MaskingResult, store: ResultsStore, group: str, figure: Path,
    dendrogram: Path | None,
) -> list[str]:
    """What masking prints: where its outputs went, the masks' ties, the unmasked accuracies,
    the specificity matrix and the clusters."""
    lines = [
        f"results file    {store.path}  (/{group}: {len(out.variables)} mask variables x "
        f"{len(out.configurations)} configurations, {out.n_images} images x {out.k} draws, "
        f"{out.value} maps of {', '.join(out.layers)})",
        f"heatmap         {figure}",
        f"prefix reuse    {out.prefix_reuse}",
        f"ties            {out.tied_layers} (variable, q, layer) quantiles at the layer minimum "
        f"(rule {out.ties}); fully masked layers: {out.fully_masked_layers}",
        "unmasked top-1  " + ", ".join(
            f"{n} {a:.3f}" for n, a in zip(out.inputs, out.unmasked_acc1, strict=True)),
    ]
    if len(out.inputs) > 1:
        lines.append(f"specificity (Spearman of {out.profile} profiles vs original; rows: "
                     "input):")
        lines.append(" " * 16 + " ".join(f"{v[:8]:>8}" for v in out.variables))
        for name, row in zip(out.inputs[1:], out.specificity, strict=True):
            lines.append(f"  {name:<14}" + " ".join(f"{x:8.2f}" for x in row))
    clustering = out.clustering
    if clustering is not None:
        lines.append(
            f"clusters        {clustering.count} of {len(clustering.labels)} (input | mask "
            f"variable) {clustering.profile} profiles ({clustering.metric}, "
            f"{clustering.method} linkage, cut at {clustering.threshold:.3g}): {dendrogram}")
        lines += [f"  {k}: {', '.join(members)}"
                  for k, members in enumerate(clustering.members(), start=1)]
    return lines


def _evaluate_single_class(
    cfg: Namespace, inputs: MaskingInputs, rank: int, world_size: int
) -> single_class.SingleClassResult:
    """The single-class analysis of this process's share of the probe images; every rank gets
    the global result."""
    result, model, chosen = inputs.stored.result, inputs.model, inputs.chosen
    head = classification_layer(model.net)
    if head not in result.layers:
        raise ValueError(f"analysis {inputs.name!r} has no maps of the classification layer "
                         f"{head!r} (layers: {result.layer_names}); analyse it too")
    head_maps, head_valid = masking.sensitivity_maps(result, chosen.value, [head])
    options = cfg.masking
    return single_class.evaluate_single_class(
        model, chosen.maps, result.group_names, head_maps[head], inputs.probe, inputs.labels,
        n=cfg.single_class.n, augmentations=options.variables, class_names=inputs.class_names,
        k=options.k, seed=cfg.seed, problem=inputs.stored.problem, ties=options.ties,
        trials=cfg.single_class.trials, batch_images=options.batch_images,
        batch_rows=options.batch_rows, reuse_prefix=options.reuse_prefix, value=chosen.value,
        analysis=inputs.name, layer=head, rank=rank, world_size=world_size, valid=chosen.valid,
        head_valid=head_valid[head], progress=cfg.progress, layouts=chosen.layouts,
    )


def _write_single_class(
    cfg: Namespace, inputs: MaskingInputs, out: single_class.SingleClassResult
) -> tuple[list[str], Log]:
    """Rank zero: the single-class result stored; the lines to print."""
    store = inputs.store
    group = store.write_result(single_class.GROUP_KIND, inputs.output, out,
                               overwrite=cfg.overwrite)
    t = out.threshold
    lines = [
        f"results file    {store.path}  (/{group}: {len(out.variables)} variables x "
        f"{len(out.configurations)} configurations, {out.n_images} images x {out.k} draws)",
        f"chance level    mean J {t.mean:.5f}, threshold {t.threshold:.5f} (Q3 + 1.5 IQR; C = "
        f"{t.n_classes}, s = {t.samples_per_class}, n = {t.n})",
        "self-masking    variable: max mean J [configuration] -> candidates",
    ]
    for entry in out.matches():
        status = (f"matched in {len(entry['matched_configurations'])} configurations"
                  if entry["matched_configurations"] else "not matched")
        lines.append(f"  {entry['variable']:<14} {entry['max_jaccard']:.4f} "
                     f"[{entry['configuration']}] {status}: {', '.join(entry['candidates'])}")
    return lines, record_log(lambda: single_class_record(out), "single_class")
