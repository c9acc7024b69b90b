"""The benchmark scripts run (tiny sizes) and report identical picks for fps and the naive loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_selection_benchmark_runs_and_agrees_with_the_naive_loop(tmp_path) -> None:
    out = tmp_path / "selection.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--tokens", "72", "--batch", "1", "3", "--dim", "16",
         "--repeats", "1", "--recipes", "zspaprune", "divprune", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = json.loads(out.read_text())
    comparisons = [r for r in rows if r["recipe"] == "fps vs naive loop"]
    assert len(comparisons) == 2 and all(r["same_selection"] for r in comparisons)
    assert {r["recipe"] for r in rows} >= {"zspaprune", "divprune"}
