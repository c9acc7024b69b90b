"""Loading the shipped organisms: weights that load right or not at all.

Contract
--------
``checked_from_pretrained(model_class, root, dtype)`` loads ``root`` with ``output_loading_info=True`` and
raises ``OrganismWeightsError`` when transformers reports any missing, unexpected or mismatched key (or a
loading error message): the message names the folder, the keys (up to ``SHOWN_KEYS`` of each kind) and the
installed transformers version. transformers itself renames the checkpoint prefixes it knows between its
versions (e.g. the pre-5 LLaVA layout ``language_model.model.*`` -> ``model.language_model.*``, which the
shipped LLaVA organism uses); anything it does not convert is refused here instead of being silently
replaced by random weights (transformers only logs a warning and returns the half-random model).

``load_processor(root)`` is ``AutoProcessor.from_pretrained`` with the torchvision-free fallback for a saved
``Qwen2VLProcessor`` (``qwen_processor.ImageOnlyQwen2VLProcessor``).

``load_organism`` / ``load_qwen_organism`` return ``(model in eval mode, processor)`` for the two shipped
organisms (``WEIGHTS_DIR``: LLaVA, ``QWEN_WEIGHTS_DIR``: Qwen2-VL), both checked; ``load_qwen_organism(path=
VIDEO_WEIGHTS_DIR)`` is the video organism (a Qwen2-VL organism with the video task's words, ``video_train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OrganismWeightsError", "QWEN_WEIGHTS_DIR", "SHOWN_KEYS", "VIDEO_WEIGHTS_DIR", "WEIGHTS_DIR", "checked_from_pretrained",
    "load_organism", "load_processor", "load_qwen_organism",
]

_HERE = Path(__file__).resolve().parent
WEIGHTS_DIR: Path = _HERE / "weights"
QWEN_WEIGHTS_DIR: Path = _HERE / "weights_qwen2_vl"
VIDEO_WEIGHTS_DIR: Path = _HERE / "weights_video"  # the Qwen2-VL organism fine-tuned on the video task
SHOWN_KEYS = 8  # keys listed per kind in the error message
_KINDS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


class OrganismWeightsError(RuntimeError):
    """A shipped organism's checkpoint does not match the model class of the installed transformers."""


def _describe(kind: str, entries: Any) -> str:
    items = sorted(str(e) for e in entries)
    more = f" ... and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else ""
    return f"{len(items)} {kind.replace('_', ' ')}: {', '.join(items[:SHOWN_KEYS])}{more}"


def checked_from_pretrained(model_class: type, root: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """``model_class.from_pretrained(root, dtype=dtype, **kwargs)`` in eval mode, refusing any key it could not
    place (see the module doc)."""
    import transformers

    # mismatched shapes are reported in ``info`` (and refused below, by name) instead of transformers' own
    # error, which names no key
    kwargs.setdefault("ignore_mismatched_sizes", True)
    model, info = model_class.from_pretrained(root, dtype=dtype, output_loading_info=True, **kwargs)
    problems = [_describe(kind, info[kind]) for kind in _KINDS if info.get(kind)]
    if problems:
        raise OrganismWeightsError(
            f"the checkpoint in {root} does not load into {model_class.__name__} with transformers "
            f"{transformers.__version__}: " + "; ".join(problems)
            + ". Refusing to run with randomly initialised weights; retrain with `vtprune organism train` "
            "or install a transformers version that can read this checkpoint."
        )
    return model.eval()


def load_processor(root: str | Path, **kwargs: Any):
    """``AutoProcessor.from_pretrained(root)``; for a saved ``Qwen2VLProcessor`` on a torchvision-free install
    (where the stock class cannot be built, see ``qwen_processor``) ``qwen_video.QwenOrganismProcessor`` (images,
    and videos through its torchvision-free video processor)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(root, **kwargs)
    except (AttributeError, ImportError, OSError, ValueError, TypeError) as error:
        saved = Path(root) / "processor_config.json"
        if not saved.exists() or '"Qwen2VLProcessor"' not in saved.read_text():
            raise
        from .qwen_video import QwenOrganismProcessor

        try:  # the images-only processor plus the organism's torchvision-free video path
            return QwenOrganismProcessor.from_pretrained(root, **kwargs)
        except Exception:
            raise error


def _require(root: Path) -> None:
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"no organism weights in {root}; run `vtprune organism train --out DIR`")


def load_organism(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The shipped LLaVA organism ``(LlavaForConditionalGeneration, LlavaProcessor)``, checked."""
    from transformers import LlavaForConditionalGeneration

    root = Path(path) if path is not None else WEIGHTS_DIR
    _require(root)
    return checked_from_pretrained(LlavaForConditionalGeneration, root, dtype), load_processor(root)


def load_qwen_organism(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The shipped Qwen2-VL organism ``(Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor)``, checked."""
    from transformers import Qwen2VLForConditionalGeneration

    root = Path(path) if path is not None else QWEN_WEIGHTS_DIR
    _require(root)
    return checked_from_pretrained(Qwen2VLForConditionalGeneration, root, dtype), load_processor(root)
