"""Weights that load right or not at all: the organism loaders refuse checkpoints with missing, unexpected or
mismatched keys (naming the keys and the transformers version) and the shipped weights load cleanly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from vtprune.experiments.organism import QWEN_WEIGHTS_DIR, WEIGHTS_DIR, OrganismWeightsError, load_organism
from vtprune.experiments.organism.loading import checked_from_pretrained, load_qwen_organism


def _shipped(root: Path) -> Path:
    if not (root / "model.safetensors").exists():
        pytest.skip(f"no weights shipped in {root}")
    return root


def _tampered_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the weights folder with ``edit(tensors) -> tensors`` applied to its safetensors file."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(dict(tensors)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _rename_prefix(old: str, new: str):
    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}

    return edit


def _drop(fragment: str):
    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in tensors.items() if fragment not in k}

    return edit


def _first_key(root: Path, fragment: str) -> str:
    return sorted(k for k in load_file(str(root / "model.safetensors")) if fragment in k)[0]


# ---------------------------------------------------------------- the shipped LLaVA organism
def test_shipped_llava_organism_loads_every_key() -> None:
    root = _shipped(WEIGHTS_DIR)
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(root, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model, _ = load_organism()
    assert not model.training


def test_renamed_keys_are_refused_with_the_keys_and_the_version(tmp_path: Path) -> None:
    root = _shipped(WEIGHTS_DIR)
    key = _first_key(root, "vision_tower")
    prefix = key.split("vision_tower")[0] + "vision_tower"
    copy = _tampered_copy(root, tmp_path / "renamed", _rename_prefix(prefix, prefix + "_v2"))
    with pytest.raises(OrganismWeightsError) as raised:
        load_organism(path=copy)
    message = str(raised.value)
    assert transformers.__version__ in message
    assert "missing keys" in message and "unexpected keys" in message
    assert "vision_tower_v2" in message  # the unexpected (renamed) key is named
    assert str(copy) in message


def test_missing_keys_are_refused(tmp_path: Path) -> None:
    root = _shipped(WEIGHTS_DIR)
    copy = _tampered_copy(root, tmp_path / "missing", _drop("multi_modal_projector"))
    with pytest.raises(OrganismWeightsError, match=r"missing keys: .*multi_modal_projector"):
        load_organism(path=copy)


def test_mismatched_shapes_are_refused(tmp_path: Path) -> None:
    root = _shipped(WEIGHTS_DIR)
    key = _first_key(root, "multi_modal_projector.linear_2.bias")

    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, dtype=tensors[key].dtype)
        return tensors

    copy = _tampered_copy(root, tmp_path / "mismatched", edit)
    with pytest.raises(OrganismWeightsError, match=r"mismatched keys: .*multi_modal_projector\.linear_2\.bias"):
        load_organism(path=copy)


def test_checked_loader_passes_a_clean_tiny_qwen(tmp_path: Path) -> None:
    """A saved Qwen2-VL organism (tiny, random) reloads through the checked loader; a renamed copy does not."""
    from vtprune.experiments.organism.qwen_model import QwenSpec, build_qwen_model
    from vtprune.experiments.organism.qwen_processor import build_qwen_processor

    spec = QwenSpec(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)
    model = build_qwen_model(spec)
    model.save_pretrained(tmp_path / "clean")
    build_qwen_processor().save_pretrained(tmp_path / "clean")
    loaded, processor = load_qwen_organism(path=tmp_path / "clean")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert processor.image_token == "<|image_pad|>"
    key = _first_key(tmp_path / "clean", "merger")  # transformers saves its own (version-dependent) key layout
    prefix = key.split("merger")[0]
    copy = _tampered_copy(tmp_path / "clean", tmp_path / "renamed", _rename_prefix(prefix, prefix + "renamed."))
    with pytest.raises(OrganismWeightsError, match=r"Qwen2VLForConditionalGeneration .*missing keys: .*visual"):
        load_qwen_organism(path=copy)


# ---------------------------------------------------------------- the shipped Qwen2-VL organism
def test_shipped_qwen_organism_loads_every_key() -> None:
    root = _shipped(QWEN_WEIGHTS_DIR)
    _, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(root, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model, processor = load_qwen_organism()
    assert isinstance(model, transformers.Qwen2VLForConditionalGeneration)
    assert isinstance(processor, transformers.Qwen2VLProcessor)


def test_shipped_qwen_renamed_copy_is_refused(tmp_path: Path) -> None:
    root = _shipped(QWEN_WEIGHTS_DIR)
    copy = _tampered_copy(root, tmp_path / "renamed", _drop("merger"))
    with pytest.raises(OrganismWeightsError, match=r"missing keys: .*merger"):
        load_qwen_organism(path=copy)


def test_hf_backend_refuses_a_tampered_shipped_organism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment runner loads ``pkg:`` models (the shipped organisms) through the checked loader."""
    root = _shipped(WEIGHTS_DIR)
    from vtprune.experiments import models

    copy = _tampered_copy(root, tmp_path / "missing", _drop("multi_modal_projector"))
    monkeypatch.setattr(models, "resolve_model_path", lambda name: str(copy))
    with pytest.raises(OrganismWeightsError, match="multi_modal_projector"):
        models.HFBackend({"name": "pkg:vtprune.experiments.organism/weights", "dtype": "float32", "device": "cpu"})


def test_checked_from_pretrained_returns_eval_mode() -> None:
    root = _shipped(WEIGHTS_DIR)
    model = checked_from_pretrained(transformers.LlavaForConditionalGeneration, root)
    assert not model.training
