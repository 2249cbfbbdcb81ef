"""Masking at scale: several configurations in one forward, row ranges, prefix reuse, two
processes and resume give exactly the counts of the plain path (the counts are integers).

A small residual network (16 px) with random weights and random maps: its prefix state at the
first masked layer holds two values (the block's input and the masked ReLU's output), so
batching repeats both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fork_ranks
from torch import nn

from sensitivity.masking import (
    GROUP_KIND,
    MaskedNetwork,
    MaskingResult,
    evaluate_masking,
    layer_output_shapes,
)
from sensitivity.store import ResultsStore

SIZE = 16
SIZE_CLI = 32  # test_masking's ResNet18 maps
LAYERS = ["relu1", "conv2"]
COUNTS = ("acc1", "acc5", "unmasked_acc1", "unmasked_acc5", "class_acc1", "class_images",
          "confusion", "unmasked_confusion")
SUFFIX = MaskedNetwork.suffix  # unpatched
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class SkipNet(nn.Module):
    """(B, 3, 16, 16) in [0, 1] -> 4 logits: a stem, then a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.conv2(self.relu1(self.conv1(x)))
        return self.fc(torch.relu(x + y).mean(dim=(2, 3)))


def masking_run(**options) -> MaskingResult:
    """Masking of a random SkipNet on 10 random images, 2 mask variables x 17 configurations,
    2 input augmentations x 2 draws, 3 images per batch; ``options`` go to evaluate_masking."""
    torch.manual_seed(0)
    net = SkipNet().eval()
    shapes = layer_output_shapes(net, LAYERS, (SIZE, SIZE))
    rng = np.random.default_rng(1)
    maps = {layer: rng.random((2, *shape)) for layer, shape in shapes.items()}
    valid = {layer: rng.random(shape) > 0.1 for layer, shape in shapes.items()}
    images = torch.rand(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(10) % 4
    options = {"batch_images": 3, "progress": False, **options}
    return evaluate_masking(net, maps, ["hue", "hflip"], images, labels, ["hue", "hflip"], k=2,
                            valid=valid, **options)


def assert_same_counts(a: MaskingResult, b: MaskingResult) -> None:
    for name in COUNTS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.fixture(scope="module")
def plain() -> MaskingResult:
    """The plain path: one forward per configuration over an input set's rows."""
    return masking_run(batch_rows=0)


class Forwards:
    """Records the suffix forwards (copies, rows) of MaskedNetwork; raises after ``crash``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, crash: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []

        def recorded(network, state, mask, rows=slice(None), copies=1):
            if crash is not None and len(self.calls) == crash:
                raise RuntimeError("killed")
            logits = SUFFIX(network, state, mask, rows, copies)
            self.calls.append((copies, len(logits) // copies))
            return logits

        monkeypatch.setattr(MaskedNetwork, "suffix", recorded)


def test_batched_configurations_and_row_ranges_give_the_plain_counts(plain, monkeypatch):
    forwards = Forwards(monkeypatch)
    batched = masking_run(batch_rows=64)
    # Originals: 3 rows per batch, 21 passes per forward; augmented: 6 rows, 10 passes; the
    # last batch (one image): all 35 passes of the original, 32 of 2 augmented rows.
    assert {(21, 3), (10, 6), (35, 1), (32, 2)} <= set(forwards.calls)
    assert all(copies * rows <= 64 for copies, rows in forwards.calls)
    assert_same_counts(batched, plain)
    forwards.calls.clear()
    ranges = masking_run(batch_rows=4)
    # Originals (3 rows): one configuration per forward; augmented sets (6 rows): row ranges
    # of 4 and 2; the last batch: 4 copies of 1 original (35 passes: 8 x 4 + 3), 2 copies of
    # 2 augmented rows.
    assert set(forwards.calls) == {(1, 3), (1, 4), (1, 2), (4, 1), (3, 1), (2, 2)}
    assert_same_counts(ranges, plain)
    # 10 images x (1 + 2 x 2 inputs) x 35 passes go through the suffix either way.
    assert sum(c * r for c, r in forwards.calls) == 10 * 5 * 35
    assert plain.acc1.std() > 0  # the masks change the counts: the comparison means something


def test_prefix_reuse_gives_the_counts_of_full_forwards(plain):
    full = masking_run(batch_rows=64, reuse_prefix=False)
    assert full.prefix_reuse == "prefix reuse disabled"
    assert plain.prefix_reuse == "prefix up to 'relu1' computed once per batch"
    assert_same_counts(full, plain)


def test_an_interrupted_run_resumes_to_the_uninterrupted_counts(plain, monkeypatch, tmp_path):
    state = tmp_path / "masking.resume.pt"
    Forwards(monkeypatch, crash=40)
    with pytest.raises(RuntimeError, match="killed"):
        masking_run(batch_rows=4, state_path=state, checkpoint_every=15)
    saved = torch.load(state, weights_only=True)
    assert saved["next_block"] == 30  # the last save before the crash at forward 40
    forwards = Forwards(monkeypatch)  # no crash this time
    resumed = masking_run(batch_rows=4, state_path=state, checkpoint_every=15)
    after_resume = len(forwards.calls)
    assert not state.exists()  # removed on completion
    assert_same_counts(resumed, plain)
    masking_run(batch_rows=4)
    # The resumed run did only the forwards after the saved state's 30.
    assert after_resume == len(forwards.calls) - after_resume - 30


def test_a_state_of_other_inputs_is_refused(monkeypatch, tmp_path):
    state = tmp_path / "masking.resume.pt"
    Forwards(monkeypatch, crash=12)
    with pytest.raises(RuntimeError, match="killed"):
        masking_run(batch_rows=4, state_path=state, checkpoint_every=5)
    before = state.read_bytes()
    with pytest.raises(ValueError, match=r"differs in: seed \(saved 0, now 1\)"):
        masking_run(batch_rows=4, state_path=state, checkpoint_every=5, seed=1)
    with pytest.raises(ValueError, match=r"settings\.batch_rows \(saved 4, now 8\)"):
        masking_run(batch_rows=8, state_path=state, checkpoint_every=5)
    assert state.read_bytes() == before  # a refusal leaves the saved work alone
    state.write_bytes(b"not a state")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        masking_run(batch_rows=4, state_path=state, checkpoint_every=5)


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    """One rank of a gloo group: a batched run killed after 25 forwards, then resumed."""
    torch.set_num_threads(1)
    state = Path(out).with_suffix(".resume.pt")
    calls = []

    def crashing(network, state_, mask, rows=slice(None), copies=1):
        if len(calls) == 25:
            raise RuntimeError("killed")
        calls.append(copies)
        return SUFFIX(network, state_, mask, rows, copies)

    MaskedNetwork.suffix = crashing
    try:
        masking_run(batch_rows=16, state_path=state, checkpoint_every=10)
    except RuntimeError:
        pass
    MaskedNetwork.suffix = SUFFIX
    saved = torch.load(state.with_name(f"{state.stem}.rank{rank}-of-2{state.suffix}"),
                       weights_only=True)
    assert saved["next_block"] == 20 and saved["fields"]["rank"] == rank
    result = masking_run(batch_rows=16, state_path=state, checkpoint_every=10)
    if rank == 0:
        np.savez(out, **{name: getattr(result, name) for name in COUNTS})


@pytest.mark.slow
def test_two_processes_resumed_give_the_single_process_counts(plain, tmp_path):
    out = tmp_path / "ddp.npz"
    fork_ranks(_ddp_worker, 2, str(out))
    ddp = np.load(out)
    for name in COUNTS:
        np.testing.assert_array_equal(ddp[name], getattr(plain, name), err_msg=name)
    assert not list(tmp_path.glob("*.pt"))  # every rank removed its state file


@pytest.mark.slow
def test_cli_resumes_a_killed_masking_run(checkpoint, tmp_path, monkeypatch):
    from test_masking import cli, write_results

    results = write_results(tmp_path / "results.h5")
    options = ("--analysis", "sobol", "--masking.variables", "[hue]", "--no_masking.cluster",
               "--masking.layers", "[layer3, layer4]")
    Forwards(monkeypatch, crash=20)
    with pytest.raises(RuntimeError, match="killed"):
        cli(checkpoint, results, *options, "--masking.checkpoint_every", "8")
    state = tmp_path / "sobol.masking.resume.pt"
    assert torch.load(state, weights_only=True)["next_block"] == 16
    forwards = Forwards(monkeypatch)
    assert cli(checkpoint, results, *options, "--masking.checkpoint_every", "8") == 0
    assert not state.exists()
    resumed_forwards = len(forwards.calls)
    assert cli(checkpoint, results, *options, "--name", "whole") == 0
    assert len(forwards.calls) - resumed_forwards == resumed_forwards + 16
    store = ResultsStore(results)
    resumed = store.read_result(MaskingResult, GROUP_KIND, "sobol")
    whole = store.read_result(MaskingResult, GROUP_KIND, "whole")
    assert_same_counts(resumed, whole)


@pytest.mark.slow
def test_cli_two_processes_give_the_single_process_counts(checkpoint, tmp_path):
    from test_masking import cli, write_results

    results = write_results(tmp_path / "results.h5")
    args = ["--analysis", "sobol", "--masking.variables", "[hue]", "--no_masking.cluster",
            "--masking.layers", "[layer3, layer4]", "--no_wandb", "--no_progress"]
    assert cli(checkpoint, results, *args, "--name", "one") == 0
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "analyze.py"), "masking", "--checkpoint", str(checkpoint),
         "--results", str(results), "--data.image_size", str(SIZE_CLI), "--images-per-class",
         "2", "--small_input", "false", "--accelerator", "cpu", "--masking.k", "1", *args,
         "--name", "two", "--devices", "2", "--strategy", "ddp"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # really two processes
    store = ResultsStore(results)
    one = store.read_result(MaskingResult, GROUP_KIND, "one")
    two = store.read_result(MaskingResult, GROUP_KIND, "two")
    assert_same_counts(one, two)
    assert two.n_images == 8 and one.class_images.sum() == 8 * 3
