"""A W&B dashboard recipe: the panels that compare runs of this project, from a results file.

The recipe is plain data (JSON-able dicts and lists), built from what a results file holds
(``read_layouts``: per analysis method its layers, variables and summary keys) with the very
helpers the logger names its keys with (``callbacks.wandb_logging``), so that a panel cannot
ask for a key that is not logged:

- one section ``<method> / <layer>`` per method and layer: per value key (headline first) a
  line chart of every variable's median index against ``analysis/epoch``, one of the medians
  of its half-widths, and one of the layer's share of valid units;
- "Heatmaps": a media browser per method and value key (``sensitivity/<method>/heatmap/<key>``);
- "Training": validation accuracy, losses and training accuracy against the trainer's step;
- the runs grouped by config ``arch`` and ``problem.set``, with the summary columns
  ``dominant/<method>/<layer>`` and ``final/val_acc1`` pinned.

``build_workspace`` turns it into a ``wandb_workspaces`` Workspace without saving it (saving
needs the network: ``tools/wandb_dashboard.py workspace``). The lineage link of offline
analyses (``link_run``) runs after ``wandb sync`` through ``wandb.Api()``, which its caller
passes in. Nothing here touches the network; wandb and wandb_workspaces are imported inside
the functions that use them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callbacks.wandb_artifacts import CHECKPOINT_TYPE
from callbacks.wandb_logging import (
    PREFIX,
    STEP_METRIC,
    dominant_key,
    heatmap_key,
    metric_key,
    valid_fraction_key,
)
from callbacks.wandb_training import FINAL_METRICS, final_key
from sensitivity.results import PAIR_KEYS
from sensitivity.store import ResultsStore

RECIPE_VERSION = 1
# Lightning's WandbLogger charts every key it logs against this one (define_metric "*").
TRAINER_STEP = "trainer/global_step"
# The training run's history keys (lightning_modules/classifier.py logs them): (title, keys).
TRAINING_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("validation accuracy", FINAL_METRICS),
    ("loss", ("train/loss", "val/loss")),
    ("training accuracy", ("train/acc1",)),
)
# Config keys the runs are grouped by: the architecture, then the augmentation set ("1", "2",
# "custom"), as every run config carries them (wandb_config.problem_summary).
GROUP_BY = ("arch", "problem.set")
HEATMAPS_SECTION = "Heatmaps"
TRAINING_SECTION = "Training"


@dataclass(frozen=True)
class MethodLayout:
    """What the W&B runs of one analysis method log, as a results file describes it.

    Attributes:
        method: the analysis method ("sobol", "shapley", "contrast").
        layers: its layers, in the order they were analysed.
        variables: its variables (``group_names``; augmentations for contrast).
        keys: the keys of ``AnalysisResult.summary()``: the value keys, headline first, each
            followed by its half-width key ("S1", "S1_conf", "ST", "ST_conf"), then "S2",
            "S2_conf" with second-order indices.
    """

    method: str
    layers: tuple[str, ...]
    variables: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def value_keys(self) -> list[str]:
        """The per-variable value keys, headline first (e.g. ["S1", "ST"])."""
        return [k for k in self.keys if not k.endswith("_conf") and k not in PAIR_KEYS]

    @property
    def heatmaps(self) -> list[str]:
        """The keys with a logged heatmap: the value keys, and "S2" when present."""
        return [k for k in self.keys if not k.endswith("_conf")]


# --------------------------------------------------------------------------- layouts
def _ordered_union(*sequences: Iterable[str]) -> tuple[str, ...]:
    """The items of ``sequences`` in order of first appearance, each once."""
    return tuple(dict.fromkeys(item for sequence in sequences for item in sequence))


def read_layouts(path: str | Path) -> list[MethodLayout]:
    """The layout of every analysis method of a results file.

    Attributes of every analysis (cheap) give the layers and variables of a method (their
    union over its analyses: a training run has one per epoch); its latest analysis is read
    in full for the summary keys, computed as the logger computes them.

    Args:
        path: a results file (``results.h5``, a training run's ``sensitivity.h5``).

    Returns:
        One MethodLayout per method with logged indices, in order of first analysis;
        "variance" analyses (no per-variable index, nothing under ``sensitivity/``) are left
        out.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a results file, or no analysis with indices in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    store = ResultsStore(path)
    try:
        names = store.analyses()
    except OSError as error:  # h5py: not an HDF5 file
        raise ValueError(f"{path} is not a results file ({error})") from None
    by_method: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        attrs = store.analysis_attrs(name)
        by_method.setdefault(str(attrs["method"]), []).append({"name": name, **attrs})
    layouts = []
    for method, analyses in by_method.items():
        keys = tuple(store.read_analysis(analyses[-1]["name"]).summary())
        if keys:
            layouts.append(MethodLayout(
                method=method,
                layers=_ordered_union(*(a["layers"] for a in analyses)),
                variables=_ordered_union(*(a["group_names"] for a in analyses)),
                keys=keys,
            ))
    if not layouts:
        raise ValueError(
            f"no sensitivity analysis in {path} (analyses: {names or 'none'}); run a sobol, "
            "shapley or contrast analysis first (a variance analysis logs no indices)"
        )
    return layouts


def merge_layouts(layouts: Iterable[MethodLayout]) -> list[MethodLayout]:
    """Layouts of several results files as one: per method the union of layers, variables
    and keys (e.g. a ResNet18 and a VGG11 run, or sets 1 and 2), in order of first appearance.

    Args:
        layouts: ``read_layouts`` of every file, concatenated.

    Returns:
        One layout per method.
    """
    merged: dict[str, MethodLayout] = {}
    for layout in layouts:
        seen = merged.get(layout.method)
        merged[layout.method] = layout if seen is None else MethodLayout(
            layout.method, _ordered_union(seen.layers, layout.layers),
            _ordered_union(seen.variables, layout.variables),
            _ordered_union(seen.keys, layout.keys),
        )
    return list(merged.values())


# --------------------------------------------------------------------------- the recipe
def _median_chart(layout: MethodLayout, layer: str, key: str, title: str) -> dict[str, Any]:
    """A line chart of the median of ``key`` of every variable of a layer against the
    analysis epoch; its ``metric_regex`` matches any variable's (runs of another set)."""
    suffix = f"/{key}/median"
    return {
        "kind": "line",
        "title": title,
        "x": STEP_METRIC,
        "y": [metric_key(layout.method, layer, v, key) + "/median" for v in layout.variables],
        "metric_regex": "^" + re.escape(f"{PREFIX}/{layout.method}/{layer}/") + "[^/]+"
                        + re.escape(suffix) + "$",
    }


def layer_section(layout: MethodLayout, layer: str, is_open: bool = False) -> dict[str, Any]:
    """The section ``<method> / <layer>``: per value key its medians and the medians of its
    half-widths (when logged), then the layer's share of valid units.

    Args:
        layout: the method's layout.
        layer: one of its layers.
        is_open: whether the section starts expanded.

    Returns:
        {"name", "is_open", "panels": [{"kind": "line", "title", "x", "y", "metric_regex"?}]}.
    """
    panels = []
    for key in layout.value_keys:
        panels.append(_median_chart(layout, layer, key, f"{layout.method} {layer}: median {key}"))
        if f"{key}_conf" in layout.keys:
            panels.append(_median_chart(layout, layer, f"{key}_conf",
                                        f"{layout.method} {layer}: median {key} half-width"))
    panels.append({"kind": "line", "title": f"{layout.method} {layer}: share of valid units",
                   "x": STEP_METRIC, "y": [valid_fraction_key(layout.method, layer)]})
    return {"name": f"{layout.method} / {layer}", "is_open": is_open, "panels": panels}


def dashboard_recipe(layouts: Sequence[MethodLayout], training: bool = True) -> dict[str, Any]:
    """The dashboard of the runs that logged these analyses (see the module docstring).

    Args:
        layouts: ``read_layouts`` (or ``merge_layouts``) of the results files.
        training: add the "Training" section and the ``final/val_acc1`` column.

    Returns:
        {"version", "step_metric", "sections": [{"name", "is_open", "panels"}], "groupby":
        config keys, "pinned_columns": ["summary:<key>", ...]}; a line panel is {"kind":
        "line", "title", "x", "y": exact keys, "metric_regex"?}, a media panel {"kind":
        "media", "title", "keys"}. Only str, bool, list and dict: it dumps to JSON and YAML.
    """
    sections = [layer_section(layout, layer, is_open=not (i or j))
                for i, layout in enumerate(layouts) for j, layer in enumerate(layout.layers)]
    media = [{"kind": "media", "title": f"{layout.method} {key}",
              "keys": [heatmap_key(layout.method, key)]}
             for layout in layouts for key in layout.heatmaps]
    sections.append({"name": HEATMAPS_SECTION, "is_open": False, "panels": media})
    pinned = [f"summary:{dominant_key(layout.method, layer)}"
              for layout in layouts for layer in layout.layers]
    if training:
        sections.append({"name": TRAINING_SECTION, "is_open": True, "panels": [
            {"kind": "line", "title": title, "x": TRAINER_STEP, "y": list(keys)}
            for title, keys in TRAINING_CHARTS]})
        pinned.append(f"summary:{final_key(FINAL_METRICS[0])}")
    return {"version": RECIPE_VERSION, "step_metric": STEP_METRIC, "sections": sections,
            "groupby": list(GROUP_BY), "pinned_columns": pinned}


def recipe_keys(recipe: Mapping[str, Any], kind: str = "line") -> list[str]:
    """The exact history keys a recipe's panels of one kind ask for, each once.

    Args:
        recipe: ``dashboard_recipe``'s.
        kind: "line" (the y keys) or "media".

    Returns:
        The keys in panel order.
    """
    field = "y" if kind == "line" else "keys"
    return list(_ordered_union(*(panel[field] for section in recipe["sections"]
                                 for panel in section["panels"] if panel["kind"] == kind)))


# --------------------------------------------------------------------------- wandb_workspaces
def _panel(panel: Mapping[str, Any], any_variable: bool) -> Any:
    """One recipe panel as a wandb_workspaces panel (``wr.LinePlot``, ``wr.MediaBrowser``)."""
    import wandb_workspaces.reports.v2 as wr

    if panel["kind"] == "media":
        return wr.MediaBrowser(title=panel["title"], media_keys=list(panel["keys"]))
    if panel["kind"] != "line":
        raise ValueError(f"unknown panel kind {panel['kind']!r} in the recipe")
    regex = panel.get("metric_regex") if any_variable else None
    return wr.LinePlot(title=panel["title"], x=panel["x"], y=list(panel["y"]),
                       metric_regex=regex)


def build_workspace(recipe: Mapping[str, Any], entity: str, project: str, name: str,
                    any_variable: bool = False) -> Any:
    """The recipe as a saved-view definition, not saved (``.save()`` needs the network).

    Args:
        recipe: ``dashboard_recipe``'s.
        entity: the W&B entity (user or team) of the project.
        project: the W&B project.
        name: the view's name.
        any_variable: chart every variable a run logged (``metric_regex``) instead of the
            recipe's exact keys: for runs of another augmentation set than the file's.

    Returns:
        A ``wandb_workspaces.workspaces.Workspace``: the recipe's sections, the runs grouped by
        the config keys of ``recipe["groupby"]``, its columns pinned.
    """
    import wandb_workspaces.workspaces as ws

    sections = [ws.Section(name=section["name"], is_open=section["is_open"],
                           panels=[_panel(p, any_variable) for p in section["panels"]])
                for section in recipe["sections"]]
    runset = ws.RunsetSettings(groupby=[ws.Config(key) for key in recipe["groupby"]],
                               pinned_columns=list(recipe["pinned_columns"]))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=runset)


# --------------------------------------------------------------------------- lineage link
def offline_run_ids(path: str | Path) -> list[str]:
    """The ids of the offline W&B runs under a run directory.

    Args:
        path: a run directory (runs under ``<path>/wandb/offline-run-*``), its ``wandb``
            folder, or one ``offline-run-*`` folder.

    Returns:
        The run ids (of the ``run-<id>.wandb`` transaction logs), sorted by folder name.

    Raises:
        FileNotFoundError: no such directory, or no offline run in it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no directory {path}")
    folders = [path] if path.name.startswith("offline-run-") else sorted(
        [*path.glob("offline-run-*"), *path.glob("wandb/offline-run-*")])
    ids = [log.name.removeprefix("run-").removesuffix(".wandb")
           for folder in folders for log in sorted(folder.glob("run-*.wandb"))]
    if not ids:
        raise FileNotFoundError(f"no offline W&B run in {path} (looked for "
                                "offline-run-*/run-<id>.wandb there and under wandb/)")
    return ids


def matching_version(versions: Iterable[Any], digest: str) -> Any | None:
    """The artifact version whose content digest is ``digest``.

    Args:
        versions: artifact versions (``wandb.Api().artifacts(type, name)``).
        digest: the digest an analysis recorded (``inputs.checkpoint.digest``).

    Returns:
        The first version with that digest, None when there is none.
    """
    return next((version for version in versions if version.digest == digest), None)


def link_run(api: Any, entity: str, project: str, run_id: str) -> tuple[bool, str]:
    """Declare the checkpoint an offline analysis read as its input, after ``wandb sync``.

    An offline analysis of a train.py checkpoint records ``inputs.checkpoint`` = {artifact:
    ``checkpoint-<training run id>``, digest, used: False} in its config
    (``wandb_artifacts.use_checkpoint``); the version of that artifact with that digest is
    declared used by the synced run, which gives the lineage train -> checkpoint -> analysis.

    Args:
        api: a ``wandb.Api()`` (the network), or a stand-in with ``run(path)`` and
            ``artifacts(type_name, name)``.
        entity, project: where the runs and the checkpoint artifacts were synced.
        run_id: the analysis run's id.

    Returns:
        (success, a line saying what was done); failure: no such run, or no version of the
        artifact with the recorded digest (the training run not synced, or another project).
    """
    from wandb.errors import Error as WandbError

    where = f"{entity}/{project}"
    try:
        run = api.run(f"{where}/{run_id}")
        inputs = (run.config.get("inputs") or {}).get("checkpoint")
        if not inputs:
            return True, f"{run_id}: no checkpoint input, nothing to link"
        if inputs.get("used"):
            return True, f"{run_id}: {inputs['artifact']} declared when it ran (online)"
        versions = api.artifacts(CHECKPOINT_TYPE, f"{where}/{inputs['artifact']}")
        match = matching_version(versions, inputs["digest"])
        if match is None:
            return False, (f"{run_id}: no version of {where}/{inputs['artifact']} has digest "
                           f"{inputs['digest']}; sync the training run {inputs['training_run']} "
                           "first (wandb sync <its run directory>/wandb/offline-run-*)")
        if any(used.id == match.id for used in run.used_artifacts()):
            return True, f"{run_id}: uses {match.name} (already linked)"
        run.use_artifact(match)
        return True, f"{run_id}: uses {match.name}"
    except (ValueError, WandbError) as error:  # RunNotFoundError is a ValueError
        return False, f"{run_id}: {error} (was it synced to {where}? wandb sync <run folder>)"
