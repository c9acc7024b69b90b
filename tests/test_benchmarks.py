"""The benchmark scripts run (tiny sizes) and report identical picks for fps and the naive loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark scripts in subprocesses

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


def test_selection_benchmark_counts_ops_and_estimates_gpu_time(tmp_path) -> None:
    out = tmp_path / "selection.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--tokens", "72", "--batch", "1", "--dim", "16",
         "--repeats", "1", "--recipes", "zspaprune", "fastv", "--count-ops", "--naive-max-tokens", "0", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"zspaprune", "fastv", "fastv bare ops"}
    assert rows.pop("fastv bare ops")["select_over_bare"] > 0  # FastV's own ops timed beside its select
    for row in rows.values():
        assert 0 < row["launches"] <= row["ops"] and row["bytes"] > 0
        assert row["gpu_fraction_of_ideal_prefill"] == row["gpu_estimate_s"] / row["gpu_ideal_prefill_s"] > 0
    assert rows["fastv"]["ops"] < rows["zspaprune"]["ops"]
    assert "of the 7B ideal prefill" in result.stdout


@pytest.mark.slow
def test_selection_benchmark_times_the_compiled_select(tmp_path) -> None:
    out = tmp_path / "selection.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--tokens", "36", "--batch", "1", "--dim", "16",
         "--repeats", "1", "--recipes", "fastv", "zspaprune_dynamic", "--compiled", "--naive-max-tokens", "0",
         "--threads", "1", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert rows["fastv"]["compiled_same_selection"] and rows["fastv"]["compiled_seconds"] > 0
    assert "dynamic" in rows["zspaprune_dynamic"]["compile_error"]  # a score-dependent split does not compile


def test_selection_benchmark_reports_fraction_of_prefill(tmp_path) -> None:
    out = tmp_path / "selection.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--tokens", "16", "--batch", "1", "--dim", "16",
         "--repeats", "1", "--recipes", "zspaprune", "--prefill", "--prefill-layers", "1", "--prefill-profile", "tiny", "--threads", "1",
         "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    row = next(r for r in json.loads(out.read_text()) if r["recipe"] == "zspaprune")
    assert row["prefill_image_tokens"] == 16 and row["prefill_s"] > 0
    assert abs(row["fraction_of_prefill"] - row["seconds"] / row["prefill_s"]) < 1e-12


def test_sparsevlm_distance_benchmark_runs_and_both_arithmetics_select_the_same() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparsevlm_distances.py"), "--tokens", "144", "--dim", "16",
         "--repeats", "1", "--prefill-layers", "1", "--prefill-profile", "tiny"],
        check=True, capture_output=True, text=True,
    )
    assert "before (cdist exact)" in done.stdout and "after (pdist)" in done.stdout
    assert "same selection: True" in done.stdout


def test_prefill_benchmark_writes_ratios_to_the_ideal(tmp_path) -> None:
    out = tmp_path / "prefill.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "--profile", "tiny", "--layers", "2", "--vision-layers", "1",
         "--image-size", "112", "--budgets", "64", "16", "--placements", "pre_llm", "layer", "--repeats", "1",
         "--threads", "1", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.read_text())
    rows = {(r["placement"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("pre_llm", 64), ("pre_llm", 16), ("layer", 64), ("layer", 16)}
    assert rows[("pre_llm", 16)]["kept"] == [16] and rows[("pre_llm", 64)]["kept"] == [64]
    for row in rows.values():
        assert row["kv_vs_ideal"] == 1.0  # the pruned cache holds exactly the ideal's tokens
        assert row["time_vs_ideal"] > 0 and 0 < row["flops_ratio"] <= 1.0
    assert "time/ideal" in result.stdout


def test_ideal_prefill_with_every_token_is_the_model_itself() -> None:
    """The ideal path (tower, projector, own positions, layer by layer) reproduces the model's logits when
    nothing is dropped, for both families of profiles, so its timings are of the same computation."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _harness import batch_inputs, build_slice
    from prefill import ideal_prefill

    for profile in ("tiny", "tiny-qwen"):
        slice_ = build_slice(profile, 2, 1, "cpu", torch.float32)
        inputs = batch_inputs(slice_, 2)
        ids = inputs["input_ids"][0]
        image = torch.nonzero(ids == slice_.config.image_token_id).flatten()
        with torch.no_grad():
            ours = ideal_prefill(slice_.model, inputs, [ids.numel()] * 2, (int(image[0]), int(image[-1]) + 1))
            theirs = slice_.model(**inputs, logits_to_keep=1).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_selection_benchmark_video_profile_runs_every_supported_preset(tmp_path) -> None:
    """--profile video: video Signals (frames x side^2 tokens + one newline), every registered preset the
    LLaVA-OneVision adapter supports (none that it does not: vision / pre_llm_clip / vision_layers ones), each
    with its share of the measured prefill of the unpruned sequence."""
    out = tmp_path / "selection.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--profile", "video", "--batch", "1", "--frames", "3",
         "--frame-side", "2", "--dim", "16", "--repeats", "1", "--prefill-layers", "1", "--video-prefill-profile",
         "tiny-qwen", "--threads", "1", "--recipes", "fastv", "divprune", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fastv", "divprune"}
    for row in rows.values():
        assert row["N"] == 3 * 4 + 1 and row["K"] == round(0.25 * 13) and row["prefill_s"] > 0
        assert abs(row["fraction_of_prefill"] - row["seconds"] / row["prefill_s"]) < 1e-12
    assert "% of prefill" in result.stdout
    refused = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--profile", "video", "--frames", "2", "--frame-side",
         "2", "--dim", "16", "--video-prefill-profile", "tiny-qwen", "--recipes", "visionzip"],
        capture_output=True, text=True,
    )
    assert refused.returncode != 0 and "visionzip" in refused.stderr and "fastv" in refused.stderr


def test_video_profile_presets_are_the_supported_ones() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _video_profile import VIDEO_ADAPTER, video_presets, video_signals
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from vtprune.framework import build_registry, compose
    from vtprune.framework.support import support_problems

    registry = build_registry(autoload=False)
    names = [name for name, _ in video_presets(registry)]
    want = [name for name in registry.presets if not support_problems(VIDEO_ADAPTER, compose(name, registry=registry))]
    assert names == want and "fastv" in names and "visionzip" not in names and "cdpruner" not in names
    reads_frames = {name for name, video in video_presets(registry) if video}
    assert {"dycoke", "prunevid", "fastvid", "holitom"} <= reads_frames  # --video-only selects the video methods
    assert not reads_frames & {"fastv", "zspaprune", "random"}
    signals = video_signals(2, 3, 2, 16, heads=4, key_heads=2)
    assert signals.frames.tolist() == [[3, 2, 2]] * 2 and signals.frame_index[0, -1] == -1
    assert signals.attention.shape == (2, 4, 13) and signals.visual_keys.shape == (2, 13, 2, 4)


def test_official_benchmark_keeps_the_official_tokens_for_every_peer(tmp_path) -> None:
    """benchmarks/official.py: each peer's official selection step (transcribed in benchmarks/_official.py) and
    vtprune's select keep the same tokens on the same inputs (the script exits non-zero otherwise)."""
    out = tmp_path / "official.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "official.py"), "--tokens", "144", "--dim", "32", "--clip-width", "64",
         "--repeats", "1", "--target-seconds", "0", "--count-ops", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {
        "fastv", "fastv (full map)", "cdpruner", "divprune", "visionzip", "vispruner", "dart",
        "prumerge", "prumerge_plus", "gprune", "fitprune", "fitprune (full map)",
    }
    for row in rows.values():
        assert row["same_selection"] and row["official_s"] > 0 and row["vtprune_s"] > 0
        assert row["official_over_vtprune"] == row["official_s"] / row["vtprune_s"]
        assert row["official_ops"] > 0 and row["vtprune_ops"] > 0


def test_official_benchmark_fails_loudly_when_the_kept_tokens_differ() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from official import _same

    _same("fastv", [3, 1, 2], [1, 2, 3])  # order does not matter
    with pytest.raises(AssertionError, match="keep different tokens"):
        _same("fastv", [1, 2, 3], [1, 2, 4])
