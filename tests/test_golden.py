"""A small golden run: the same seed gives the same results files, before and after a change.

``GOLDEN`` holds every dataset of the results files of a few small analyze.py runs (each method,
the statistics, masking and single-class), recorded before the project was restructured
(issue "one configuration, one write path"). A refactoring must reproduce them bit for bit;
outputs added since (``ADDED``) may appear next to them.

Bit-identity is a property of the same kernels: the recording notes the CPU capability torch
used (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX512 vs AVX2 give other float
summation orders in convolutions). On another capability the arrays are compared to the
float32 storage's resolution instead, and the test says so. To record anew (only when results
are meant to change): ``AUGSENS_WRITE_GOLDEN=1 pytest tests/test_golden.py``. Recorded anew
once, for the float32 partial sums of the accumulators (issue "accumulation at memory speed"):
every array was within the storage resolution of the previous recording (at most 1.2e-6
apart) and every count equal.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import cli

GOLDEN = Path(__file__).parent / "data" / "golden_run.npz"
COMMON = [
    "--data.image_size", "32", "--images-per-class", "2", "--small_input", "false",
    "--layers", json.dumps(["layer1", "fc"]), "--reduction", "channel_mean",
    "--accelerator", "cpu", "--no_progress", "--wandb", "false",
]
ANALYSES = {
    "sobol": ["sobol", "--n", "16", "--second_order"],
    "sobol_mc": ["sobol", "--n", "16", "--sampling", "mc"],
    "shapley": ["shapley", "--n", "8"],
    "permutation": ["shapley", "--n", "2", "--shapley_method", "permutation", "--n_inner", "2"],
    "variance": ["variance", "--n", "16"],
    "contrast": ["contrast", "--n", "8", "--contrast_k", "2", "--store_activations"],
}
# Attributes that legitimately differ between two runs of the same thing.
VOLATILE = ("created", "seconds", "software_version", "config")
# Datasets and attributes added since the recording: new outputs next to the recorded ones,
# which must not change (masking's per-class counts and the clustering of its profiles).
ADDED = re.compile(r"sobol/masking/sobol(/(class_acc1|unmasked_class_acc1|class_images|"
                   r"confusion|unmasked_confusion|clustering/\w+)|@cluster_\w+)")


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset and every non-volatile numeric attribute of a results file, by path."""
    out: dict[str, np.ndarray] = {}

    def visit(name: str, item: h5py.HLObject) -> None:
        if isinstance(item, h5py.Dataset) and item.dtype.kind in "fiub":
            out[name] = item[()]
        for key, value in item.attrs.items():
            value = np.asarray(value)
            if key not in VOLATILE and value.dtype.kind in "fiub":
                out[f"{name}@{key}"] = value

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def golden_arrays(root: Path) -> dict[str, np.ndarray]:
    """Run the golden analyses (one run directory each) and collect their results files."""
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    for label, args in ANALYSES.items():
        run = root / label
        assert cli(*args, "--output", run, "--name", label, *COMMON, quiet=True) == 0
        if label == "sobol":
            assert cli("masking", "--results", run / "results.h5", "--analysis", label,
                       "--masking.k", "1", "--masking.augmentations", "[erasing]",
                       "--masking.variables", "[erasing, class]", "--masking.layers", "[layer1]",
                       *COMMON, quiet=True) == 0
            assert cli("correlation", "--results", run / "results.h5", "--analysis", label,
                       "--no_progress", "--wandb", "false", quiet=True) == 0
        if label == "contrast":
            assert cli("contrast-stats", "--results", run / "results.h5", "--analysis", label,
                       "--no_progress", "--wandb", "false", quiet=True) == 0
        arrays.update({f"{label}/{k}": v for k, v in _datasets(run / "results.h5").items()})
    arrays["capability"] = np.array(torch.backends.cpu.get_cpu_capability())
    return arrays


@pytest.mark.slow
def test_same_seed_gives_the_recorded_results(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    arrays = golden_arrays(tmp_path)  # one thread: the same summation order as the recording
    if os.environ.get("AUGSENS_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez_compressed(GOLDEN, **arrays)
    golden = dict(np.load(GOLDEN))
    recorded = str(golden.pop("capability"))
    arrays.pop("capability")
    added = set(arrays) - set(golden)
    assert set(golden) <= set(arrays), set(golden) - set(arrays)
    assert all(ADDED.fullmatch(key) for key in added), sorted(added)
    same_kernels = recorded == torch.backends.cpu.get_cpu_capability()
    for key, expected in golden.items():
        if same_kernels:
            np.testing.assert_array_equal(arrays[key], expected, err_msg=key)
        else:  # other kernels, other float32 round-off: the storage's resolution
            np.testing.assert_allclose(arrays[key], expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{key} (recorded on {recorded})")
