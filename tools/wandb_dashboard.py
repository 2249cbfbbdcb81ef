#!/usr/bin/env python
"""The W&B dashboard of this project: print its recipe, save it as a workspace view, link the
lineage of offline analyses (docs/CLI.md "W&B"; the recipe: ``callbacks.wandb_dashboard``).

    .venv/bin/python tools/wandb_dashboard.py recipe --results runs/demo/version_0/sensitivity.h5
    .venv/bin/python tools/wandb_dashboard.py workspace --results FILE --entity E --project P
    .venv/bin/python tools/wandb_dashboard.py link --run-dir runs/x/version_0 --entity E --project P

``recipe`` needs no network; ``workspace`` (saves the view, prints its address) and ``link``
(after ``wandb sync``) do, with W&B credentials (``wandb login`` or WANDB_API_KEY); nothing
prompts. Exit status: 0 done; 1 W&B failed, or some run could not be linked; 2 bad input (no
results file, no analysis with indices in it, no offline run), with a message on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# A script, not a module of the package: the repository root goes on the path for its imports.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROG = "wandb_dashboard.py"
DEFAULT_NAME = "augsens: sensitivity by layer"


def parser() -> argparse.ArgumentParser:
    """The command line: the subcommands recipe, workspace and link."""
    main = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    for name, text in (("recipe", "print the dashboard recipe (no network)"),
                       ("workspace", "save the recipe as a W&B workspace view (network)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--results", type=Path, action="append", required=True,
                             help="results file (results.h5, sensitivity.h5); repeat it to "
                                  "cover the layers and variables of several runs")
        command.add_argument("--no-training", dest="training", action="store_false",
                             help="leave out the Training section and final/val_acc1")
        if name == "recipe":
            command.add_argument("--format", choices=("yaml", "json"), default="yaml")
        else:
            command.add_argument("--entity", required=True, help="W&B entity (user or team)")
            command.add_argument("--project", required=True, help="W&B project")
            command.add_argument("--name", default=DEFAULT_NAME, help="the view's name")
            command.add_argument("--any-variable", action="store_true",
                                 help="chart every logged variable (metric regex), not only "
                                      "the results files' (runs of other augmentation sets)")
    link = commands.add_parser(
        "link", help="declare the checkpoints offline analyses read (after wandb sync)",
        description="For each synced offline analysis of a train.py checkpoint, declare the "
                    "checkpoint artifact version with the recorded digest as its input.")
    link.add_argument("--run-dir", type=Path, required=True,
                      help="a run directory (its wandb/offline-run-*) or one offline-run-* folder")
    link.add_argument("--entity", required=True, help="W&B entity the runs were synced to")
    link.add_argument("--project", required=True, help="W&B project the runs were synced to")
    return main


def error(command: str, message: object, status: int) -> int:
    """Print ``wandb_dashboard.py <command>: error: <message>`` on stderr; return ``status``."""
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def no_prompt() -> Iterator[None]:
    """W&B without its login prompt: stdin reads as no terminal, so that missing credentials
    raise wandb's UsageError (a ``wandb.Error``) instead of waiting for a key to be typed."""
    stdin, sys.stdin = sys.stdin, io.StringIO()
    try:
        yield
    finally:
        sys.stdin = stdin


CREDENTIALS = "check wandb login / WANDB_API_KEY, the network, and the entity and project"


def recipe_of(args: argparse.Namespace) -> dict:
    """The recipe of the ``--results`` files (FileNotFoundError, ValueError: bad input)."""
    from callbacks.wandb_dashboard import dashboard_recipe, merge_layouts, read_layouts

    layouts = merge_layouts(layout for path in args.results for layout in read_layouts(path))
    return dashboard_recipe(layouts, training=args.training)


def print_recipe(recipe: dict, fmt: str) -> None:
    """The recipe on stdout as YAML (block style, keys in recipe order) or indented JSON."""
    if fmt == "json":
        print(json.dumps(recipe, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(recipe, sort_keys=False, width=100), end="")


def save_workspace(args: argparse.Namespace, recipe: dict) -> int:
    """Save the recipe as a view of ``--entity/--project``; print its address."""
    import wandb

    from callbacks.wandb_dashboard import build_workspace

    workspace = build_workspace(recipe, args.entity, args.project, args.name,
                                any_variable=args.any_variable)
    try:
        with no_prompt():
            workspace.save()
            print(workspace.url)
    except (wandb.Error, OSError, ValueError) as failure:  # auth, network, server refusal
        return error("workspace", f"W&B failed ({failure}); {CREDENTIALS}", 1)
    return 0


def link(args: argparse.Namespace) -> int:
    """Declare the checkpoint inputs of the synced offline runs of ``--run-dir``."""
    from callbacks.wandb_dashboard import link_run, offline_run_ids

    try:
        run_ids = offline_run_ids(args.run_dir)
    except FileNotFoundError as failure:
        return error("link", failure, 2)
    import wandb

    status = 0
    try:
        with no_prompt():
            api = wandb.Api()
            for run_id in run_ids:
                ok, line = link_run(api, args.entity, args.project, run_id)
                print(line, flush=True)
                status = status if ok else 1
    except (wandb.Error, OSError) as failure:  # no credentials, no network
        return error("link", f"W&B failed ({failure}); {CREDENTIALS}", 1)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand.

    Args:
        argv: the arguments (default: the command line).

    Returns:
        The exit status (module docstring).
    """
    args = parser().parse_args(argv)
    if args.command == "link":
        return link(args)
    try:
        recipe = recipe_of(args)
    except (FileNotFoundError, ValueError) as failure:
        return error(args.command, failure, 2)
    if args.command == "recipe":
        print_recipe(recipe, args.format)
        return 0
    return save_workspace(args, recipe)


if __name__ == "__main__":
    sys.exit(main())
