"""Plain helpers shared by the test modules; the fixtures built on them live in conftest.py.

Import them by name (``from helpers import cli``): pytest puts tests/ on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli(*args: object, quiet: bool = False) -> int:
    """``analyze.main`` on ``args`` (made strings) in this process; its exit status.

    quiet: discard what it prints to stdout (stderr still reaches pytest); otherwise the
    output stays readable through ``capsys``.
    """
    import analyze  # here: modules that only need requires_cuda skip Lightning's import

    argv = [str(a) for a in args]
    if not quiet:
        return analyze.main(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        return analyze.main(argv)


def requires_cuda(test: T) -> T:
    """Mark ``test`` (a function or class) ``gpu`` and skip it, with a reason, where no CUDA
    device is present: ``pytest -m gpu`` selects every test that needs one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))



USER_AUGMENTATIONS = ("channel_swap", "posterize")  # what tests/user_augmentations.py registers


def forget_user_augmentations() -> None:
    """What a fresh process knows: no user registration, tests/user_augmentations.py not
    imported (importing it again registers its augmentations again)."""
    import sys

    from sensitivity.augmentations import AUGMENTATIONS, unregister_augmentation

    for name in USER_AUGMENTATIONS:
        if name in AUGMENTATIONS:
            unregister_augmentation(name)
    sys.modules.pop("user_augmentations", None)
