"""benchmarks/openvino_peer.py without OpenVINO: the clean skip and the pruning-ratio -> kept-count mapping."""

from __future__ import annotations

import builtins
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import openvino_peer  # noqa: E402


def test_skips_cleanly_when_the_extra_is_missing(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino_genai" else real(name, *a))
    assert openvino_peer.main(["--tiny"]) == 0
    assert capsys.readouterr().out.strip() == openvino_peer.EXTRA_MISSING


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is not None, reason="the extra is installed here")
def test_script_exits_zero_without_the_extra() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "openvino_peer.py"), "--tiny"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "skipped" in done.stdout


def test_ratio_to_kept_count_mapping() -> None:
    # issue 20: 64 visual tokens -> 32 / 16 / 6 at ratios 50 / 75 / 90 (round half away from zero)
    assert openvino_peer.kept_counts([50, 75, 90]) == {50: 32, 75: 16, 90: 6}
    assert openvino_peer.kept_counts([0, 100, 33, 99], tokens=64) == {0: 64, 100: 64, 33: 43, 99: 1}
    assert openvino_peer.kept_counts([50], tokens=3) == {50: 2}  # 1.5 rounds up, not to even


def test_wilson_interval() -> None:
    low, high = openvino_peer.wilson_interval(20, 40)
    assert low < 0.5 < high and abs((low + high) / 2 - 0.5) < 1e-12
    assert openvino_peer.wilson_interval(0, 0) == (0.0, 1.0)
    assert openvino_peer.wilson_interval(40, 40)[1] == 1.0
