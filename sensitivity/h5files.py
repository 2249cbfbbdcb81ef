"""Low-level pieces shared by the two kinds of HDF5 files: the results file
(``sensitivity.store``) and the raw-activation files (``sensitivity.activations``).

Format stamps (root attributes ``format``, ``format_version``, ``software_version``,
``created``) and their check; attribute conversion both ways (HDF5 attributes hold neither None
nor Python lists of str); link-name validation; and the atomic publication of a finished file:
written under a temporary sibling name, flushed to disk and renamed over the final name, under
a lock on the directory where writers of one machine must not interleave.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import os
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
COMPLETE = "complete"
WRITING = "writing"
NONE_INT = -1  # epoch, global_step or seed that is not known (HDF5 attributes cannot be None)
STRING_DTYPE = h5py.string_dtype()


def software_version() -> str:
    """The version of this project, for the ``software_version`` stamp.

    Returns:
        The installed package's version, else pyproject.toml's, else "unknown".
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("augsens")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError):
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    return "unknown"


def utc_now() -> str:
    """The current UTC time as ISO 8601 text to the second ("2024-05-01T12:00:00+00:00")."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def check_name(kind: str, name: str) -> str:
    """Validate an analysis, layer or group name for use as an HDF5 link name.

    "/" separates HDF5 paths, so it is refused (torchvision module names never contain it);
    "." inside a name is fine ("features.2"). Names may not be empty, "." or "..", or start
    with "." (reserved for temporary objects).

    Args:
        kind: what the name names, for the error message ("analysis", "layer").
        name: the name to check.

    Returns:
        ``name`` unchanged; ValueError when it is not a valid name.
    """
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name:
        raise ValueError(
            f"invalid {kind} name {name!r}: it must be a non-empty string without '/' that does "
            "not start with '.' (module names such as 'layer1' or 'features.2' are fine)"
        )
    return name


def to_attr(value: Any) -> Any:
    """A Python value as an HDF5 attribute.

    Args:
        value: str, bool, int, float, a numpy scalar, a mapping (stored as sorted JSON text),
            or a list/array of numbers or of str.

    Returns:
        Scalars as they are, lists of str as variable-length string arrays, other lists as
        numpy arrays; ValueError for anything else (None, mixed lists).
    """
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    array = np.asarray(value)
    if array.dtype.kind in "US" or (array.dtype == object and array.size == 0):
        return np.asarray(array, dtype=object).astype(STRING_DTYPE)
    if array.dtype == object:
        raise ValueError(f"cannot store {value!r} as an HDF5 attribute; use str, numbers or lists")
    return array


def from_attr(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value.

    Args:
        value: an attribute as h5py returns it (bytes, numpy scalar or array, str).

    Returns:
        str for bytes, a list of str for string arrays, lists of numbers for numeric arrays,
        Python scalars for numpy scalars; anything else unchanged.
    """
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind == "S":
            return [v.decode() if isinstance(v, bytes) else str(v) for v in value.ravel()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def optional_int(value: Any) -> int | None:
    """An integer attribute, None where it holds ``NONE_INT`` (not known)."""
    value = int(value)
    return None if value == NONE_INT else value


def is_complete(item: Any) -> bool:
    """Whether an HDF5 group or file carries ``status = "complete"``."""
    return from_attr(item.attrs.get("status")) == COMPLETE


# --------------------------------------------------------------------------- atomic files
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Durably replace ``final`` by the closed file ``tmp`` (atomic rename).

    The file and then its directory are flushed, so that after a crash the directory holds
    either the old or the new file, never a name pointing at unwritten data.
    """
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


def temporary_path(final: Path) -> Path:
    """The temporary sibling ``.<file name>.tmp-<uuid>`` a file is written under until
    ``publish`` (the pattern ``ResultsStore.cleanup`` removes)."""
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (serialises writers of one machine)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def stamp_root(f: h5py.File, file_format: str) -> None:
    """Write the format stamps of a new file: format, version, software, creation time."""
    f.attrs["format"] = file_format
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["software_version"] = software_version()
    f.attrs["created"] = utc_now()


def check_format(f: h5py.File, file_format: str, path: Path) -> None:
    """ValueError unless ``f`` is a ``file_format`` file of a version this software reads."""
    found = from_attr(f.attrs.get("format", ""))
    if found != file_format:
        raise ValueError(f"{path} is not an {file_format} file (format attribute {found!r})")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this software reads up to {FORMAT_VERSION}"
        )
