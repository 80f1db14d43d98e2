"""Read a W&B run file (`run-*.wandb`, what offline mode writes) back: its history rows and its config.

The file is a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of records with a 7-byte
header each: checksum, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def history(path: Path) -> list[dict]:
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: Path) -> dict:
    """The run config (sent with the run record, and in later config updates)."""
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def run_file(wandb_dir: Path) -> Path:
    [path] = list(wandb_dir.glob("offline-run-*/run-*.wandb"))
    return path



def tables(run_dir: Path, key: str) -> dict[int, dict]:
    """The tables logged under `key`, by step. A history row holds a reference to each, its fields nested
    under the key (`<key>/_type` is `table-file`, `<key>/path` a path under the run's files/); the table
    itself ({"columns": [...], "data": [[...], ...]}) is the JSON file there."""
    out = {}
    for row in history(next(run_dir.glob("run-*.wandb"))):
        ref = {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(f"{key}/")}
        if ref.get("_type") is None:
            continue
        assert ref["_type"] == "table-file", ref
        table = json.loads((run_dir / "files" / ref["path"]).read_text())
        assert (ref["ncols"], ref["nrows"]) == (len(table["columns"]), len(table["data"])), ref
        out[row["_step"]] = table
    return out
