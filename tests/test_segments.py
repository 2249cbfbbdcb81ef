"""Single-channel segments (sensitivity/segments.py, ``analyze.py --segment.*``): HSV, the
streams of a hand-built one-convolution segment against a direct computation, top-k channels
from a stored analysis, resume, a ResNet18 segment through analyze.py on one process and two,
and bad input."""

from __future__ import annotations

import colorsys
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from helpers import cli
from matplotlib.colors import rgb_to_hsv as matplotlib_rgb_to_hsv
from torch import nn
from wandb_records import assert_sobol_summary_logged, history_row, read_wandb_records

from lightning_modules import ImageClassifier
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.layouts import UnitLayout
from sensitivity.plan import plan_analysis
from sensitivity.problem import AugmentationProblem
from sensitivity.results import AnalysisResult
from sensitivity.segments import STREAMS, SegmentNetwork, rgb_to_hsv, top_channels
from sensitivity.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16
# Hue moves H, saturation S, brightness V (and, where a channel clips, the others).
AUGS = ["hue", "saturation", "brightness"]
# ResNet18 of the demo (small-input stem at 32 px, random weights seeded by --seed): its stem
# with channels 0, 5 and 9 of the ReLU; channel-mean units.
SEGMENT = ["--segment.modules", "[conv1, bn1, relu]", "--segment.channels", "[0, 5, 9]"]
DEMO = ["--data.image_size", "32", "--images-per-class", "2", "--accelerator", "cpu",
        "--no_progress"]

# Small n on purpose: these tests check what is computed, not how precisely.
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"),
              pytest.mark.filterwarnings("ignore::sensitivity.plan.SmallSampleWarning")]


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    """1 class x 4 colourful 16 px images in [0, 1], with gray and black corners."""
    g = torch.Generator().manual_seed(0)
    images = (0.6 * torch.rand(4, 3, 1, 1, generator=g)
              + 0.4 * torch.rand(4, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    images[:, :, :2, :2] = 0.5
    images[:, :, -2:, -2:] = 0.0
    return images


@pytest.fixture(scope="module")
def problem() -> AugmentationProblem:
    return AugmentationProblem(AUGS, auxiliaries=["order", "image"], images_per_class=4)


class Crash(nn.Module):
    """Identity that raises on the ``fail_after``-th batch forward (the dry forwards of at
    most 3 images do not count): a crash mid-analysis."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.fail_after, self.batches = fail_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3:
            self.batches += 1
            if self.batches == self.fail_after:
                raise RuntimeError("simulated crash")
        return x


def sum_network(crash: Crash | None = None) -> nn.Sequential:
    """One 1x1 convolution: channel 0 sums the input channels, channel 1 is red - green (0 on
    a stream: its three channels are equal); then a ReLU (and a ``Crash``)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]]).view(2, 3, 1, 1))
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), crash=crash or Crash()))


def sum_segment(modules: tuple[str, ...] = ("conv", "relu", "crash"), crash: Crash | None = None,
                ) -> SegmentNetwork:
    """The channel-sum segment: each stream's unit is 3 x that HSV channel."""
    return SegmentNetwork(sum_network(crash), list(modules), [0], image_size=SIZE)


def reference_hsv(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) -> (B, H, W, 3) float64 HSV by matplotlib."""
    return matplotlib_rgb_to_hsv(images.permute(0, 2, 3, 1).double().numpy())


class ReferenceStreams(nn.Module):
    """3 x H, S and V by matplotlib (numpy), through identity modules named as the streams:
    an evaluation of the segment's function that shares none of its code."""

    def __init__(self) -> None:
        super().__init__()
        for name in STREAMS:
            self.add_module(name, nn.Identity())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hsv = torch.from_numpy(3 * reference_hsv(images)).float()
        return tuple(getattr(self, name)(hsv[..., [s]].permute(0, 3, 1, 2))
                     for s, name in enumerate(STREAMS))


def analyse(model: nn.Module, problem, probe, **settings) -> AnalysisResult:
    config = EngineConfig(layers=list(STREAMS), progress=False, **settings)
    return run_analysis(model, problem, probe, config)


# ------------------------------------------------------------------------------------ HSV
def test_rgb_to_hsv_equals_matplotlib_and_colorsys():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 8, 8, generator=g)
    images[0, :, 0, :4] = torch.tensor([0.5, 0.0, 1.0]).view(3, 1)  # gray, black, white
    images[0, :, 1, 0] = torch.tensor([0.8, 0.8, 0.2])  # ties of the maximum: red = green
    images[0, :, 1, 1] = torch.tensor([0.2, 0.8, 0.8])  # green = blue
    images[0, :, 1, 2] = torch.tensor([0.8, 0.2, 0.8])  # red = blue
    images[0, :, 1, 3] = torch.tensor([1.0, 0.0, 1e-7])  # hue just below 1 (wraps to ~1)
    ours = rgb_to_hsv(images).permute(0, 2, 3, 1).double().numpy()
    expected = reference_hsv(images)
    hue_gap = np.abs(ours[..., 0] - expected[..., 0])
    assert np.minimum(hue_gap, 1 - hue_gap).max() < 1e-6  # hue is an angle: 0 == 1
    np.testing.assert_allclose(ours[..., 1:], expected[..., 1:], atol=1e-6)
    pixels = images[0].permute(1, 2, 0).reshape(-1, 3).double().tolist()
    for pixel, hsv in zip(pixels[:12], ours[0].reshape(-1, 3)[:12], strict=True):
        np.testing.assert_allclose(hsv, colorsys.rgb_to_hsv(*pixel), atol=1e-6)
    assert (ours >= 0).all() and (ours < 1 + 1e-7).all()


# ------------------------------------------------------------------------------- streams
def test_channel_sum_streams_are_three_times_each_hsv_channel(probe):
    segment = SegmentNetwork(sum_network(), ["conv", "relu"], [0, 1], image_size=SIZE)
    h, s, v = segment(probe)
    expected = torch.from_numpy(3 * reference_hsv(probe)).float().permute(0, 3, 1, 2)
    for stream, channel in zip((h, s, v), range(3), strict=True):
        assert stream.shape == (4, 2, SIZE, SIZE)
        torch.testing.assert_close(stream[:, 0], expected[:, channel], atol=1e-5, rtol=1e-5)
        assert not stream[:, 1].any()  # red - green of a stream's repeated channel: 0
    # With the network's normalisation each repeated stream is normalised per channel.
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.5])
    normalised = SegmentNetwork(sum_network(), ["conv"], [0], mean=mean, std=std,
                                image_size=SIZE)
    for stream, channel in zip(normalised(probe), range(3), strict=True):
        value = expected[:, channel] / 3
        torch.testing.assert_close(stream[:, 0], ((value[:, None] - mean.view(3, 1, 1))
                                                  / std.view(3, 1, 1)).sum(1), atol=1e-5,
                                   rtol=1e-5)
    assert normalised.describe() == {"modules": ["conv"], "channels": [0], "out_channels": 2,
                                     "streams": ["H", "S", "V"], "normalized": True}


def test_stream_variances_and_sobol_indices_equal_a_direct_computation(problem, probe):
    """Sobol' over i.i.d. base points: the engine's var, index_variance, S1 and ST of each
    stream equal METHOD.md section 5's formulas (SALib's) on 3 x the matplotlib HSV channel
    means of the augmented design rows."""
    n, segment = 64, sum_segment()
    config = EngineConfig(method="sobol", n=n, sampling="mc", layers=list(STREAMS),
                          reduction="channel_mean", progress=False)
    plan = plan_analysis(segment, problem, probe, config)
    result = run_analysis(segment, problem, probe, config, plan=plan)
    rows = plan.design.rows(0, plan.design.n_blocks)
    decoded = problem.decode(rows, SIZE, SIZE)
    augmented = problem.augment(probe[decoded.image_index], decoded)
    y = 3 * reference_hsv(augmented).mean(axis=(1, 2))  # (rows, stream)
    g = len(problem.group_names)
    blocks = y.reshape(n, g + 2, 3)  # rows A, AB_0 ... AB_{G-1}, B of each base point
    a, ab, b = blocks[:, 0], blocks[:, 1:-1], blocks[:, -1]
    variance = np.var(np.concatenate([a, b]), axis=0)
    s1 = np.mean((b - y.mean(axis=0))[:, None] * (ab - a[:, None]), axis=0) / variance
    st = 0.5 * np.mean((a[:, None] - ab) ** 2, axis=0) / variance
    for s, name in enumerate(STREAMS):
        layer = result.layers[name]
        np.testing.assert_allclose(layer["var"], [y[:, s].var()], rtol=1e-5)
        np.testing.assert_allclose(layer["index_variance"], [variance[s]], rtol=1e-5)
        np.testing.assert_allclose(layer["S1"][:, 0], s1[:, s], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer["ST"][:, 0], st[:, s], rtol=1e-4, atol=1e-6)
    st = {name: dict(zip(problem.group_names, result.layers[name]["ST"][:, 0], strict=True))
          for name in STREAMS}
    # Each stream is driven most by its own augmentation, and a hue shift keeps S and V.
    for stream, augmentation in zip(STREAMS, AUGS, strict=True):
        assert max(AUGS, key=st[stream].__getitem__) == augmentation
    assert st["S"]["hue"] < 0.02 and st["V"]["hue"] < 0.02


@pytest.mark.parametrize("method", ["variance", "shapley", "sobol"])
def test_segment_equals_an_independent_evaluation_on_the_design(problem, probe, method):
    """Full maps (1, H, W) per stream: every array and flag equals the same analysis of
    matplotlib's HSV on the same design."""
    settings = {"method": method, "n": 16, "reduction": "none"}
    ours = analyse(sum_segment(), problem, probe, **settings)
    reference = analyse(ReferenceStreams(), problem, probe, **settings)
    assert ours.layer_names == list(STREAMS)
    for name in STREAMS:
        assert ours.unit_shape(name) == (1, SIZE, SIZE)
        np.testing.assert_array_equal(ours.flags[name], reference.flags[name])
        for key, value in reference.layers[name].items():
            np.testing.assert_allclose(ours.layers[name][key], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name}/{key}")


def test_a_segment_resumes_and_refuses_another_segments_state(problem, probe, tmp_path):
    settings = {"method": "sobol", "n": 16, "batch_rows": 16, "checkpoint_every": 1,
                "reduction": "channel_mean"}
    reference = analyse(sum_segment(), problem, probe, **settings)
    state = tmp_path / "state.pt"
    config = EngineConfig(layers=list(STREAMS), progress=False, **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(sum_segment(crash=Crash(fail_after=4)), problem, probe, config,
                     state_path=state)
    assert torch.load(state, weights_only=True)["next_block"] == 6  # 3 batches of 2 blocks
    # Same weights, same unit shapes, another segment (without the ReLU): refused.
    with pytest.raises(ValueError, match=r"differs in: model"):
        run_analysis(sum_segment(("conv", "crash")), problem, probe, config, state_path=state)
    crash = Crash()
    resumed = run_analysis(sum_segment(crash=crash), problem, probe, config, state_path=state)
    assert crash.batches == 8 - 3 and not state.exists()
    for name in STREAMS:
        for key, value in reference.layers[name].items():
            np.testing.assert_allclose(resumed.layers[name][key], value, rtol=1e-12)


# ---------------------------------------------------------------------------------- top k
def ranked_result() -> AnalysisResult:
    """A Sobol' result of layer "relu": 4 channel maps (2 x 2) of variables hue and order."""
    st = np.zeros((2, 4, 2, 2))
    st[0] = np.array([0.5, 0.9, 0.7, 0.2])[:, None, None]
    st[0, 1, 0, 0] = 0.1  # channel 1: mean over its valid positions 0.9, one flagged
    st[0, 3] = [[0.8, 0.8], [0.8, 0.8]]  # channel 3 first by value, but every unit flagged
    flags = np.zeros((4, 2, 2), dtype=np.uint8)
    flags[1, 0, 0] = 2
    flags[3] = 3
    return AnalysisResult("sobol", ["hue", "order"], {"relu": {"S1": st, "ST": st}}, n=8,
                          evaluations=32, flags={"relu": flags})


def test_top_channels_picks_the_largest_valid_units():
    result = ranked_result()
    assert top_channels(result, "relu", "hue", "ST", 3) == ([1, 2, 0], [0.9, 0.7, 0.5])
    with pytest.raises(ValueError, match=r"only 3 channels .* top_k <= 3"):
        top_channels(result, "relu", "hue", "ST", 4)
    # Channels last (NHWC): the same ranking.
    nhwc = np.moveaxis(result.layers["relu"]["ST"], 1, -1)
    moved = AnalysisResult("sobol", ["hue", "order"], {"relu": {"ST": nhwc}}, n=8,
                           evaluations=32, flags={"relu": np.moveaxis(result.flags["relu"], 0,
                                                                      -1)},
                           layouts={"relu": UnitLayout("nhwc", "none")})
    assert top_channels(moved, "relu", "hue", "ST", 2)[0] == [1, 2]
    for args, message in [
        (("fc", "hue", "ST", 1), r"no layer 'fc'; layers: \['relu'\]"),
        (("relu", "blur", "ST", 1), r"no variable 'blur'; variables: \['hue', 'order'\]"),
        (("relu", "hue", "shapley", 1), r"no per-variable key 'shapley'; keys: \['S1', 'ST'\]"),
        (("relu", "hue", "ST", 0), r"top_k must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            top_channels(result, *args)


@pytest.mark.slow
def test_top_k_channels_come_from_a_stored_analysis(tmp_path, capsys):
    run = tmp_path / "run"
    stem = ["--layers", "[relu]", "--n", "8", *DEMO, "--no_wandb", "--output", run]
    assert cli("sobol", *stem) == 0
    stored = ResultsStore(run / "results.h5").read_analysis("sobol")
    expected, scores = top_channels(stored, "relu", "grayscale", "ST", 4)
    assert cli("sobol", *stem[2:], "--segment.modules", "[conv1, bn1, relu]",
               "--segment.top_k", "4", "--segment.from_analysis", "sobol",
               "--segment.variable", "grayscale") == 0
    store = ResultsStore(run / "results.h5")
    assert store.analyses() == ["sobol", "sobol_segment"]
    recorded = json.loads(store.analysis_attrs("sobol_segment")["segment"])
    assert recorded == {
        "modules": ["conv1", "bn1", "relu"], "channels": expected, "out_channels": 64,
        "streams": ["H", "S", "V"], "normalized": True,
        "chosen": {"by": "top_k", "analysis": "sobol", "layer": "relu", "variable": "grayscale",
                   "key": "ST", "top_k": 4, "scores": scores},
    }
    assert not stored.flags["relu"][expected].any()
    assert store.read_analysis("sobol_segment").unit_shape("V") == (4,)
    capsys.readouterr()
    # The stored layer must have the segment's channels.
    assert cli("sobol", *stem[2:], "--segment.modules", "[conv1, bn1, relu, layer1, layer2]",
               "--segment.top_k", "2", "--segment.from_analysis", "sobol",
               "--segment.variable", "grayscale", "--segment.layer", "relu", "--name",
               "deeper") == 2
    assert "has 64 channels, the segment's last module layer2 128" in capsys.readouterr().err
    # Masking runs the whole network: an analysis of a segment is refused, naming why.
    assert cli("masking", "--results", run / "results.h5", "--analysis", "sobol_segment",
               *DEMO, "--no_wandb") == 2
    assert "analysed a single-channel segment" in capsys.readouterr().err


# ------------------------------------------------------------------------- analyze.py
def wandb_row(run_dir: Path) -> dict:
    """The one logged row of the offline W&B run in a run directory."""
    wandb.teardown()  # closes (flushes) the run's .wandb file, as a process exit does
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    (row,) = [history_row(r.history) for r in read_wandb_records(log) if r.HasField("history")]
    return row


@pytest.mark.slow
def test_demo_segment_on_two_processes_equals_one(tmp_path, one_thread):
    # 8 base points of 10 rows, 4 per batch: rank 0 takes blocks 0-3, rank 1 blocks 4-7, so
    # both runs forward the same batches and differ only in float64 summation order.
    args = ["sobol", *SEGMENT, "--n", "8", "--batch_rows", "40", *DEMO]
    assert cli(*args, "--output", tmp_path / "one", quiet=True) == 0
    ddp = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), *args, "--output", str(ddp), "--devices",
         "2", "--strategy", "ddp", "--no_wandb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # really two processes
    one = ResultsStore(tmp_path / "one" / "results.h5")
    two = ResultsStore(ddp / "results.h5")
    a, b = one.read_analysis("sobol_segment"), two.read_analysis("sobol_segment")
    assert a.layer_names == b.layer_names == list(STREAMS)
    assert a.unit_shape("H") == (3,) and a.evaluations == b.evaluations == 80
    for name in STREAMS:
        np.testing.assert_array_equal(a.flags[name], b.flags[name])
        for key, value in a.layers[name].items():
            np.testing.assert_allclose(b.layers[name][key], value, rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name}/{key}")
    recorded = json.loads(one.analysis_attrs("sobol_segment")["segment"])
    assert recorded == json.loads(two.analysis_attrs("sobol_segment")["segment"])
    assert recorded["channels"] == [0, 5, 9] and recorded["chosen"] == {"by": "hand"}
    assert (tmp_path / "one" / "figures" / "sobol_segment_ST.png").stat().st_size > 0
    assert_sobol_summary_logged(wandb_row(tmp_path / "one"), a.summary(), list(STREAMS),
                                next((tmp_path / "one" / "wandb").glob("offline-run-*"))
                                / "files")


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return ImageClassifier("resnet18", num_classes=4, small_input=True, image_size=32).net


@pytest.mark.parametrize(("modules", "channels", "message"), [
    (["conv1", "bn2"], None, r"unknown segment module\(s\) \['bn2'\]; valid names: conv1, bn1"),
    (["conv1", "conv1"], None, r"repeat a name"),
    (["layer1", "layer1.0"], None, r"\[\('layer1', 'layer1.0'\)\] are nested"),
    (["bn1", "conv1"], None, r"not in the network's order \(\['conv1', 'bn1'\]\)"),
    (["relu"], None, r"has no convolution"),
    (["layer1.0"], None, r"does not start at the network's input: .* takes 64 channels"),
    (["conv1", "layer3"], None, r"do not chain: layer3 \(Sequential\) cannot take "
                                r"\(1, 64, 32, 32\)"),
    (["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"], None,
     r"do not chain: fc \(Linear\)"),
    (["conv1"], [3, 64], r"channels \[64\] are out of range: conv1 has 64 output channels "
                         r"\(0 to 63\)"),
    (["conv1"], [1, 1], r"repeat a channel"),
    (["conv1"], [], r"channels are empty"),
    ("conv1", None, r"needs a list of module names"),
])
def test_bad_segments_are_refused_naming_the_fix(resnet, modules, channels, message):
    with pytest.raises(ValueError, match=message):
        SegmentNetwork(resnet, modules, channels, image_size=32)


def test_a_segment_must_end_with_a_map():
    flat = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), flatten=nn.Flatten()))
    with pytest.raises(ValueError, match=r"ends with output \(1, 784\); .* NCHW"):
        SegmentNetwork(flat, ["conv", "flatten"], image_size=SIZE)


@pytest.mark.parametrize(("extra", "message"), [
    (["--segment.channels", "[1]"], r"\['--segment.channels'\] describe a segment's channels: "
                                    r"pass --segment.modules too"),
    ([*SEGMENT, "--segment.top_k", "2"], r"--segment.channels or --segment.top_k, not both"),
    ([*SEGMENT, "--segment.variable", "hue"], r"\['--segment.variable'\] rank the channels of "
                                              r"--segment.top_k: pass it too"),
    ([*SEGMENT, "--layers", "[H, layer1]"], r"--layers \['layer1'\]: a segment's layers are "
                                            r"its streams \['H', 'S', 'V'\]"),
    (["--segment.modules", "[conv1]", "--segment.top_k", "2"], r"pass --output .*"
                                                               r"--segment.from_analysis"),
])
def test_bad_segment_options_exit_2_before_any_output(extra, message, tmp_path, capsys):
    assert cli("sobol", *DEMO, "--runs_dir", tmp_path, "--no_wandb", *extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not any(tmp_path.iterdir())
