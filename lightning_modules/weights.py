"""Initial weights for torchvision networks: a state-dict file or a weights enum name, offline only.

Nothing here downloads: enum weights are read from the torch hub cache, where torchvision itself
stores them (``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

# Suffixes that mark a weights argument as a file path rather than an enum name.
_FILE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
# What torch.load(weights_only=True) raises on bytes that are no torch file (random or damaged
# data, or pickled objects other than tensors and plain values); a truncated zip archive is a
# RuntimeError (ambiguous in a checkpoint load: also a state-dict mismatch, so not listed).
CORRUPT_FILE_ERRORS = (pickle.UnpicklingError, EOFError, IndexError, UnicodeDecodeError,
                       struct.error)
_HASH_BLOCK = 1 << 20


def unreadable_file(path: str | os.PathLike, what: str) -> ValueError:
    """The error for a file that torch cannot read safely.

    torch's own message advises ``weights_only=False``, which would run code stored in the file:
    this message replaces it, and nothing here ever loads that way.

    Args:
        path: the file.
        what: what it is ("checkpoint", "weights file").

    Returns:
        The ValueError to raise.
    """
    return ValueError(
        f"{what} {path} is not a readable torch file: it is truncated or corrupt, or it holds "
        "Python objects other than tensors and plain values, which are never unpickled here; "
        "pass a file written by torch.save (train.py checkpoints, model.state_dict())"
    )


def load_tensors(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU.

    Args:
        path: a file written by ``torch.save``.
        what: what it is, for the error message.

    Returns:
        The loaded object (tensors and plain values).

    Raises:
        ValueError: not a readable torch file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (*CORRUPT_FILE_ERRORS, RuntimeError):
        raise unreadable_file(path, what) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in blocks: checkpoints can be large).

    Args:
        path: the file.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hex SHA-256 of a module's state dict: every name, dtype, shape and value, in order.

    Identifies weights that have no file of their own (random initialisation, weights during
    training); equal state dicts give equal digests on any device.

    Args:
        module: the module.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hub_cache_file(url: str) -> Path:
    """Where torchvision keeps a downloaded weights file.

    Args:
        url: the weights URL.

    Returns:
        ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def resolve_enum(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """A torchvision weights enum member of an architecture.

    Args:
        arch: a torchvision model name.
        name: a member name ("IMAGENET1K_V1", "DEFAULT") or a qualified one
            ("ResNet18_Weights.IMAGENET1K_V1").

    Returns:
        The enum member.

    Raises:
        ValueError: no weights enum for ``arch``, an unknown name, or another architecture's
            weights.
    """
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise ValueError(f"torchvision has no weights enum for {arch!r}") from err
    choices = [*enum.__members__]
    if "." in name:
        try:
            member = torchvision.models.get_weight(name)
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(
                f"unknown weights {name!r}: not a file and not a torchvision weights name; "
                f"{arch} has {', '.join(choices)}"
            ) from err
        if not isinstance(member, enum):
            raise ValueError(
                f"weights {name!r} belong to another architecture, not {arch!r}; use one of "
                f"{', '.join(choices)}"
            )
        return member
    if name not in enum.__members__:
        raise ValueError(
            f"unknown weights {name!r}: not an existing file and not a weights name of {arch} "
            f"({', '.join(choices)})"
        )
    return enum[name]


def weights_file(arch: str, weights: str | os.PathLike) -> tuple[Path, str]:
    """The file behind a weights argument.

    Args:
        arch: a torchvision model name.
        weights: a state-dict file, or a weights enum name of ``arch`` whose file is looked up
            in the torch hub cache.

    Returns:
        (path, description of the source).

    Raises:
        FileNotFoundError: the file (or the cached enum file) is missing; the enum message
            says where to put it, since nothing is downloaded.
        ValueError: an unknown enum name (``resolve_enum``).
    """
    path = Path(weights)
    if path.is_file():
        return path, f"weights file {path}"
    text = str(weights)
    if path.suffix in _FILE_SUFFIXES or os.sep in text:
        raise FileNotFoundError(f"weights file {text!r} does not exist")
    member = resolve_enum(arch, text)
    cached = hub_cache_file(member.url)
    if not cached.is_file():
        raise FileNotFoundError(
            f"torchvision weights {type(member).__name__}.{member.name} are not in the local torch "
            f"hub cache ({cached}) and this program never downloads (machines may be offline). "
            f"Copy the file from {member.url} to {cached} (or set TORCH_HOME to a directory whose "
            "checkpoints/ folder holds it), or pass weights=<path to a state-dict file>"
        )
    return cached, f"{type(member).__name__}.{member.name} ({cached})"


def read_weights(arch: str, weights: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a plain torchvision state dict from a file or from the hub cache of an enum name.

    Args:
        arch: a torchvision model name.
        weights: as for ``weights_file``.

    Returns:
        (state dict, description of the source).

    Raises:
        FileNotFoundError: as ``weights_file``.
        ValueError: an unknown enum name, or a file that ``torch.load(weights_only=True)``
            cannot read.
    """
    path, source = weights_file(arch, weights)
    return load_tensors(path, "weights file"), source


def _is_head(own: torch.Size, theirs: torch.Size, num_classes: int) -> bool:
    """A classifier tensor that differs only in its class count (first dimension)."""
    return own[:1] == (num_classes,) and theirs[:1] != (num_classes,) and own[1:] == theirs[1:]


def load_network_state(
    net: nn.Module,
    state: object,
    *,
    arch: str,
    num_classes: int,
    replaced: list[str],
    source: str,
) -> list[str]:
    """Load a plain torchvision state dict into a network, in place.

    Tensors whose shapes differ are skipped with a warning when they are the classification
    head and the class count differs, or belong to a module in ``replaced`` (the small-input
    stem).

    Args:
        net: the network.
        state: the state dict read from ``source``.
        arch: the architecture's name, for messages.
        num_classes: the network's class count.
        replaced: modules of the small-input stem (``make_small_input``).
        source: the weights' description, for messages.

    Returns:
        The keys left at their initialisation.

    Raises:
        ValueError: not a name -> tensor mapping, keys missing on either side (another
            architecture), or any other shape difference.
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        hint = (
            " It looks like a Lightning checkpoint: use ImageClassifier.load_from_checkpoint."
            if isinstance(state, Mapping) and "state_dict" in state
            else ""
        )
        raise ValueError(f"{source} is not a plain torchvision state dict (name -> tensor).{hint}")
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = (
            " Its keys start with 'net.': it is an ImageClassifier state dict; save "
            "model.net.state_dict() or use ImageClassifier.load_from_checkpoint."
            if unexpected and all(k.startswith("net.") for k in unexpected)
            else " Was it saved from another architecture?"
        )
        raise ValueError(
            f"{source} does not match architecture {arch!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}.{hint}"
        )
    skipped = []
    for key, value in state.items():
        if value.shape == own[key].shape:
            continue
        in_stem = any(key.startswith(f"{name}.") for name in replaced)
        if not (in_stem or _is_head(own[key].shape, value.shape, num_classes)):
            raise ValueError(
                f"{source} does not match architecture {arch!r}: {key} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}. "
                "Was it saved from another architecture or width?"
            )
        skipped.append(key)
    if skipped:
        warnings.warn(
            f"{source}: kept the initialisation of {skipped} (class count or small-input stem "
            "differs from the file); all other weights were loaded",
            UserWarning,
            stacklevel=3,
        )
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
