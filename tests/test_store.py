"""ResultsStore round trips, crash safety under SIGKILL, ActivationWriter and merge_shards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from sensitivity.activations import ActivationWriter, merge_shards
from sensitivity.problem import AugmentationProblem
from sensitivity.provenance import describe_differences, provenance
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ["erasing", "rolling", "order"]
# float32 storage: relative rounding error <= 2**-24.
F32_RTOL = 1e-7


def synthetic_result(seed: int = 0, epoch: int | None = 3) -> AnalysisResult:
    rng = np.random.default_rng(seed)
    g = len(GROUPS)
    layers = {}
    for layer, unit in (("layer1", (4, 3, 3)), ("fc", (5,))):
        layers[layer] = {
            "S1": rng.uniform(-0.05, 1, (g, *unit)),
            "ST": rng.uniform(0, 1, (g, *unit)),
            "S1_conf": rng.uniform(0, 0.1, (g, *unit)),
            "ST_conf": rng.uniform(0, 0.1, (g, *unit)),
            "S2": rng.normal(0, 0.1, (g, g, *unit)),
            "mean": rng.normal(size=unit),
            "var": rng.uniform(0, 2, unit),
        }
    return AnalysisResult(
        method="sobol", group_names=GROUPS, layers=layers, n=64, evaluations=64 * 5,
        seconds=1.5, epoch=epoch, global_step=None if epoch is None else 10 * epoch,
        n_constant={"layer1": 2},
        flags={"layer1": rng.choice([0, 0, 0, 1, 2, 3], size=(4, 3, 3)).astype(np.uint8)},
        interval="delta method over 8 replicates, Student t (7 df)", replicates=8,
        toggles={"erasing": 30, "rolling": 48},
    )


def test_round_trip_through_plain_h5py_and_read_analysis(tmp_path):
    store = ResultsStore(tmp_path / "run" / "results.h5")
    assert store.analyses() == []
    result = synthetic_result()
    store.write_analysis("epoch_0003", result, attrs={"design": "sobol", "reduction": "none"})
    store.write_analysis("final", synthetic_result(1, epoch=None))
    assert store.analyses() == ["epoch_0003", "final"]
    assert store.has_analysis("final") and not store.has_analysis("epoch_0004")

    # The layout of docs/RESULTS_FORMAT.md, read with h5py alone.
    with h5py.File(store.path, "r") as f:
        assert f.attrs["format"] == "augsens-results" and f.attrs["format_version"] == 1
        g = f["analyses/epoch_0003"]
        assert g.attrs["status"] == "complete" and g.attrs["method"] == "sobol"
        assert g.attrs["n"] == 64 and g.attrs["evaluations"] == 320
        assert g.attrs["epoch"] == 3 and g.attrs["global_step"] == 30
        assert g.attrs["seconds"] == 1.5 and g.attrs["design"] == "sobol"
        assert list(g.attrs["group_names"]) == GROUPS
        assert list(g.attrs["layers"]) == ["layer1", "fc"]
        assert list(f["analyses/final"].attrs["layers"]) == ["layer1", "fc"]
        assert f["analyses/final"].attrs["epoch"] == -1
        layer = g["layer1"]
        assert list(layer.attrs["unit_shape"]) == [4, 3, 3] and layer.attrs["n_constant"] == 2
        assert layer["S1"].dtype == np.float32 and layer["S1"].shape == (3, 4, 3, 3)
        assert layer["S2"].shape == (3, 3, 4, 3, 3) and layer["var"].shape == (4, 3, 3)
        np.testing.assert_array_equal(
            g["fc/ST"][()], result.layers["fc"]["ST"].astype(np.float32)
        )
        # Unit flags, and the counts and share of valid units behind the summaries.
        assert layer["flag"].dtype == np.uint8
        np.testing.assert_array_equal(layer["flag"][()], result.flags["layer1"])
        assert layer.attrs["n_valid"] == np.count_nonzero(result.flags["layer1"] == 0)
        assert layer.attrs["valid_fraction"] == pytest.approx(
            np.mean(result.flags["layer1"] == 0)
        )
        assert g["fc"].attrs["valid_fraction"] == 1.0
        assert g.attrs["replicates"] == 8 and "Student t" in g.attrs["interval"]
        assert list(g.attrs["toggles"]) == [30, 48, -1]  # -1: not counted

    back = store.read_analysis("epoch_0003")
    assert back.allclose(result, rtol=F32_RTOL)
    assert back.n_constant == {"layer1": 2, "fc": 0}
    np.testing.assert_array_equal(back.flags["layer1"], result.flags["layer1"])
    assert back.toggles == result.toggles and back.replicates == 8
    assert back.layer_names == ["layer1", "fc"] and back.layers["fc"]["S1"].dtype == np.float64
    assert store.read_analysis("final").epoch is None
    assert store.analysis_attrs("epoch_0003")["reduction"] == "none"


def test_metadata_and_problem_attributes(tmp_path):
    store = ResultsStore(tmp_path / "results.h5")
    problem = AugmentationProblem(1, n_classes=4, images_per_class=2)
    store.write_metadata(model="resnet18", dataset="planted:colour", image_size=64, seed=7,
                         config={"trainer": {"max_epochs": 2}}, problem=problem,
                         attrs={"class_names": ["a", "b", "c", "d"]})
    store.write_analysis("final", synthetic_result())
    with h5py.File(store.path, "r") as f:
        assert f.attrs["model"] == "resnet18" and f.attrs["weights"] == "none"
        assert f.attrs["seed"] == 7 and list(f.attrs["image_size"]) == [64, 64]
        assert yaml.safe_load(f.attrs["config"]) == {"trainer": {"max_epochs": 2}}
        assert f.attrs["software_version"] and f.attrs["created"].endswith("+00:00")
        p = f["problem"].attrs
        assert list(p["group_names"]) == problem.group_names
        assert list(p["variables"]) == problem.column_names
        assert p["bounds"].shape == (problem.d, 2) and p["set"] == 1
        assert list(p["p_on"]) == [0.5] * 5 and p["n_classes"] == 4
    meta = store.read_metadata()
    assert meta["class_names"] == ["a", "b", "c", "d"] and meta["dataset"] == "planted:colour"
    assert AugmentationProblem.from_config(
        yaml.safe_load(meta["problem"]["config"])
    ).column_names == problem.column_names
    # Metadata written after an analysis keeps it.
    store.write_metadata(model="resnet18", dataset="planted:colour", image_size=(64, 48), seed=7)
    assert store.analyses() == ["final"] and store.read_metadata()["image_size"] == [64, 48]


def test_differences_name_each_differing_leaf():
    saved = {"config": {"seed": 5, "n": 8}, "layers": ["layer1", "fc"], "model": "a" * 64}
    now = {"config": {"seed": 3, "n": 8}, "layers": ["layer1", "layer3"], "model": "a" * 63 + "b"}
    assert describe_differences(saved, now) == (
        'config.seed (saved 5, now 3); layers (saved ["layer1", "fc"], now ["layer1", '
        '"layer3"]); '
        f"model (saved {'a' * 16}...{'a' * 16}, now {'a' * 16}...{'a' * 15}b)"
    )
    assert describe_differences(saved, saved) == ""
    assert describe_differences({"size": (32, 32)}, {"size": [32, 32]}) == ""
    missing = describe_differences({"a": 1}, {"b": 1})
    assert missing == "a (saved 1, now absent); b (saved absent, now 1)"
    many = describe_differences(dict.fromkeys("abcdefg", 0), dict.fromkeys("abcdefg", 1))
    assert many.endswith("e (saved 0, now 1); and 2 more")


def test_provenance_differences_against_the_root_metadata(tmp_path):
    store = ResultsStore(tmp_path / "results.h5")
    set2 = AugmentationProblem(2, n_classes=4, images_per_class=2)
    record = provenance(model="resnet18", weights="checkpoint /a/last.ckpt",
                        weights_sha256="1" * 64, dataset="planted:colour", image_size=64,
                        problem=set2)
    assert store.provenance_differences(record) == ""  # no file yet
    store.write_metadata(model="resnet18", weights="checkpoint /a/last.ckpt",
                         weights_sha256="1" * 64, dataset="planted:colour", image_size=64,
                         seed=0, problem=set2)
    assert store.read_metadata()["weights_sha256"] == "1" * 64
    moved = {**record, "weights": "checkpoint /b/last.ckpt"}  # same digest: same weights
    assert store.provenance_differences(moved) == ""
    other = provenance(model="alexnet", weights=None, weights_sha256="2" * 64,
                       dataset="planted:colour", image_size=32,
                       problem=AugmentationProblem(1, n_classes=4, images_per_class=2))
    differences = store.provenance_differences(other)
    for part in ("image_size (in the file [64, 64], now [32, 32])", "model (in the file "
                 "resnet18, now alexnet)", "problem.augmentations (in the file [", "and "):
        assert part in differences, differences
    assert differences.startswith("model (in the file resnet18, now alexnet); weights_sha256 (")
    # Without a digest on one side the weights are compared by their description.
    assert "weights (in the file checkpoint /a/last.ckpt, now none)" in (
        store.provenance_differences({**other, "weights_sha256": ""})
    )


def test_bad_names_and_overwrites_are_refused(tmp_path):
    store = ResultsStore(tmp_path / "results.h5")
    result = synthetic_result()
    for name in ("a/b", "", ".tmp-x"):
        with pytest.raises(ValueError, match="invalid analysis name"):
            store.write_analysis(name, result)
    bad_layer = AnalysisResult("sobol", GROUPS, {"block/conv": result.layers["fc"]}, n=1,
                               evaluations=1)
    with pytest.raises(ValueError, match="invalid layer name"):
        store.write_analysis("final", bad_layer)
    store.write_analysis("final", result)
    with pytest.raises(ValueError, match="overwrite=True"):
        store.write_analysis("final", result)
    store.write_analysis("final", synthetic_result(5), overwrite=True)
    assert store.read_analysis("final").allclose(synthetic_result(5), rtol=F32_RTOL)
    with pytest.raises(ValueError, match=re.escape("available: ['final']")):
        store.read_analysis("missing")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not an augsens-results file"):
        ResultsStore(tmp_path / "other.h5").write_analysis("final", result)
    assert not list(tmp_path.glob(".*.tmp-*"))  # failed writes leave no temporary file


CHILD = """
import os, sys, time
import h5py, numpy as np
from sensitivity.activations import ActivationWriter
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore

path, mode = sys.argv[1], sys.argv[2]
def result(seed):
    rng = np.random.default_rng(seed)
    layers = {f"layer{i}": {"S1": rng.random((3, 8, 16, 16)), "ST": rng.random((3, 8, 16, 16)),
                            "mean": rng.random((8, 16, 16))} for i in range(4)}
    return AnalysisResult("sobol", ["a", "b", "c"], layers, n=8, evaluations=40)

def pause():
    print("PAUSED", flush=True)
    time.sleep(60)

store = ResultsStore(path)
store.write_analysis("first", result(0))
writer = ActivationWriter(os.path.join(os.path.dirname(path), "act.h5"), "second", {"fc": (4,)},
                          d=2, row_kinds=["A", "B"])
writer.append(np.arange(6), np.zeros((6, 2)), {"fc": np.ones((6, 4))})
if mode == "datasets":
    create = h5py.Group.create_dataset
    calls = []
    def create_dataset(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            pause()
        return create(self, *args, **kwargs)
    h5py.Group.create_dataset = create_dataset
else:
    replace = os.replace
    def paused_replace(*args):
        pause()
        replace(*args)
    os.replace = paused_replace
store.write_analysis("second", result(1))
print("NOT KILLED", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["datasets", "publish"])
def test_sigkill_while_writing_leaves_a_readable_file(tmp_path, mode):
    path = tmp_path / "results.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "PAUSED", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()

    store = ResultsStore(path)
    with h5py.File(path, "r") as f:  # readable; the killed analysis is nowhere
        assert list(f["analyses"]) == ["first"]
        assert f["analyses/first"].attrs["status"] == "complete"
    assert store.analyses() == ["first"] and not store.has_analysis("second")
    with pytest.raises(ValueError, match="no complete analysis 'second'"):
        store.read_analysis("second")
    assert store.read_analysis("first").layer_names == ["layer0", "layer1", "layer2", "layer3"]
    assert not (tmp_path / "act.h5").exists()  # the unfinished activation file is not published

    leftovers = sorted(tmp_path.glob(".*.tmp-*"))
    assert [p.name.split(".tmp-")[0] for p in leftovers] == [".act.h5", ".results.h5"]
    assert store.cleanup() == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.h5"]
    store.write_analysis("second", store.read_analysis("first"))
    assert store.analyses() == ["first", "second"]


def _write_shard(path, rows, n_rows=None, seed=0):
    """A shard holding the given global rows; activations are functions of the row index."""
    rows = np.asarray(rows)
    with ActivationWriter(path, "final", {"layer1": (2, 3, 3), "fc": (4,)}, d=3,
                          row_kinds=["A", "AB_0", "B"], n_rows=n_rows) as writer:
        for batch in np.array_split(rows, 2):
            writer.append(
                torch.from_numpy(batch),
                np.repeat(batch[:, None] / 100.0, 3, axis=1),
                {"layer1": torch.from_numpy(batch).float()[:, None, None, None].expand(-1, 2, 3, 3),
                 "fc": np.repeat(batch[:, None].astype(np.float32), 4, axis=1)},
            )
    return path


def test_activation_writer_layout(tmp_path):
    path = _write_shard(tmp_path / "act.h5", [0, 1, 2, 5, 7], n_rows=9)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "augsens-activations" and f.attrs["status"] == "complete"
        g = f["activations/final"]
        assert list(g.attrs["row_kind_names"]) == ["A", "AB_0", "B"] and g.attrs["rows"] == 5
        np.testing.assert_array_equal(g["row_index"][()], [0, 1, 2, 5, 7])
        np.testing.assert_array_equal(g["row_kind"][()], [0, 1, 2, 2, 1])
        assert g["layer1"].shape == (5, 2, 3, 3) and g["layer1"].dtype == np.float32
        assert g["layer1"].chunks[0] >= 1 and g["layer1"].compression == "lzf"
        np.testing.assert_allclose(g["design"][:, 0], np.array([0, 1, 2, 5, 7]) / 100.0)
    with ActivationWriter(tmp_path / "bad.h5", "final", {"fc": (4,)}, d=3, row_kinds=["A"]) as w:
        w.append([3, 4], np.zeros((2, 3)), {"fc": np.zeros((2, 4))})
        with pytest.raises(ValueError, match="increase strictly"):
            w.append([4], np.zeros((1, 3)), {"fc": np.zeros((1, 4))})
        with pytest.raises(ValueError, match=re.escape("expected (1, 4)")):
            w.append([9], np.zeros((1, 3)), {"fc": np.zeros((1, 5))})
    with pytest.raises(RuntimeError), ActivationWriter(tmp_path / "gone.h5", "final",
                                                        {"fc": (4,)}, d=3, row_kinds=["A"]):
        raise RuntimeError("engine failed")
    assert not (tmp_path / "gone.h5").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_merge_two_shards_every_row_once_and_link_into_results(tmp_path):
    # Two ranks own alternating blocks of 3 rows (12 rows in all).
    rank0 = [r for b in (0, 2) for r in range(3 * b, 3 * b + 3)]
    rank1 = [r for b in (1, 3) for r in range(3 * b, 3 * b + 3)]
    shards = [_write_shard(tmp_path / "act.rank0.h5", rank0, n_rows=12),
              _write_shard(tmp_path / "act.rank1.h5", rank1, n_rows=12)]
    merged = merge_shards(shards, tmp_path / "activations-final.h5", remove_shards=True)
    assert not any(p.exists() for p in shards)
    with h5py.File(merged, "r") as f:
        g = f["activations/final"]
        np.testing.assert_array_equal(g["row_index"][()], np.arange(12))
        np.testing.assert_array_equal(g["row_kind"][()], np.arange(12) % 3)
        np.testing.assert_array_equal(g["fc"][:, 0], np.arange(12))
        np.testing.assert_array_equal(g["layer1"][:, 1, 2, 2], np.arange(12))
        np.testing.assert_allclose(g["design"][:, 2], np.arange(12) / 100.0)

    store = ResultsStore(tmp_path / "results.h5")
    store.write_analysis("final", synthetic_result())
    store.add_activations("final", merged)
    with h5py.File(store.path, "r") as f:  # the external link resolves with plain h5py
        np.testing.assert_array_equal(f["activations/final/fc"][:, 3], np.arange(12))
    assert store.analyses() == ["final"]


def test_merge_refuses_duplicates_and_gaps(tmp_path):
    a = _write_shard(tmp_path / "a.h5", [0, 1, 2, 3])
    b = _write_shard(tmp_path / "b.h5", [3, 4, 5])
    with pytest.raises(ValueError, match=re.escape("more than one shard, e.g. rows [3]")):
        merge_shards([a, b], tmp_path / "merged.h5")
    c = _write_shard(tmp_path / "c.h5", [4, 6], n_rows=7)
    d = _write_shard(tmp_path / "d.h5", [0, 1, 2, 3], n_rows=7)
    with pytest.raises(ValueError, match=re.escape("missing rows e.g. [5]")):
        merge_shards([c, d], tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_analysis_result_validates_and_summarises():
    result = synthetic_result()
    summary = result.summary()
    # S2 without S2_conf: the half-width key is summarised only where it exists.
    assert list(summary) == ["S1", "S1_conf", "ST", "ST_conf", "S2"]
    assert list(summary["S1"]) == ["layer1", "fc"]
    assert list(summary["S2"]["fc"]) == ["erasing:rolling", "erasing:order", "rolling:order"]
    rolling = summary["ST"]["fc"]["rolling"]
    values = result.layers["fc"]["ST"][1]
    assert rolling["mean"] == pytest.approx(values.mean())
    assert rolling["median"] == pytest.approx(np.median(values))
    assert rolling["p10"] == pytest.approx(np.percentile(values, 10))
    assert rolling["p90"] == pytest.approx(np.percentile(values, 90))
    assert rolling["valid_fraction"] == 1.0
    assert result.unit_shape("layer1") == (4, 3, 3) and result.value_keys == ["S1", "ST"]
    fc = result.layers["fc"]
    with pytest.raises(ValueError, match="unknown method"):
        AnalysisResult("morris", GROUPS, {"fc": fc}, n=1, evaluations=1)
    with pytest.raises(ValueError, match=re.escape("expected (2,)")):
        AnalysisResult("sobol", GROUPS[:2], {"fc": fc}, n=1, evaluations=1)
    with pytest.raises(ValueError, match="unit shape"):
        AnalysisResult("sobol", GROUPS, {"fc": {"S1": fc["S1"], "mean": np.zeros(3)}}, n=1,
                       evaluations=1)
    with pytest.raises(ValueError, match="unknown key"):
        AnalysisResult("sobol", GROUPS, {"fc": {"S3": fc["S1"]}}, n=1, evaluations=1)


def test_analysis_settings_are_stored_under_the_callers_attrs(tmp_path):
    store = ResultsStore(tmp_path / "results.h5")
    result = synthetic_result()
    result.settings = {"design": "SobolDesign", "seed": 5, "reduction": "none"}
    store.write_analysis("a", result, attrs={"seed": 7, "model": "tiny"})
    attrs = store.analysis_attrs("a")
    assert attrs["design"] == "SobolDesign" and attrs["reduction"] == "none"
    assert attrs["seed"] == 7 and attrs["model"] == "tiny"  # the caller's attrs win
    result.settings = {"method": "shapley"}
    with pytest.raises(ValueError, match=r"attrs \['method'\] would overwrite"):
        store.write_analysis("b", result)
    assert store.analyses() == ["a"]


@dataclass
class _Counts:
    """A result stored as one group, as MaskingResult and SingleClassResult are."""

    label: str
    counts: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "names": np.array(["x", "y"])}

    def attrs(self) -> dict[str, object]:
        return {"label": self.label}

    @classmethod
    def from_group(cls, arrays, attrs) -> _Counts:
        assert list(arrays["names"]) == ["x", "y"]
        return cls(attrs["label"], arrays["counts"])


def test_write_result_and_read_result_round_trip_one_group(tmp_path):
    store = ResultsStore(tmp_path / "results.h5")
    assert store.groups("counts") == []
    path = store.write_result("counts", "first", _Counts("a", np.arange(3)))
    assert path == "counts/first" and store.has_group(path)
    back = store.read_result(_Counts, "counts", "first")
    assert back.label == "a" and back.counts.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="already exists"):
        store.write_result("counts", "first", _Counts("b", np.zeros(2)))
    store.write_result("counts", "first", _Counts("b", np.zeros(2)), overwrite=True)
    store.write_result("counts", "second", _Counts("c", np.ones(1)))
    assert store.groups("counts") == ["first", "second"]
    assert store.read_result(_Counts, "counts", "first").label == "b"
    with pytest.raises(ValueError, match=r"no complete group 'counts/third'.*\['first', "):
        store.read_result(_Counts, "counts", "third")
    # Nested groups (the statistics' layout) come back as nested dicts with nested=True.
    store.write_group("tree/x", {"layer1/S1/variables": np.eye(2), "top": np.int64(3)})
    flat, _ = store.read_group("tree/x")
    nested, attrs = store.read_group("tree/x", nested=True)
    assert set(flat) == {"top"} and attrs["status"] == "complete"
    np.testing.assert_array_equal(nested["layer1"]["S1"]["variables"], np.eye(2))
