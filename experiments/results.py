"""Results on disk: crash-safe JSONL and the layout of a results directory.

::

    RESULTS_DIR/
      grid.yaml                  the resolved grid (last ``vtprune run``)
      cells.jsonl                one line per finished or failed cell (status, config, metrics, traceback)
      cells/<key>/config.yaml    the cell's resolved config
      cells/<key>/samples.jsonl  one line per sample, appended as it is scored
      cells/<key>/overlays/      kept-token overlays of the first samples (PNG)
      report/                    ``vtprune report`` output

Lines are written whole (one ``write`` of ``json + "\\n"``), flushed and fsynced; a reader skips a
last line without its newline or that does not parse (what a crash mid-write can leave), so a
file is never unreadable. The latest line of a cell in ``cells.jsonl`` is its state.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "x.jsonl"
>>> append_jsonl(path, {"a": 1}); _ = path.open("a").write('{"a": 2')   # a torn write
>>> list(read_jsonl(path))
[{'a': 1}]
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

__all__ = ["append_jsonl", "read_jsonl", "ResultsDir", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy values and paths as plain JSON values (non-finite floats as None)."""
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def append_jsonl(path: Union[str, Path], record: Mapping[str, Any]) -> None:
    """Append one record as one line, then flush and fsync. If the file ends with a torn line (a
    crash mid-write), a newline is written first so the new record starts on its own line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), sort_keys=False) + "\n"
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    line = "\n" + line
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file; lines that do not parse (a torn last line) are skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for raw in handle:
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


class ResultsDir:
    """Paths and state of one results directory."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)

    @property
    def cells_file(self) -> Path:
        return self.root / "cells.jsonl"

    def cell_dir(self, key: str) -> Path:
        return self.root / "cells" / key

    def samples_file(self, key: str) -> Path:
        return self.cell_dir(key) / "samples.jsonl"

    def overlay_dir(self, key: str) -> Path:
        return self.cell_dir(key) / "overlays"

    def states(self) -> dict[str, dict[str, Any]]:
        """Latest ``cells.jsonl`` record of every cell (``status``: "done" or "failed")."""
        latest: dict[str, dict[str, Any]] = {}
        for record in read_jsonl(self.cells_file):
            if "key" in record:
                latest[record["key"]] = record
        return latest

    def status(self, key: str) -> Optional[str]:
        state = self.states().get(key)
        return state.get("status") if state else None

    def record(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.cells_file, record)

    def archive_samples(self, key: str) -> Optional[Path]:
        """Move a cell's ``samples.jsonl`` aside (``samples.<n>.stale.jsonl``) so the cell starts afresh."""
        source = self.samples_file(key)
        if not source.exists():
            return None
        number = len(list(source.parent.glob("samples.*.stale.jsonl")))
        target = source.parent / f"samples.{number}.stale.jsonl"
        os.replace(source, target)
        return target

    def samples(self, key: str) -> list[dict[str, Any]]:
        """Per-sample rows of a cell, the last row per sample id."""
        rows: dict[str, dict[str, Any]] = {}
        for row in read_jsonl(self.samples_file(key)):
            rows[str(row.get("id"))] = row
        return list(rows.values())
