"""The augmentation registry: the built-ins and a user's augmentations registered one way, by
decorator or import path; bad registrations refused before compute; a registered augmentation
in every design, in configs, results files, pickles and resume fingerprints; and a planted
truth: a network that reads only the user's augmentation gets all the indices for it."""

from __future__ import annotations

import importlib
import json
import pickle

import numpy as np
import pytest
import torch
from helpers import FLOAT32_SUMS, forget_user_augmentations
from torch import nn

from sensitivity.augmentation_specs import AUGMENTATION_SETS, AUGMENTATIONS, BUILTIN
from sensitivity.augmentations import (
    ParamSpec,
    apply,
    check_augmentation,
    import_augmentation,
    register_augmentation,
    unregister_augmentation,
)
from sensitivity.config import EngineConfig, build_design
from sensitivity.engine import run_analysis
from sensitivity.problem import AugmentationProblem
from sensitivity.registry import check_record, registration_record
from sensitivity.resume import ResumeFile
from sensitivity.store import ResultsStore

SIZE = 16


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    """Twice the same 16 px image with a strong red-blue and red-green difference, float32 in
    [0, 1]: the "image" variable exists (contrast needs two images) but cannot matter."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.8, 0.4, 0.1]).view(1, 3, 1, 1)
    return (base + 0.2 * torch.rand(1, 3, SIZE, SIZE, generator=g)).clamp(0, 1).repeat(2, 1, 1, 1)


def planted_problem(augmentations: list[str]) -> AugmentationProblem:
    return AugmentationProblem(augmentations, auxiliaries=("order", "image"), images_per_class=2)


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 12, 10, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- registration


def test_the_builtins_are_registered_the_same_way_and_pass_the_checks():
    assert list(AUGMENTATIONS)[:12] == AUGMENTATION_SETS[1] + AUGMENTATION_SETS[2]
    assert set(AUGMENTATION_SETS[1] + AUGMENTATION_SETS[2]) == BUILTIN
    for name in BUILTIN:
        spec = AUGMENTATIONS[name]
        assert spec.source.startswith("sensitivity.augmentations:_"), name
        check_augmentation(spec)  # what a user's registration must pass, they pass too
    with pytest.raises(ValueError, match="'hue' is a built-in augmentation"):
        unregister_augmentation("hue")


def test_the_decorator_registers_a_function_that_apply_and_problems_run():
    @register_augmentation("halve", params={"amount": (0.0, 0.5)}, identity={"amount": 0.0})
    def halve(images, params):
        return images * (1 - params["amount"].to(images.dtype).view(-1, 1, 1, 1))

    try:
        assert callable(halve) and AUGMENTATIONS["halve"].fn is halve  # returned unchanged
        x, amount = images(), torch.tensor([0.0, 0.1, 0.25, 0.5])
        torch.testing.assert_close(apply("halve", x, {"amount": amount}),
                                   x * (1 - amount.view(-1, 1, 1, 1)))
        # registering the same function and spec again (a module imported again) is a no-op
        register_augmentation("halve", halve, params={"amount": (0.0, 0.5)},
                              identity={"amount": 0.0})
        problem = AugmentationProblem(["hue", "halve"], auxiliaries=("order",))
        assert problem.column_names == ["hue.switch", "hue.factor", "halve.switch",
                                        "halve.amount", "order"]
        assert problem.to_config()["registered"]["halve"]["identity"] == {"amount": 0.0}
    finally:
        unregister_augmentation("halve")
    assert "halve" not in AUGMENTATIONS


def test_an_import_path_registers_and_names_the_augmentation(user):
    problem = AugmentationProblem(["hflip", "user_augmentations:channel_swap",
                                   "user_augmentations:posterize"], auxiliaries=("order",))
    assert problem.augmentations == ["hflip", "channel_swap", "posterize"]
    assert problem.group_names == ["hflip", "channel_swap", "posterize", "order"]
    assert AUGMENTATIONS["posterize"].params == (ParamSpec("levels", 2.0, 32.0, integer=True),)
    assert import_augmentation("user_augmentations:channel_swap") == "channel_swap"
    decoded = problem.decode(np.full((1, problem.d), 0.3), SIZE, SIZE)
    assert decoded.params["posterize"]["levels"].dtype == torch.int64  # an integer parameter


def test_configs_record_the_registration_and_rebuild_it_in_a_fresh_process(user, tmp_path):
    problem = AugmentationProblem(["hue", "channel_swap", "posterize"], p_on={"hue": 1.0})
    config = problem.to_config()
    record = config["registered"]["channel_swap"]
    assert set(config["registered"]) == {"channel_swap", "posterize"}  # built-ins: no record
    assert record["source"] == "user_augmentations:channel_swap"
    assert record["params"] == {"mix": [0.0, 1.0]} and record["identity"] == {"mix": 0.0}
    assert len(record["digest"]) == 64
    assert "registered" not in AugmentationProblem(2).to_config()  # configs of before stay
    store = ResultsStore(tmp_path / "results.h5")
    store.write_metadata(model="m", dataset="d", image_size=SIZE, seed=0, problem=problem)
    stored = json.loads(store.read_metadata()["problem"]["config"])
    pickled = pickle.dumps(problem)

    forget_user_augmentations()  # another process: a DDP rank, a report, a resumed run
    again = AugmentationProblem.from_config(stored)
    assert again.to_config() == config and again.column_names == problem.column_names
    forget_user_augmentations()  # a spawned process unpickles the problem
    assert pickle.loads(pickled).to_config() == config


def test_a_different_registration_under_the_same_name_is_refused(user, tmp_path):
    config = AugmentationProblem(["hue", "channel_swap"]).to_config()
    changed = json.loads(json.dumps(config))
    changed["registered"]["channel_swap"]["identity"] = {"mix": 1.0}
    with pytest.raises(ValueError, match=r"registered differently .*identity\.mix"):
        AugmentationProblem.from_config(changed)

    forget_user_augmentations()  # this process registers another function under that name
    register_augmentation("channel_swap", lambda x, p: x.flip(1), params={"mix": (0.0, 1.0)},
                          identity=None, check=False)
    with pytest.raises(ValueError, match=r"registered differently .*source .*digest"):
        AugmentationProblem.from_config(config)
    with pytest.raises(ValueError, match="already registered"):
        importlib.import_module("user_augmentations")  # its decorator meets the other one
    # a resume state fingerprints the problem config: the other registration is refused
    now = AugmentationProblem(["hue", "channel_swap"]).to_config()
    ResumeFile(tmp_path / "state.pt", {"problem": config}).save(1, 1.0, {})
    with pytest.raises(ValueError, match=r"differs in: problem\.registered\.channel_swap"):
        ResumeFile(tmp_path / "state.pt", {"problem": now}).load()


def _swap_channels(images, params):
    return images.flip(1)


BAD_REGISTRATIONS = {
    "reversed bounds": (dict(params={"a": (1.0, 0.0)}), r"low < high, got \(1.0, 0.0\)"),
    "infinite bounds": (dict(params={"a": (0.0, float("inf"))}), "finite numbers"),
    "not a pair": (dict(params={"a": (0.0,)}), r"must be \(low, high\)"),
    "identity outside": (dict(params={"a": (0.0, 1.0)}, identity={"a": 2.0}),
                         r"identity of bad\.a = 2.0 is outside its bounds \[0.0, 1.0\]"),
    "identity missing": (dict(params={"a": (0.0, 1.0), "b": (0.0, 1.0)}, identity={"a": 0.0}),
                         r"a value for each parameter \['a', 'b'\]"),
    "identity without params": (dict(identity={}), "no parameters, so no identity"),
    "unknown axis": (dict(params=(ParamSpec("a", 0.0, 1.0, axis="z"),)), "unknown axis 'z'"),
    "bad parameter name": (dict(params={"a.b": (0.0, 1.0)}), "must be an identifier"),
}


@pytest.mark.parametrize("case", list(BAD_REGISTRATIONS))
def test_bad_specs_are_refused_before_registering(case):
    kwargs, match = BAD_REGISTRATIONS[case]
    with pytest.raises(ValueError, match=match):
        register_augmentation("bad", _swap_channels, **kwargs)
    assert "bad" not in AUGMENTATIONS


def _noise(images, params):
    return images * torch.rand(images.shape[0], 1, 1, 1)


BAD_FUNCTIONS = {
    "shape": (lambda x, p: x[:, :1], r"returned \(4, 1, 16, 12\) for images \(4, 3, 16, 12\)"),
    "not a tensor": (lambda x, p: x.numpy(), "returned ndarray"),
    "dtype": (lambda x, p: x.double(), "returned torch.float64 for torch.float32 images"),
    "range": (lambda x, p: x * 2, r"outside \[0, 1\]; clamp them"),
    "nan": (lambda x, p: x * float("nan"), r"values in \[nan, nan\]"),
    "in place": (lambda x, p: x.mul_(0.5), "modified its input images in place"),
    "raises": (lambda x, p: x * p["missing"], r"raised KeyError: 'missing' on a test batch"),
    "non-deterministic": (_noise, "must be deterministic"),
    "batch statistics": (lambda x, p: (x - x.mean() + 0.5).clamp(0, 1),
                         "depend only on itself and its own parameters"),
}


@pytest.mark.parametrize("case", list(BAD_FUNCTIONS))
def test_bad_functions_are_refused_before_registering(case):
    fn, match = BAD_FUNCTIONS[case]
    with pytest.raises(ValueError, match=match):
        register_augmentation("bad", fn, params={"a": (0.0, 1.0)})
    assert "bad" not in AUGMENTATIONS


def test_an_identity_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match=r"is not the identity at its identity values"):
        register_augmentation("bad", _swap_channels, params={"a": (0.0, 1.0)},
                              identity={"a": 0.0})
    assert "bad" not in AUGMENTATIONS


@pytest.mark.parametrize(("name", "match"), [
    ("order", "an auxiliary variable's"),
    ("my-aug", "must be a Python identifier"),
    ("hue", r"'hue' is already registered \(from sensitivity\.augmentations:_hue\)"),
])
def test_bad_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        register_augmentation(name, _swap_channels)


@pytest.mark.parametrize(("path", "match"), [
    ("user_augmentations:", "must be 'package.module:function'"),
    ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz' .*ModuleNotFoundError"),
    ("user_augmentations:missing", "user_augmentations has no attribute 'missing'"),
    ("user_augmentations:not_registered", "is not a registered augmentation: decorate it"),
])
def test_bad_import_paths_name_the_path(user, path, match):
    with pytest.raises(ValueError, match=match):
        AugmentationProblem(["hue", path])


def test_a_record_without_a_registration_or_source_is_refused():
    with pytest.raises(ValueError, match="not registered and has no import path"):
        check_record("nowhere", {"source": None})
    with pytest.raises(ValueError, match=r"records \['hflip'\] are of augmentations not in"):
        AugmentationProblem(["hue"], registered={"hflip": registration_record("hflip")})


# ----------------------------------------------------------------------------- analyses


class ChannelDifferences(nn.Module):
    """(B, 3, H, W) -> (B, 2): mean red - mean blue and mean red - mean green."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.double().mean((2, 3))
        return torch.stack([means[:, 0] - means[:, 2], means[:, 0] - means[:, 1]], dim=1)


class PlantedNet(nn.Module):
    """Units that only channel_swap moves: hflip and rolling move pixels, not channel means,
    all three commute (so the order cannot matter) and both probe images are the same."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = ChannelDifferences()
        self.head = nn.Linear(2, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stats(x))


PLANTED = ["hflip", "channel_swap", "rolling"]
# Exactly zero in exact arithmetic; float round-off of reordered sums (rolling) stays far below.
NULL = 1e-9
# Half-widths at 99.9%: of the 10 estimates (5 groups x 2 units) of a method, one leaves its
# interval by chance with a probability below 1%.
CONF_LEVEL = 0.999


def planted(problem, probe, **settings) -> dict[str, np.ndarray]:
    config = EngineConfig(layers=["stats"], progress=False, batch_rows=64,
                          conf_level=CONF_LEVEL, **settings)
    return run_analysis(PlantedNet(), problem, probe, config).layers["stats"]


def test_a_network_reading_only_the_user_augmentation_gives_it_every_index(user, probe):
    problem = planted_problem(PLANTED)
    swap, others = 1, [0, 2, 3, 4]  # groups: hflip, channel_swap, rolling, order, image
    sobol = planted(problem, probe, method="sobol", n=64)
    for key in ("S1", "ST"):
        # the truth is 1 for channel_swap and 0 for the rest: S1_j = mean[(B - mu)(AB_j - A)]
        # / V and Jansen's ST_j vanish exactly where AB_j gives A's output
        assert np.all(np.abs(sobol[key][swap] - 1) <= sobol[f"{key}_conf"][swap]), key
        assert np.all(np.abs(sobol[key][others]) < NULL), key
    # Goda's trajectories credit every change of the output to the group that made it
    goda = planted(problem, probe, method="shapley", n=32)["shapley_normalized"]
    # 1 up to the float32 partial sums of the shares and of their total
    np.testing.assert_allclose(goda[swap], 1.0, rtol=FLOAT32_SUMS["rtol"])
    assert np.all(np.abs(goda[others]) < NULL)
    # Song-Nelson-Staum estimates conditional variances: null groups are 0 within their error
    sns = planted(problem, probe, method="shapley", shapley_method="permutation", n=32,
                  n_outer=2, n_inner=3)
    effects, conf = sns["shapley_normalized"], sns["shapley_normalized_conf"]
    assert np.all(effects.argmax(0) == swap)
    assert np.all(np.abs(effects[swap] - 1) <= conf[swap])
    assert np.all(np.abs(effects[others]) <= conf[others] + NULL)
    np.testing.assert_allclose(effects.sum(0), 1.0, rtol=FLOAT32_SUMS["rtol"])
    contrast = planted(problem, probe, method="contrast", n=2, contrast_k=8)
    assert np.all(np.abs(contrast["mean_diff"][swap]) > 0.1)
    assert np.all(np.abs(contrast["mean_diff"][[0, 2]]) < NULL)  # hflip, rolling
    assert np.all(planted(problem, probe, method="variance", n=64)["var"] > 1e-3)


@pytest.mark.parametrize("settings", [
    {"method": "sobol", "n": 16, "second_order": True},
    {"method": "sobol", "n": 16, "sampling": "mc"},
    {"method": "shapley", "n": 8},
    {"method": "shapley", "shapley_method": "permutation", "n": 2, "n_inner": 2},
    {"method": "contrast", "n": 2, "contrast_k": 3},
    {"method": "variance", "n": 20},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_rows_with_a_user_augmentation_regenerate_from_seed_and_block(user, probe, settings):
    problem = planted_problem(["hue", "channel_swap", "posterize"])
    config = EngineConfig(seed=7, **settings)
    design = build_design(problem, config)
    rows, size = design.rows(), design.block_size
    whole = problem.decode(rows, SIZE, SIZE)
    augmented = problem.augment(probe[whole.image_index], whole)
    again = build_design(problem, config)  # as a resumed run or another rank builds it
    last = design.n_blocks
    for start, stop in [(0, 1), (last // 2, last), (last - 1, last)]:
        part = again.rows(start, stop)
        np.testing.assert_array_equal(part, rows[start * size : stop * size])
        alone = problem.decode(part, SIZE, SIZE)
        torch.testing.assert_close(problem.augment(probe[alone.image_index], alone),
                                   augmented[start * size : stop * size], rtol=0, atol=1e-6)


def test_the_command_line_and_yaml_name_a_user_augmentation_by_import_path(user, tmp_path):
    # Imported here: the rest of this module needs neither Lightning nor the command line.
    from cli.inputs import build_problem
    from cli.options import build_parser, normalise_args

    preset = tmp_path / "problem.yaml"
    preset.write_text("problem:\n  augmentations:\n    - hue\n"
                      "    - user_augmentations:channel_swap\n")
    listed = json.dumps(["hue", "user_augmentations:channel_swap"])
    parser = build_parser()
    for options in (["--config", str(preset)], ["--set", listed]):
        cfg = parser.parse_args(normalise_args(["sobol", *options]))
        problem = build_problem(cfg, n_classes=2)
        assert problem.augmentations == ["hue", "channel_swap"], options
        assert problem.to_config()["registered"]["channel_swap"]["identity"] == {"mix": 0.0}
