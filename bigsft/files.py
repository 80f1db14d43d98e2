"""Files that readers never see half-written: written beside their name, then renamed over it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomically(path: Path, text: str, *, durable: bool = False) -> None:
    """`path` holds either its old contents or all of `text`, never part of it. `durable`: synced to disk
    before the rename (a marker that must survive a node's crash: checkpoints' best.json, FAILED)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomically(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
