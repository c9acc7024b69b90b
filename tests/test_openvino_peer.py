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


def _word_level(pre_tokenizer: object) -> "object":
    from tokenizers import Tokenizer, models

    vocab = {w: i for i, w in enumerate(["<unk>", "USER:", "ASSISTANT:", "what", "color", "?", "red", "a,b"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    return tok


def test_ov_tokenizer_json_keeps_the_whitespace_split() -> None:
    # openvino-tokenizers turns WhitespaceSplit into a punctuation-splitting regex; the rewrite must tokenize
    # exactly as the original does in tokenizers (python str.split semantics), punctuation glued to words
    import json

    from tokenizers import Tokenizer, pre_tokenizers

    original = _word_level(pre_tokenizers.WhitespaceSplit())
    as_json = json.loads(original.to_str())
    fixed, replaced = openvino_peer.ov_tokenizer_json(as_json)
    assert replaced == 1 and as_json["pre_tokenizer"]["type"] == "WhitespaceSplit"  # input untouched
    assert fixed["pre_tokenizer"] == openvino_peer.WHITESPACE_SPLIT
    rewritten = Tokenizer.from_str(json.dumps(fixed))
    texts = ["USER: what color ? ASSISTANT:", "  USER:\twhat\n\ncolor?  ASSISTANT: ", "a,b red", "", "   "]
    for text in texts:
        assert rewritten.encode(text).ids == original.encode(text).ids == [original.token_to_id(w) or 0 for w in text.split()]


def test_ov_tokenizer_json_inside_a_sequence_and_untouched_otherwise() -> None:
    import json

    from tokenizers import pre_tokenizers

    seq = json.loads(_word_level(pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits()])).to_str())
    fixed, replaced = openvino_peer.ov_tokenizer_json(seq)
    assert replaced == 1
    assert [p["type"] for p in fixed["pre_tokenizer"]["pretokenizers"]] == ["Split", "Digits"]
    byte_level = json.loads(_word_level(pre_tokenizers.ByteLevel()).to_str())
    assert openvino_peer.ov_tokenizer_json(byte_level) == (byte_level, 0)


def test_prompt_template_fills_image_and_question() -> None:
    text = openvino_peer._prompt(openvino_peer.ORGANISM_TEMPLATE, openvino_peer.OV_IMAGE_TAG, "what color ?")
    assert text == "USER: <|vision_start|><|image_pad|><|vision_end|> what color ? ASSISTANT:"
