"""Shared test setup: W&B offline in a temporary directory, small thread count, fixed seeds."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from helpers import forget_user_augmentations, torch_threads

# Tests never reach the network; set before anything imports wandb.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path_factory, monkeypatch):
    """Every test writes W&B runs under its own temporary directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the summation order of the ``OMP_NUM_THREADS=1``
    subprocesses and of recorded results, hence bitwise equal rows."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a whole module, its module-scoped fixtures included (use it as
    ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``). Small convolutions gain
    nothing from a second thread, and on a few shared cores two threads per process
    oversubscribe them: each forward waits for the other thread's core, many times slower."""
    with torch_threads(1):
        yield


@pytest.fixture
def sample_photos() -> torch.Tensor:
    """sklearn's two sample photographs as a (2, 3, 427, 640) float tensor in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    # copy(): sklearn's arrays are read-only, torch wants writable memory
    return torch.stack(
        [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255.0 for im in images]
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Lightning checkpoint of a randomly initialised 4-class ResNet18 (stock stem, 32 px),
    as train.py saves it; one per test module."""
    # Imported here: most test modules need neither Lightning nor the classifier.
    import pytorch_lightning as pl

    from lightning_modules import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier("resnet18", num_classes=4, small_input=False, image_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def user():
    """tests/user_augmentations.py imported (it registers channel_swap and posterize) for one
    test, forgotten afterwards: the registry is global, and other tests iterate the built-ins."""
    forget_user_augmentations()
    yield importlib.import_module("user_augmentations")
    forget_user_augmentations()
