"""Reads the metrics an offline W&B run wrote to its ``run-*.wandb`` file (a LevelDB-style log of
protobuf records), so tests can check what reached W&B without a server."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7  # LevelDB log block size; record header = crc32 (4) + length (2) + type (1)


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunk = 7, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            yield rec
            chunk = b""


def finished_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The records of the offline run under ``run_dir`` (a ``wandb/offline-run-*`` folder).

    wandb's writer process may still be flushing for a moment after ``wandb.finish()`` returns,
    so the file is re-read until its exit record is there (or ``timeout`` passes).
    """
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        recs = list(records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def run_info(run_dir: Path) -> dict:
    """The run's id, display name and group, and its config as logged (``{"recipe.timesteps": ...}``, JSON values)."""
    recs = finished_records(run_dir)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {"/".join(i.nested_key) or i.key: i.value_json for i in run.config.update}
    for rec in recs:
        if rec.WhichOneof("record_type") == "config":
            config.update({"/".join(i.nested_key) or i.key: i.value_json for i in rec.config.update})
    return {"id": run.run_id, "name": run.display_name, "group": run.run_group, "sweep": run.sweep_id, "config": config}


def history(run_dir: Path, timeout: float = 20.0) -> list[dict[str, str]]:
    """Every logged row of the offline run under ``run_dir`` (a ``wandb/offline-run-*`` folder)."""
    recs = finished_records(run_dir, timeout)
    return [
        {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
        for rec in recs
        if rec.WhichOneof("record_type") == "history"
    ]
