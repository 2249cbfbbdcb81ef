"""W&B sweeps: every boolean and list option parses from the arguments a sweep agent writes, and
the example sweeps of configs/sweeps/ are commands their program accepts.

A sweep agent turns a run's parameters into ``--name=str(value)``
(``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``, its ``${args}``): booleans as
``--x=True`` / ``--x=False``, lists as Python writes them (``--x=['hue', 'saturation']``),
numbers as their str. The options are found by walking the parsers' actions, so that an option
added later is checked without a change here. Nothing reaches the network: the agent's command
is rebuilt with wandb's own functions and parsed, not run.
"""

from __future__ import annotations

import functools
import sys
import types
import typing
from argparse import ArgumentError
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import pytest
from helpers import cli
from jsonargparse import ActionYesNo, ArgumentParser, Namespace
from wandb.sdk.launch.sweeps import utils as sweep_utils

import analyze
import train
from cli.inputs import build_problem
from cli.options import engine_config
from sensitivity.augmentations import AUGMENTATION_SETS

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# One parser per analyze.py command family: build_parser serves the analyses and masking |
# single-class; each statistics command has its own. Options a parse needs, by command.
ANALYZE_COMMANDS = ("sobol", *analyze.STATISTICS)
REQUIRED = {command: ["--results=results.h5"] for command in analyze.STATISTICS}
# Elements a list option really takes where neither its default nor its type says which:
# parsing does not check them, but a sweep over other names would fail at the run's start.
VALID_ELEMENTS: dict[str, list[Any]] = {
    "problem.augmentations": AUGMENTATION_SETS[2][2:4],
    "masking.augmentations": AUGMENTATION_SETS[2][2:4],
    "masking.variables": [AUGMENTATION_SETS[1][0], "class"],
    "layers": ["layer1", "fc"],
    "masking.layers": ["layer1", "layer2"],
    "value_types": ["S1", "ST"],
    "wandb_tags": ["sweep", "set-2"],
    "trainer.devices": [0, 1],
}
# Elements by type for a list option none of the above covers.
ELEMENTS_BY_TYPE: dict[type, list[Any]] = {str: ["a", "b"], int: [1, 2], float: [0.25, 0.5]}


# ------------------------------------------------------------------------ wandb's command line
def sweep_args(values: dict[str, Any]) -> list[str]:
    """The ``${args}`` of a sweep run with these parameter values, as the agent builds them.

    Args:
        values: {parameter name: value}, e.g. {"second_order": True}.

    Returns:
        The arguments, e.g. ``["--second_order=True"]``.
    """
    command = {"args": {name: {"value": value} for name, value in values.items()}}
    return sweep_utils.create_sweep_command_args(command)["args"]


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command a sweep agent runs for one point of a sweep (``wandb agent``, POSIX).

    Mirrors ``wandb.wandb_agent.Agent._command_run``: the sweep's command with its macros
    replaced by the interpreter, the program and the run's arguments.

    Args:
        sweep: the sweep definition, as ``wandb sweep`` reads it.
        values: the run's parameter values.

    Returns:
        The command, starting ``/usr/bin/env python <program>``.
    """
    macros = sweep_utils.create_sweep_command_args(
        {"args": {name: {"value": value} for name, value in values.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    command: list[str] = []
    # create_sweep_command edits its argument in place: give it a copy.
    for part in map(str, sweep_utils.create_sweep_command(list(sweep.get("command") or []))):
        if part.startswith("${") and part.endswith("}"):
            command += macros.get(part[2:-1]) or []
        else:
            command.append(part)
    return command


# ------------------------------------------------------------------------ the parsers' options
def union_members(action: Any) -> tuple[Any, ...]:
    """The members of an option's type (itself unless a union); () for untyped actions."""
    hint = getattr(action, "_typehint", None)
    if hint is None:
        return ()
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def is_boolean(action: Any) -> bool:
    """A switch, or a typed option that takes a bool besides at most None, int and literals
    (Lightning's ``deterministic: bool | Literal["warn"] | None``, ``fast_dev_run: int |
    bool``); options that also take classes (loggers, callbacks) are no booleans to sweep."""
    if isinstance(action, ActionYesNo):
        return True
    members = union_members(action)
    simple = all(m in (bool, int, type(None)) or typing.get_origin(m) is Literal
                 for m in members)
    return bool in members and simple


def list_element(action: Any) -> type | None:
    """The element type of an option that takes a list of str, int or float, else None."""
    for member in union_members(action):
        if typing.get_origin(member) is list:
            (element,) = typing.get_args(member)
            if element in ELEMENTS_BY_TYPE:
                return element
    return None


def long_flags(action: Any) -> list[str]:
    """The positive long flags of an option (``--second_order``, ``--second-order``, ``--set``):
    not the ``--no_x`` of a switch nor jsonargparse's ``--x+`` (append)."""
    return [s for s in action.option_strings
            if s.startswith("--") and not s.startswith("--no_") and not s.endswith("+")]


def list_value(action: Any) -> list[Any]:
    """Two valid elements for a list option: known names, else the last two of its default
    (different from the default when it has more), else two of its element type."""
    if action.dest in VALID_ELEMENTS:
        return list(VALID_ELEMENTS[action.dest])
    if isinstance(action.default, list) and len(action.default) >= 2:
        return list(action.default[-2:])
    return list(ELEMENTS_BY_TYPE[list_element(action)])


@functools.cache
def analyze_parser(command: str) -> ArgumentParser:
    """analyze.py's parser of a command; errors raise instead of exiting (their message in the
    failure)."""
    parser = (analyze.build_parser() if command not in analyze.STATISTICS
              else analyze.build_statistics_parser(command))
    parser.exit_on_error = False
    return parser


def parse_analyze(command: str, args: Sequence[str]) -> Namespace:
    """Parse ``analyze.py <command> <args>`` as ``analyze.main`` does (without running it)."""
    argv = analyze.normalise_args([command, *REQUIRED.get(command, []), *args])
    return analyze_parser(command).parse_args(argv)


def analyze_options(select: Callable[[Any], bool]) -> list[Any]:
    """pytest params (command, dest) of the options of every analyze.py parser that
    ``select`` accepts."""
    return [pytest.param(command, action.dest, id=f"{command}:{action.dest}")
            for command in ANALYZE_COMMANDS for action in analyze_parser(command)._actions
            if select(action)]


def find_action(parser: ArgumentParser, dest: str) -> Any:
    """The action of an option by its dest (``problem.p_on``)."""
    (action,) = [a for a in parser._actions if a.dest == dest]
    return action


class _Parsed(Exception):
    """Raised by ``_ParseOnly`` with the parsed TrainCLI, before anything is instantiated."""

    def __init__(self, cli_: train.TrainCLI) -> None:
        super().__init__("parsed")
        self.cli = cli_


class _ParseOnly(train.TrainCLI):
    """train.py's CLI up to the parse: no seed, no model, no run directory, no W&B run."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self)


def parse_train(args: Sequence[str]) -> tuple[Namespace, ArgumentParser]:
    """Parse a train.py command line through ``train.main`` (its default subcommand and its
    default config, configs/demo.yaml) without running it.

    Returns:
        The subcommand's configuration and the subcommand's parser.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "TrainCLI", _ParseOnly)
        # LightningCLI warns when sys.argv holds arguments too (pytest's own, here).
        patch.setattr(sys, "argv", ["train.py"])
        try:
            train.main(list(args))
        except _Parsed as parsed:
            config, parser = parsed.cli.config, parsed.cli.parser
    subcommand = config.subcommand
    return config[subcommand], parser._subcommands_action._name_parser_map[subcommand]


@functools.cache
def fit_parser() -> ArgumentParser:
    """train.py's ``fit`` parser (configs/demo.yaml its default config)."""
    parser = parse_train([])[1]
    parser.exit_on_error = False
    return parser


def train_options(select: Callable[[Any], bool]) -> list[Any]:
    """pytest params (dest) of the options of train.py fit that ``select`` accepts."""
    return [pytest.param(action.dest, id=action.dest) for action in fit_parser()._actions
            if select(action)]


SWITCHES = analyze_options(lambda a: isinstance(a, ActionYesNo))
TYPED_BOOLEANS = analyze_options(lambda a: not isinstance(a, ActionYesNo) and is_boolean(a))
LISTS = analyze_options(lambda a: list_element(a) is not None)
TRAIN_BOOLEANS = train_options(is_boolean)
TRAIN_LISTS = train_options(lambda a: list_element(a) is not None)


def dests(params: list[Any]) -> set[str]:
    """The option names (dests) of pytest params, whatever the command."""
    return {p.values[-1] for p in params}


def test_the_walk_finds_the_known_options():
    # Guards the walk itself: an empty or partial case list would pass every test below.
    assert {"second_order", "deduplicate", "channels_last", "compile", "progress", "overwrite",
            "store_activations", "wandb", "masking.reuse_prefix"} <= dests(SWITCHES)
    assert dests(TYPED_BOOLEANS) == {"small_input", "background"}
    assert {"problem.augmentations", "problem.auxiliaries", "layers", "masking.layers",
            "masking.variables", "masking.augmentations", "wandb_tags",
            "value_types"} <= dests(LISTS)
    assert {"wandb_checkpoints", "seed_everything", "trainer.enable_progress_bar",
            "trainer.deterministic", "model.small_input"} <= dests(TRAIN_BOOLEANS)
    assert {"wandb_tags", "trainer.devices"} <= dests(TRAIN_LISTS)


def test_every_analyze_boolean_is_a_switch_or_tri_state():
    """A plain ``type=bool`` option takes ``--x=true`` but not ``--x`` or ``--no_x``: analyze.py
    declares booleans with ``cli.options.add_switch``; only None-able ones (auto) are typed."""
    plain = [f"{command}:{action.dest}" for command in ANALYZE_COMMANDS
             for action in analyze_parser(command)._actions
             if union_members(action) == (bool,)]
    assert not plain, f"declare these with cli.options.add_switch: {plain}"


# ------------------------------------------------------------------------ analyze.py
@pytest.mark.parametrize(("command", "dest"), SWITCHES)
def test_switch_takes_sweep_values_and_flags(command, dest):
    action = find_action(analyze_parser(command), dest)
    (negative,) = [s for s in action.option_strings if s.startswith("--no_")]
    for flag in long_flags(action):
        for value in (True, False):
            (arg,) = sweep_args({flag[2:]: value})
            assert arg == f"{flag}={value}"  # the agent's form: --second_order=True
            assert parse_analyze(command, [arg])[dest] is value
            spelled = str(value).lower()
            assert parse_analyze(command, [f"{flag}={spelled}"])[dest] is value
            assert parse_analyze(command, [flag, spelled])[dest] is value
        assert parse_analyze(command, [flag])[dest] is True
    assert parse_analyze(command, [negative])[dest] is False


@pytest.mark.parametrize(("command", "dest"), TYPED_BOOLEANS)
def test_typed_boolean_takes_sweep_values(command, dest):
    action = find_action(analyze_parser(command), dest)
    for flag in long_flags(action):
        for value in (True, False):
            (arg,) = sweep_args({flag[2:]: value})
            assert parse_analyze(command, [arg])[dest] is value
            assert parse_analyze(command, [f"{flag}={str(value).lower()}"])[dest] is value
        if type(None) in union_members(action):  # tri-state: null is "auto"
            assert parse_analyze(command, [f"{flag}=null"])[dest] is None


@pytest.mark.parametrize(("command", "dest"), LISTS)
def test_list_option_takes_sweep_lists(command, dest):
    action = find_action(analyze_parser(command), dest)
    value = list_value(action)
    assert value != action.default  # so that the parse below shows the value was taken
    for flag in long_flags(action):
        (arg,) = sweep_args({flag[2:]: value})
        assert arg == f"{flag}={value}"  # Python's list: --set=['saturation', 'hue']
        assert parse_analyze(command, [arg])[dest] == value
        bare = f"{flag}=[{', '.join(map(str, value))}]"  # the documented --x=[a, b]
        assert parse_analyze(command, [bare])[dest] == value


def test_a_wrong_sweep_value_is_still_an_error():
    # The forms above are accepted because they parse, not because anything goes.
    with pytest.raises(ArgumentError, match="second_order"):
        parse_analyze("sobol", ["--second_order=maybe"])
    with pytest.raises(ArgumentError, match=r"problem\.auxiliaries"):
        parse_analyze("sobol", ["--problem.auxiliaries=True"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:n = 8 is too small")  # tiny on purpose: the S2 are not read
def test_sweep_style_sobol_run_writes_second_order_indices(tmp_path):
    out = tmp_path / "run"
    values = {
        "second_order": True, "deduplicate": True, "channels_last": False, "compile": False,
        "store_activations": False, "overwrite": False, "progress": False, "wandb": False,
        "small_input": False, "set": ["hue", "saturation"], "problem.auxiliaries":
        ["class", "image"], "layers": ["layer4", "fc"], "n": 8, "data.image_size": 32,
        "images_per_class": 2, "accelerator": "cpu", "output": str(out),
    }
    args = ["sobol", *sweep_args(values), "--reduction={layer4: channel_mean}"]
    assert "--second_order=True" in args and "--set=['hue', 'saturation']" in args
    assert cli(*args, quiet=True) == 0
    groups = 4  # hue, saturation, class, image
    with h5py.File(out / "results.h5", "r") as f:
        analysis = f["analyses/sobol"]
        assert analysis.attrs["second_order"] and analysis.attrs["deduplicate"]
        assert not analysis.attrs["channels_last"] and not analysis.attrs["compile"]
        assert list(analysis.attrs["group_names"]) == ["hue", "saturation", "class", "image"]
        assert analysis.attrs["evaluations"] == 8 * (2 * groups + 2)  # second-order design
        assert analysis["layer4"]["S2"].shape == (groups, groups, 512)
        assert analysis["fc"]["S2"].shape == (groups, groups, 4)
    assert (out / "figures" / "sobol_S2.png").stat().st_size > 0
    assert not (out / "wandb").exists()  # --wandb=False
    assert not list(out.glob("activations_*.h5"))  # --store_activations=False


# ------------------------------------------------------------------------ train.py
@pytest.mark.parametrize("dest", TRAIN_BOOLEANS)
def test_train_boolean_takes_sweep_values(dest):
    action = find_action(fit_parser(), dest)
    for value in (True, False):
        (arg,) = sweep_args({dest: value})
        assert fit_parser().parse_args([arg])[dest] is value
        assert fit_parser().parse_args([f"--{dest}={str(value).lower()}"])[dest] is value
    assert long_flags(action)[0] == f"--{dest}"


@pytest.mark.parametrize("dest", TRAIN_LISTS)
def test_train_list_takes_sweep_lists(dest):
    value = list_value(find_action(fit_parser(), dest))
    (arg,) = sweep_args({dest: value})
    assert fit_parser().parse_args([arg])[dest] == value


def test_train_command_line_of_a_sweep_run():
    # Through train.main: the default subcommand (fit) and configs/demo.yaml under the values.
    values = {"wandb_checkpoints": False, "trainer.enable_progress_bar": False,
              "seed_everything": 3, "trainer.max_epochs": 2, "wandb_tags": ["sweep", "demo"]}
    config, _ = parse_train(sweep_args(values))
    assert config.wandb_checkpoints is False and config.trainer.enable_progress_bar is False
    assert (config.seed_everything, config.trainer.max_epochs) == (3, 2)
    assert config.wandb_tags == ["sweep", "demo"]
    assert config.trainer.callbacks[0].class_path == "callbacks.SensitivityCallback"


# ------------------------------------------------------------------------ configs/sweeps/
def sweep_points(parameters: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Points of a sweep that take every value of every parameter at least once (as many as
    the longest list of values, not the whole grid)."""
    choices = {name: spec["values"] if "values" in spec else [spec["value"]]
               for name, spec in parameters.items()}
    for i in range(max(map(len, choices.values()))):
        yield {name: values[i % len(values)] for name, values in choices.items()}


def test_there_are_example_sweeps_of_both_programs():
    programs = {sweep_utils.load_sweep_config(str(path))["program"] for path in SWEEPS}
    assert programs == {"analyze.py", "train.py"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_example_sweep_runs_commands_its_program_accepts(path):
    sweep = sweep_utils.load_sweep_config(str(path))  # as `wandb sweep` reads it
    assert sweep is not None and (ROOT / sweep["program"]).is_file()
    assert "${args}" in sweep["command"] and "${program}" in sweep["command"]
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":  # a grid takes listed values only
        assert all({"values", "value"} & set(spec) for spec in parameters.values())
    for point in sweep_points(parameters):
        command = agent_command(sweep, point)
        assert command[:3] == ["/usr/bin/env", "python", sweep["program"]]
        if sweep["program"] == "analyze.py":
            config = parse_analyze(command[3], command[4:])
            parser = analyze_parser(command[3])
            # Settings a run would refuse at its start: the problem and the engine's.
            build_problem(config, n_classes=config.data.num_classes)
            engine_config(config)
        else:
            config, parser = parse_train(command[3:])
        for name, value in point.items():
            (action,) = [a for a in parser._actions if f"--{name}" in a.option_strings]
            assert config[action.dest] == value, name
        # The runs log online into the sweep's project: an offline run never reports to it.
        assert config.wandb_project == sweep["project"]
