"""Reading what a W&B offline run wrote: records of its transaction log, logged rows, and the
check that a Sobol' analysis's summary reached it (shared by the training, callback and
analyze.py tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb
from PIL import Image
from wandb.proto import wandb_internal_pb2

from callbacks.wandb_logging import metric_key


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Protobuf records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-log
    blocks of 32 KiB holding chunks (crc 4 bytes, length 2 LE, type 1 full / 2 first / 3 middle
    / 4 last, payload); a block tail too short for a chunk header is padding."""
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", "not a W&B transaction log"
    payloads, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = b""
        pending += chunk
        if kind in (1, 4):
            payloads.append(pending)
    return [wandb_internal_pb2.Record.FromString(p) for p in payloads]


def history_row(history: wandb_internal_pb2.HistoryRecord) -> dict:
    """One logged row; media values (nested keys [metric, field]) become dicts."""
    row: dict = {}
    for item in history.item:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        target = row
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = json.loads(item.value_json)
    return row


def run_config(records: list[wandb_internal_pb2.Record]) -> dict:
    """A run's config: the run record's, updated by the later config records in order
    (nested keys as nested dicts)."""
    config: dict = {}
    updates = [item for r in records if r.HasField("run") for item in r.run.config.update]
    updates += [item for r in records if r.HasField("config") for item in r.config.update]
    for item in updates:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        target = config
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = json.loads(item.value_json)
    return config


def run_summary(records: list[wandb_internal_pb2.Record]) -> dict:
    """A run's summary: its summary records' updates in order (nested keys joined by '.')."""
    summary: dict = {}
    for r in records:
        if r.HasField("summary"):
            for item in r.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary


def artifacts(records: list[wandb_internal_pb2.Record], kind: str
              ) -> list[wandb_internal_pb2.ArtifactRecord]:
    """The artifact records of one type (e.g. "model", "sensitivity-results")."""
    return [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == kind]


def assert_sobol_summary_logged(row: dict, summary: dict, layers: list[str], files: Path) -> None:
    """``row`` holds, for every layer and variable of ``summary`` (``AnalysisResult.summary()``),
    the median and mean of S1 and ST and the median of their half-widths under their metric
    keys, each layer's share of valid units, and a PNG heatmap per index, stored under the
    run's ``files`` folder. NaN (no valid unit) is logged as NaN."""
    assert set(summary) == {"S1", "S1_conf", "ST", "ST_conf"}
    for key, per_layer in summary.items():
        assert list(per_layer) == layers
        statistics = ("median",) if key.endswith("_conf") else ("median", "mean")
        for layer, values in per_layer.items():
            for variable, stats in values.items():
                for statistic in statistics:
                    logged = row[f"{metric_key('sobol', layer, variable, key)}/{statistic}"]
                    assert logged == pytest.approx(stats[statistic], nan_ok=True)
                fraction = row[f"sensitivity/sobol/{layer}/valid_fraction"]
                assert fraction == pytest.approx(stats["valid_fraction"])
    for key in ("S1", "ST"):
        image = row[f"sensitivity/sobol/heatmap/{key}"]
        assert image["_type"] == "image-file"
        with Image.open(files / image["path"]) as png:
            assert png.format == "PNG" and min(png.size) > 200


def same_summary(a: object, b: object) -> bool:
    """Whether two summaries (or history entries) are equal, NaN equal to NaN (a layer without
    valid units has NaN statistics)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def offline_runs(run_dir: Path) -> list[list[wandb_internal_pb2.Record]]:
    """The records of every offline run under ``run_dir/wandb``, in folder order (the start
    time, then the run id)."""
    # run.finish() returns before W&B's core process has closed (flushed) the run's .wandb
    # file; teardown waits for it, as the exit of an analyze.py or train.py process does.
    wandb.teardown()
    runs = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = directory.glob("run-*.wandb")
        runs.append(read_wandb_records(log))
    return runs


def runs_by_command(run_dir: Path) -> dict[str, list[wandb_internal_pb2.Record]]:
    """{the analyze.py command (config "command"): records of its offline run} under
    ``run_dir/wandb``; of two runs of one command, the later folder's."""
    return {run_config(records)["command"]: records for records in offline_runs(run_dir)}
