"""The ``vtprune`` model of lmms-eval: any supported VLM with a pruning recipe attached.

::

    lmms-eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=zspaprune,budget=64,prompt_stop=" ASSISTANT:" \\
        --tasks gqa,pope --batch_size auto

Discovery: lmms-eval (>= 0.6) loads ``ModelManifest`` objects from the entry-point group
``lmms_eval.models``; vtprune declares ``vtprune = "vtprune.experiments.lmms_eval_model:manifest"``
in its pyproject, so no lmms-eval file is edited and no ``LMMS_EVAL_PLUGINS`` variable is needed.
The model class is built on first access (module ``__getattr__``) because its base class,
``lmms_eval.api.model.lmms``, is only importable where lmms-eval is installed; importing this
module never imports lmms-eval.

``model_args`` (strings from the command line; ``budget=64`` is an int, ``0.25`` a fraction):
``pretrained``, ``recipe`` (default "zspaprune"; "none" = unpruned), ``budget``, ``placement``,
``positions``, ``device``, ``dtype``, ``attn_implementation``, ``prompt_template``, ``prompt_stop``,
``max_new_tokens`` (when the task sets none), ``batch_size`` (N, ``auto`` or ``auto:N``),
``max_batch_size`` (the first size ``auto`` tries), ``revision``, ``records`` (a JSONL file: one
row per answered request), ``fidelity`` (true: also answer every batch unpruned and record that
answer), ``max_frames_num`` (frames sampled per video, default `DEFAULT_MAX_FRAMES` = 32, lmms-eval's
``llava_onevision`` default) and any stage parameter (``critical=0.3``).

Videos: a visual that is a video file path (what lmms-eval's video tasks pass: ``[path]``;
`vtprune.experiments.video.is_video`) is decoded with PyAV (extra ``vtprune[video]``),
``max_frames_num`` frames sampled uniformly as lmms-eval's ``llava_onevision`` does, and handed to the
processor as ``videos=`` with one video placeholder in the prompt (before the images); the adapter
then sees one video row with its frames (``Signals.frames``). Requests with videos, images or both
batch together like any others (the processor takes mixed batches).

Requests are answered in batches of ``batch_size`` requests with the same generation options
(`vtprune.experiments.gen_options`; unsupported ``gen_kwargs`` raise), in lmms-eval's order; the
answers do not depend on the batching (greedy decoding, left padding). ``auto`` starts at
``max_batch_size`` (default `AUTO_MAX_BATCH`) and halves the batch on an out-of-memory error
until it fits, then keeps that size. With ``--apply_chat_template``, lmms-eval renders every
context through `apply_chat_template`, i.e. the processor's chat template, and the model answers
that prompt with the request's images put in its last user turn. Only ``generate_until`` requests
are supported (GQA, POPE, TextVQA, MME, ...); log-likelihood tasks raise with a clear message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from vtprune.framework.errors import VtpruneError

from .gen_options import GenerationOptions, cut_at_stops, parse_gen_kwargs
from .metrics import sample_row
from .pipelines import build_pipeline
from .samples import Sample, normalize_answer
from .video import DEFAULT_MAX_FRAMES, is_video, read_video

__all__ = [
    "manifest", "MODEL_ID", "CLASS_PATH", "AUTO_MAX_BATCH", "Answered", "build_model_class",
    "parse_batch_size", "answered_row", "flatten_results", "DEFAULT_MAX_FRAMES",
]

MODEL_ID = "vtprune"
CLASS_PATH = "vtprune.experiments.lmms_eval_model.VtpruneLMM"
#: the first batch size ``batch_size=auto`` tries when ``max_batch_size`` is not given
AUTO_MAX_BATCH = 64
_CLASS: Optional[type] = None


def _require_lmms_eval() -> Any:
    try:
        import lmms_eval  # noqa: F401
        from lmms_eval.api.model import lmms
    except ImportError as error:
        raise RuntimeError(
            "this needs lmms-eval: pip install 'vtprune[eval]' on a GPU node, or the CPU route without "
            "torchvision in docs/experiments.md#lmms-eval"
        ) from error
    return lmms


def manifest() -> Any:
    """The entry point of group ``lmms_eval.models``: a ``ModelManifest`` for ``--model vtprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def __getattr__(name: str) -> Any:
    if name == "VtpruneLMM":
        return build_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_batch_size(value: Any) -> int | str:
    """``batch_size`` as lmms-eval passes it: an int >= 1, or ``"auto"`` (``"auto:N"`` reads as
    ``"auto"``: the size is searched once and kept). Anything else raises `VtpruneError`."""
    text = str(value).strip().lower()
    if text == "auto" or text.startswith("auto:"):
        return "auto"
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise VtpruneError(f"batch_size must be an integer >= 1, 'auto' or 'auto:N', got {value!r}")
    return size


@dataclass
class Answered:
    """One answered request: its sample (id ``<task>/<split>/<doc_id>``, ``meta`` holds task, split
    and doc_id), the question, the prompt used, the returned text (cut at the stop strings), the
    backend's `Generation`, the batch's timing (`PhaseMeter`), the batch id, and the unpruned
    `Generation` when the model runs with ``fidelity``."""

    sample: Sample
    question: str
    text: str
    generation: Any
    timing: dict[str, Any]
    batch: str
    unpruned: Any = None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def build_model_class() -> type:
    """``VtpruneLMM``, a subclass of ``lmms_eval.api.model.lmms`` (built once)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    lmms = _require_lmms_eval()

    class VtpruneLMM(lmms):  # type: ignore[misc, valid-type]
        """A vtprune backend (model + processor) with a pruning pipeline attached."""

        is_simple = True

        def __init__(
            self,
            pretrained: str = "",
            recipe: str = "zspaprune",
            budget: Any = 64,
            placement: Optional[str] = None,
            positions: str = "keep",
            device: Optional[str] = "auto",
            dtype: str = "auto",
            attn_implementation: Optional[str] = None,
            prompt_template: Optional[str] = None,
            prompt_stop: Optional[str] = None,
            max_new_tokens: int = 32,
            batch_size: Any = 1,
            max_batch_size: Any = None,
            revision: Optional[str] = None,
            records: Optional[str] = None,
            fidelity: Any = False,
            max_frames_num: Any = DEFAULT_MAX_FRAMES,
            _backend: Any = None,
            _handle: Any = None,
            **params: Any,
        ) -> None:
            super().__init__()
            from .models import load_backend  # imports torch: only when the model is built

            self.max_new_tokens = int(max_new_tokens)
            self.max_frames_num = int(max_frames_num)
            if self.max_frames_num < 1:
                raise VtpruneError(f"max_frames_num must be an integer >= 1, got {max_frames_num!r}")
            self.batch_size = parse_batch_size(batch_size)
            self.max_batch_size = int(max_batch_size) if max_batch_size not in (None, "") else AUTO_MAX_BATCH
            self.batch_size_per_gpu = self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size
            self.answered: list[Answered] = []
            self.records_path = records
            self.fidelity = str(fidelity).strip().lower() in ("true", "1", "yes")
            self._chats: dict[str, list[dict[str, Any]]] = {}
            self._batches = 0
            self.pipeline, self.budget, self.positions = None, None, positions
            if _backend is not None:
                self.backend, self.handle, self._owns_handle = _backend, _handle, False
                self.budget = budget if _handle is not None else None
                return
            model = {
                "name": pretrained, "dtype": dtype, "device": device or "auto", "attn_implementation": attn_implementation,
                "revision": revision, "prompt_template": prompt_template, "prompt_stop": prompt_stop, "options": {},
            }
            self.backend = load_backend(model)
            method = None if str(recipe).lower() in ("none", "unpruned") else {"recipe": recipe, "params": params}
            run = {"method": method, "placement": placement, "seed": 0, "budget": budget}
            self.pipeline = build_pipeline(run) if method else None
            self.budget = budget if method else None
            self.handle = self._attach()
            self._owns_handle = True

        @classmethod
        def from_backend(
            cls, backend: Any, handle: Any, max_new_tokens: int = 32, batch_size: Any = 1, budget: Any = None,
            max_frames_num: Any = DEFAULT_MAX_FRAMES,
        ) -> "VtpruneLMM":
            """Wrap an already loaded backend and attached handle (a grid cell's)."""
            return cls(
                _backend=backend, _handle=handle, max_new_tokens=max_new_tokens, batch_size=batch_size, budget=budget,
                max_frames_num=max_frames_num,
            )

        # -- chat template ----------------------------------------------------------------------

        @property
        def chat_template(self) -> Optional[str]:
            """The processor's chat template (what `apply_chat_template` renders with)."""
            processor = getattr(self.backend, "processor", None)
            return getattr(processor, "chat_template", None)

        @property
        def tokenizer_name(self) -> str:
            """Names the prompt format in lmms-eval's request cache key."""
            return str((getattr(self.backend, "spec", None) or {}).get("name", MODEL_ID)).replace("/", "__")

        def apply_chat_template(self, chat_history: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
            """``chat_history`` rendered with the processor's chat template (no image parts: the
            request's images are put in the last user turn when it is answered)."""
            messages = [dict(m) for m in chat_history]
            text = self.backend.chat_prompt(messages, 0)
            self._chats[text] = messages
            return text

        # -- answering --------------------------------------------------------------------------

        def _attach(self) -> Any:
            if self.pipeline is None:
                return None
            return self.backend.prune(self.pipeline, self.budget, self.positions).__enter__()

        def _item(self, request: Any) -> tuple[Sample, str, Optional[str], GenerationOptions]:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v for v in (visuals or []) if v is not None]
            videos = [v for v in visuals if is_video(v)]  # paths: decoded per batch (`_decoded`)
            images = [v for v in visuals if not is_video(v)]
            options = parse_gen_kwargs(gen_kwargs, self.max_new_tokens)
            question = str(context).replace("<image>", "").replace("<video>", "").strip()
            meta = {"task": task, "split": split, "doc_id": doc_id}
            sample = Sample(f"{task}/{split}/{doc_id}", images, question, [], meta, videos)
            messages = self._chats.get(str(context))
            prompt = self.backend.chat_prompt(messages, len(images), len(videos)) if messages is not None else None
            return sample, question, prompt, options

        def _answer(self, items: list[tuple[Sample, str, Optional[str], GenerationOptions]], options: GenerationOptions) -> list[Answered]:
            from .measure import PhaseMeter

            samples, questions, prompts = [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
            decoded = [self._decoded(s) for s in samples]
            unpruned: list[Any] = [None] * len(items)
            if self.fidelity and self.handle is not None:
                if not self._owns_handle:
                    raise VtpruneError("fidelity=true needs the model to own its pruning (a grid cell compares with its baseline cell)")
                self.handle.__exit__(None, None, None)  # detach: answer this batch unpruned
                try:
                    unpruned = self.backend.generate(decoded, questions, None, options.max_new_tokens, options, prompts)
                finally:
                    self.handle = self._attach()
            with PhaseMeter(self.backend.module) as meter:
                meter.begin()
                outputs = self.backend.generate(decoded, questions, self.handle, options.max_new_tokens, options, prompts)
                timing = meter.end()
            self._batches += 1
            batch = f"{id(self):x}-{self._batches}"
            return [
                Answered(s, q, cut_at_stops(o.prediction, options.until).strip(), o, timing, batch, u)
                for s, q, o, u in zip(samples, questions, outputs, unpruned)
            ]

        def _decoded(self, sample: Sample) -> Sample:
            """``sample`` with its video paths decoded: ``max_frames_num`` frames each, (T, H, W, 3) uint8
            (only the batch being answered holds decoded frames)."""
            if not sample.videos:
                return sample
            return dataclasses.replace(sample, videos=[read_video(path, self.max_frames_num) for path in sample.videos])

        def _answer_group(self, items: list[Any], options: GenerationOptions) -> list[Answered]:
            """``items`` (same options) in batches; ``auto`` halves the batch on out-of-memory."""
            auto = self.batch_size == "auto"
            size = self.batch_size_per_gpu
            out: list[Answered] = []
            start = 0
            while start < len(items):
                batch = items[start : start + size]
                try:
                    out += self._answer(batch, options)
                except Exception as error:  # noqa: BLE001 - only out-of-memory is retried, with a smaller batch
                    if not (auto and size > 1 and _is_out_of_memory(error)):
                        raise
                    size = max(1, size // 2)
                    self._free_memory()
                    continue
                start += len(batch)
            self.batch_size_per_gpu = size
            return out

        @staticmethod
        def _free_memory() -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        def generate_until(self, requests: list) -> list[str]:
            """Answers in request order; requests are grouped by generation options and batched."""
            items = [self._item(request) for request in requests]
            groups: dict[GenerationOptions, list[int]] = {}
            for index, item in enumerate(items):
                groups.setdefault(item[3], []).append(index)
            answers: list[str] = [""] * len(items)
            for options, indices in groups.items():
                for index, answered in zip(indices, self._answer_group([items[i] for i in indices], options)):
                    answers[index] = answered.text
                    self.answered.append(answered)
                    if self.records_path:
                        self._write_record(answered)
            return answers

        def _write_record(self, answered: Answered) -> None:
            from .results import append_jsonl

            append_jsonl(self.records_path, answered_row(answered, self.backend.config, self.budget))

        def loglikelihood(self, requests: list) -> list:
            raise NotImplementedError(
                "the vtprune lmms-eval model supports generate_until tasks (GQA, POPE, TextVQA, MME, ...) only"
            )

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("the vtprune lmms-eval model does not support multi-round generation")

        def __del__(self) -> None:
            if getattr(self, "_owns_handle", False) and getattr(self, "handle", None) is not None:
                self.handle.__exit__(None, None, None)

    VtpruneLMM.__module__ = __name__
    _CLASS = VtpruneLMM
    return VtpruneLMM


def flatten_results(results: Mapping[str, Any]) -> dict[str, float]:
    """``{"gqa": {"exact_match,none": 0.6, "alias": "gqa"}}`` -> ``{"gqa/exact_match": 0.6}``."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        for name, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name:
                out[f"{task}/{name.split(',')[0]}"] = float(value)
    return out


def answered_row(
    answered: Any, config: Any, budget: Any, scores: Optional[Mapping[str, float]] = None,
    scored: Optional[str] = None, metric: Optional[str] = None,
) -> dict[str, Any]:
    """The ``samples.jsonl`` row of one `Answered` request: `sample_row`'s fields (``accuracy`` is
    None without scores), ``answer`` = the normalised response lmms-eval scored (default: the
    returned text), and with ``fidelity`` the unpruned ``unpruned_prediction`` / ``unpruned_answer``."""
    scores = dict(scores or {})
    key = metric if metric in scores else next(iter(scores), "")
    answer = normalize_answer(scored if scored is not None else answered.text)
    generation = answered.generation
    generation.prediction = answered.text
    row = sample_row(answered.sample, answered.question, generation, scores, key, config, budget, answered.timing, answered.batch, answer)
    if answered.unpruned is not None:
        row["unpruned_prediction"] = answered.unpruned.prediction
        row["unpruned_answer"] = normalize_answer(answered.unpruned.prediction)
    return row
