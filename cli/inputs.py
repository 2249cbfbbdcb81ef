"""What an analyze.py command analyses, built from its options: the probe images, the model,
its weights' digest and the augmentation problem.

``build_probe`` reads the planted-factor images, an image folder (lazily, as a Dataset) or,
with ``--data.checkpoint_split``, exactly the probe the training callback used (from the
datamodule a checkpoint records: ``checkpoint_datamodule``). ``build_model`` loads a train.py
checkpoint, torchvision weights (offline) or a random initialisation. Bad input is a ValueError
or FileNotFoundError naming the option to change, before anything is written.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from data import ImageFolderDataModule, PlantedFactorDataModule
from data.common import SPLITS, first_per_class
from lightning_modules import ImageClassifier
from lightning_modules.architectures import build_network
from lightning_modules.weights import (
    file_sha256,
    load_tensors,
    read_weights,
    state_dict_sha256,
    weights_file,
)
from sensitivity.capture import classification_layer
from sensitivity.config import EngineConfig
from sensitivity.plan import hooked_module
from sensitivity.problem import AugmentationProblem
from sensitivity.segments import STREAMS, SegmentNetwork, top_channels
from sensitivity.store import ResultsStore

# Datamodules a checkpoint's recorded init arguments can rebuild (--data.checkpoint_split).
DATAMODULES = (PlantedFactorDataModule, ImageFolderDataModule)
# The options that choose a segment's channels (meaningless without --segment.modules); the
# ranking ones only serve --segment.top_k.
SEGMENT_RANKING = ("from_analysis", "variable", "key", "layer")
SEGMENT_CHOICES = ("channels", "top_k", *SEGMENT_RANKING)


def build_probe(
    cfg: Namespace, partition: bool
) -> tuple[torch.Tensor | Dataset, int, list[str], str]:
    """The probe images of the ``data.*`` options, class-major.

    Args:
        cfg: the parsed options.
        partition: the problem has a partition auxiliary: the probe is split 0 (train)
            followed by split 1 (val).

    Returns:
        (probe, class count, class names, dataset description). The probe is a tensor
        (N, 3, S, S) float32 in [0, 1] for planted data, a lazy Dataset of such images for an
        image folder (decoded in the engine's workers).

    Raises:
        ValueError, FileNotFoundError: options or data that cannot make the probe.
    """
    data, n = cfg.data, cfg.data.images_per_class
    if data.checkpoint_split is not None:
        return _checkpoint_probe(cfg, partition)
    if data.root is None and data.source == "folder":
        raise ValueError(
            "this configuration analyses an image folder: pass --data.root <folder with one "
            "subfolder per class> (e.g. ILSVRC val sorted into class folders)"
        )
    if data.root is None:
        if data.source != "planted":
            raise ValueError(f"data.source must be planted or folder, got {data.source!r}")
        dm = PlantedFactorDataModule(
            factor=data.factor, num_classes=data.num_classes, image_size=data.image_size,
            train_per_class=n, val_per_class=n, seed=data.seed,
        )
        splits = ["train", "val"] if partition else ["val"]
        probe = torch.cat([dm.probe_set(n, split)[0] for split in splits])
        return probe, dm.num_classes, dm.class_names, f"planted:{data.factor}"
    dm = ImageFolderDataModule(
        data.root, image_size=data.image_size, images_per_class=2 * n if partition else n,
        val_fraction=0.5 if partition else 1.0, seed=data.seed,
    )
    parts = []
    for split in ["train", "val"] if partition else ["val"]:
        files = dm.dataset(split)
        labels = torch.tensor(files.labels, dtype=torch.int64)
        index = first_per_class(labels, dm.num_classes, n, f"{data.root} ({split})")
        parts.append(Subset(files, index.tolist()))
    probe = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return probe, dm.num_classes, dm.class_names, str(Path(data.root).expanduser())


def checkpoint_datamodule(path: Path) -> PlantedFactorDataModule | ImageFolderDataModule:
    """The datamodule of the fit that saved a checkpoint.

    Args:
        path: a train.py checkpoint.

    Returns:
        The datamodule rebuilt from the init arguments Lightning records in it
        ("datamodule_hyper_parameters").

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, or one that records no datamodule this program can
            rebuild.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_tensors(path, "checkpoint")
    recorded = checkpoint.get("datamodule_hyper_parameters") if isinstance(checkpoint, dict) else {}
    if not recorded:
        raise ValueError(
            f"checkpoint {path} records no datamodule (it was not saved by a fit with one, as "
            f"train.py's are); describe the probe with the --data options instead of "
            f"--data.checkpoint_split"
        )
    # LightningCLI adds private keys (_class_path, _instantiator); the rest are init arguments.
    arguments = {key: value for key, value in recorded.items() if not key.startswith("_")}
    for datamodule in DATAMODULES:
        if set(arguments) <= set(inspect.signature(datamodule).parameters):
            return datamodule(**arguments)
    raise ValueError(
        f"checkpoint {path} records a datamodule analyze.py cannot rebuild "
        f"({recorded.get('_class_path', sorted(arguments))}); it knows "
        f"{[d.__name__ for d in DATAMODULES]}: describe the probe with the --data options"
    )


def _checkpoint_probe(cfg: Namespace, partition: bool) -> tuple[torch.Tensor, int, list[str], str]:
    """``build_probe`` for --data.checkpoint_split: exactly the SensitivityCallback's probe.

    That is ``probe_set(images_per_class, split)`` of the training datamodule (train then val
    with a partition auxiliary).
    """
    split = cfg.data.checkpoint_split
    if split not in SPLITS:
        raise ValueError(f"--data.checkpoint_split must be one of {list(SPLITS)}, got {split!r}")
    if cfg.checkpoint is None:
        raise ValueError("--data.checkpoint_split takes the probe from the training data recorded "
                         "in a checkpoint: pass --checkpoint too")
    dm = checkpoint_datamodule(Path(cfg.checkpoint).expanduser())
    splits = SPLITS if partition else (split,)
    probe = torch.cat([dm.probe_set(cfg.data.images_per_class, s)[0] for s in splits])
    dataset = (f"planted:{dm.factor}" if isinstance(dm, PlantedFactorDataModule)
               else str(dm.root))
    return probe, dm.num_classes, dm.class_names, dataset


def _weights_classes(arch: str, weights: str, default: int) -> int:
    """Class count of a weights file/enum (its classification head), else ``default``."""
    state, _ = read_weights(arch, weights)
    with torch.device("meta"):  # names only: no memory or compute for the weights
        head = classification_layer(build_network(arch, num_classes=2))
    key = f"{head}.weight"
    value = state.get(key) if hasattr(state, "get") else None
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else default


def build_model(cfg: Namespace, data_classes: int) -> tuple[ImageClassifier, str, str | None]:
    """The model of the --checkpoint, --weights or (neither) a random initialisation.

    Args:
        cfg: the parsed options.
        data_classes: the probe's class count (the head of a random or weights model, unless
            the weights have another).

    Returns:
        (model, architecture, weights description or None for random initialisation).

    Raises:
        FileNotFoundError: a missing checkpoint or weights file.
        ValueError: a file that is not an ImageClassifier checkpoint or state dict of the
            architecture, or --arch that contradicts the checkpoint.
    """
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            model = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
        except (KeyError, TypeError, RuntimeError, EOFError, AttributeError) as error:
            raise ValueError(
                f"{path} is not a Lightning checkpoint of an ImageClassifier ({error}); pass a "
                f"train.py checkpoint, or a torchvision state dict with --weights"
            ) from error
        arch = model.hparams.arch
        if cfg.arch is not None and cfg.arch != arch:
            raise ValueError(
                f"checkpoint {path} holds architecture {arch}, not {cfg.arch}: drop --arch or "
                f"pass a checkpoint of {cfg.arch}"
            )
        return model, arch, f"checkpoint {path}"
    arch = cfg.arch or "resnet18"
    classes = max(2, data_classes)
    if cfg.weights is not None:
        classes = _weights_classes(arch, cfg.weights, classes)
    else:
        print(f"analyze.py: no --checkpoint or --weights: analysing a randomly initialised "
              f"{arch}", file=sys.stderr)
    model = ImageClassifier(arch, num_classes=classes, weights=cfg.weights,
                            small_input=cfg.small_input, image_size=cfg.data.image_size)
    return model, arch, model.weights_source


def weights_sha256(cfg: Namespace, arch: str, model: nn.Module) -> str:
    """SHA-256 of the analysed weights.

    Args:
        cfg: the parsed options.
        arch: the architecture.
        model: the model built from them.

    Returns:
        Hex digest of the --checkpoint or --weights file, else (random initialisation) of the
        model's state dict.
    """
    if cfg.checkpoint is not None:
        return file_sha256(Path(cfg.checkpoint).expanduser())
    if cfg.weights is not None:
        return file_sha256(weights_file(arch, cfg.weights)[0])
    return state_dict_sha256(model)


def build_segment(
    cfg: Namespace,
    model: nn.Module,
    config: EngineConfig,
    image_size: Sequence[int],
    results: Path | None,
) -> tuple[nn.Module, EngineConfig, dict[str, Any]]:
    """What the analysis runs: the model, or with --segment.modules its single-channel segment.

    Args:
        cfg: the parsed options.
        model: the network (an ImageClassifier: its ``.net`` names the modules, its mean and
            std normalise the streams).
        config: the engine settings.
        image_size: (H, W) of the probe images.
        results: the run's results file (--output), where --segment.top_k finds the analysis
            that ranks the channels; None without --output.

    Returns:
        (the module to analyse, its settings, attributes the analysis records). With a segment:
        the ``SegmentNetwork``, the settings with the layers H, S, V (or those of them --layers
        lists), and {"segment": its description with "chosen": how its channels were chosen};
        without one: the model, the settings and {}.

    Raises:
        ValueError, FileNotFoundError: segment options without --segment.modules, channels and
            top_k together, ranking options without top_k, layers that are not streams, a bad
            segment (``SegmentNetwork``), or top_k without the analysis it reads or a bad
            ranking (``top_channels``).
    """
    seg = cfg.segment
    if not seg.modules:
        given = [f"--segment.{name}" for name in SEGMENT_CHOICES if seg[name] is not None]
        if given:
            raise ValueError(f"{given} describe a segment's channels: pass --segment.modules too")
        return model, config, {}
    if seg.channels is not None and seg.top_k is not None:
        raise ValueError("give --segment.channels or --segment.top_k, not both")
    ranking = [f"--segment.{name}" for name in SEGMENT_RANKING if seg[name] is not None]
    if ranking and seg.top_k is None:
        raise ValueError(f"{ranking} rank the channels of --segment.top_k: pass it too")
    root = hooked_module(model)
    channels, chosen = seg.channels, {"by": "all" if seg.channels is None else "hand"}
    if seg.top_k is not None:
        available = SegmentNetwork(root, seg.modules, image_size=image_size).out_channels
        channels, chosen = _ranked_channels(seg, results, available)
    normalize = {"mean": model.mean, "std": model.std} if seg.normalize else {}
    network = SegmentNetwork(root, seg.modules, channels, image_size=image_size, **normalize)
    layers = list(STREAMS) if config.layers is None else list(config.layers)
    outside = [name for name in layers if name not in STREAMS]
    if outside:
        raise ValueError(f"--layers {outside}: a segment's layers are its streams "
                         f"{list(STREAMS)}; list some of them, or none for all three")
    config = dataclasses.replace(config, layers=layers)
    return network, config, {"segment": {**network.describe(), "chosen": chosen}}


def _ranked_channels(
    seg: Namespace, results: Path | None, available: int
) -> tuple[list[int], dict[str, Any]]:
    """--segment.top_k: the channels a stored analysis ranks first, and how they were chosen.

    Args:
        seg: the segment options.
        results: the run's results file, or None.
        available: output channels of the segment's last module.

    Returns:
        (channels, {"by": "top_k", "analysis", "layer", "variable", "key", "top_k",
        "scores"}).
    """
    if results is None or seg.from_analysis is None or seg.variable is None:
        raise ValueError(
            "--segment.top_k ranks the channels of a stored analysis: pass --output (the run "
            "directory whose results file holds it), --segment.from_analysis (its name) and "
            "--segment.variable (the variable whose index ranks them)"
        )
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: --segment.top_k reads "
                                f"--segment.from_analysis from the results file of --output")
    result = ResultsStore(results).read_analysis(seg.from_analysis)
    layer = seg.layer or seg.modules[-1]
    key = seg.key or next((k for k in ("ST", *result.value_keys)
                           if k in result.value_keys), "ST")
    channels, scores = top_channels(result, layer, seg.variable, key, seg.top_k)
    layout = result.unit_layout(layer)
    counted = result.unit_shape(layer)[layout.feature_axis if layout else 0]
    if counted != available:
        raise ValueError(
            f"layer {layer!r} of analysis {seg.from_analysis!r} has {counted} channels, the "
            f"segment's last module {seg.modules[-1]} {available}: rank the channels of the "
            f"same module (--segment.layer)"
        )
    return channels, {"by": "top_k", "analysis": seg.from_analysis, "layer": layer,
                      "variable": seg.variable, "key": key, "top_k": seg.top_k,
                      "scores": scores}


def build_problem(cfg: Namespace, n_classes: int) -> AugmentationProblem:
    """The problem of the ``problem.*`` options over the probe's classes and images.

    Args:
        cfg: the parsed options.
        n_classes: the probe's class count.

    Returns:
        The problem.

    Raises:
        ValueError: an unknown preset, or what ``AugmentationProblem`` refuses.
    """
    pc, ipc = cfg.problem, cfg.data.images_per_class
    if pc.preset is not None:
        if pc.preset != "paper":
            raise ValueError(f"unknown problem preset {pc.preset!r}; valid: paper")
        return AugmentationProblem.paper(
            pc.augmentations, method="shapley" if cfg.method == "shapley" else "sobol",
            auxiliaries=pc.auxiliaries, n_classes=n_classes, images_per_class=ipc,
        )
    return AugmentationProblem(
        pc.augmentations, p_on=pc.p_on, auxiliaries=pc.auxiliaries, n_classes=n_classes,
        images_per_class=ipc, postprocess=pc.postprocess, bounds=pc.bounds,
    )


def device_of(accelerator: str) -> torch.device:
    """The one device masking and single-class run on.

    Args:
        accelerator: --accelerator: auto, cpu, gpu or cuda.

    Returns:
        CUDA when asked for or available under auto, else the CPU.

    Raises:
        ValueError: a GPU without CUDA, or another accelerator.
    """
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {accelerator} but no CUDA device is available")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu"):
        raise ValueError(f"masking runs on one device: --accelerator auto|cpu|gpu, not "
                         f"{accelerator!r}")
    return torch.device("cpu")
