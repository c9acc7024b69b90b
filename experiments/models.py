"""Model backends of the experiment runner: Hugging Face VLMs (through ``framework.prune``) and a
fast ``dummy`` model for dry runs and tests.

A backend exposes ``module`` (the ``nn.Module`` the measurement observers hook), ``config`` (a
transformers config, for the analytic costs), ``prune(pipeline, budget, positions)`` (a removable
handle, or a null context for the unpruned run) and ``generate(samples, questions, handle,
max_new_tokens) -> list[Generation]``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from vtprune.framework.errors import VtpruneError

__all__ = ["Generation", "HFBackend", "DummyBackend", "load_backend", "with_images", "describe_model", "resolve_model_path", "adapter_by_name"]


@dataclass
class Generation:
    """One sample's answer and what pruning did to it.

    Attributes:
        prediction: the decoded answer.
        total_tokens: prefill tokens before pruning (text + visual, padding excluded).
        visual_tokens: visual tokens of each image before pruning.
        kept: visual tokens each image keeps after the last drop (None when nothing was pruned).
        kept_from_layer: {decoder layer k: visual tokens of the sample present from layer k on}.
        per_layer_kept: {decoder layer k: tokens kept per image at the drop before layer k}.
        kept_indices: per image, the kept token positions (image-token coordinates) or None.
    """

    prediction: str
    total_tokens: int
    visual_tokens: list[int]
    kept: Optional[list[int]] = None
    kept_from_layer: dict[int, int] = field(default_factory=dict)
    per_layer_kept: dict[int, list[int]] = field(default_factory=dict)
    kept_indices: Optional[list[list[int]]] = None


def resolve_model_path(name: str) -> str:
    """``pkg:<package>/<relative>`` -> a directory inside an installed package; anything else as is."""
    if not name.startswith("pkg:"):
        return name
    package, _, relative = name[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise VtpruneError(f"model.name {name!r}: no installed package {package!r}")
    return str(Path(list(spec.submodule_search_locations)[0]) / relative)


def adapter_by_name(name: str, registry: Any) -> type:
    """The adapter registered as ``name`` (``model.adapter``); unknown -> `UnknownNameError` listing the names."""
    from vtprune.framework.prune import adapter_for

    return adapter_for(None, registry, name)


def _adapter_for_architectures(architectures: Sequence[str], registry: Any) -> type:
    """The registry's adapter for a model known by its config's ``architectures`` only (no weights loaded): the
    registry's own class-name lookup (`Registry.adapter_for`) on a stand-in of each architecture class."""
    from vtprune.framework.errors import RegistrationError
    from vtprune.framework.registry import default_registry

    table = default_registry(registry)
    error: Optional[Exception] = None
    for architecture in architectures:
        try:
            return table.adapter_for(type(architecture, (), {})())
        except RegistrationError as exc:
            error = exc
    supported = sorted({c for entry in table.adapters.values() for c in entry.obj.model_classes})
    raise VtpruneError(
        f"no vtprune adapter supports {', '.join(architectures) or 'this model'}; supported model classes: "
        f"{', '.join(supported)} (set model.adapter, or write an adapter: docs/adapters.md)"
    ) from error


def describe_model(model: Mapping[str, Any], registry: Any) -> Optional[tuple[Optional[type], Any]]:
    """(adapter class, config) from the model's config file only; None when the config is not
    available offline (the check then happens when the model loads). Raises `VtpruneError` for a
    model that cannot work (missing local directory, no adapter)."""
    name = model["name"]
    if name == "dummy":
        return None, DummyBackend.make_config(model.get("options") or {})
    from transformers import AutoConfig

    path = resolve_model_path(name)
    local = Path(path).exists()
    if not local and (path.startswith((".", "/", "~")) or name.startswith("pkg:")):
        raise VtpruneError(f"model.name {name!r}: no such directory {path}")
    try:
        config = AutoConfig.from_pretrained(path, revision=model.get("revision"), local_files_only=True)
    except (OSError, ValueError):
        if local:
            raise VtpruneError(f"model.name {name!r}: {path} has no readable config.json") from None
        return None
    if model.get("adapter"):
        return adapter_by_name(model["adapter"], registry), config
    return _adapter_for_architectures(list(getattr(config, "architectures", None) or []), registry), config


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


#: The ``model:`` keys that change the loaded weights; the others (prompt, adapter) are per cell.
LOAD_KEYS: tuple[str, ...] = ("name", "dtype", "device", "attn_implementation", "revision", "options")


def load_key(model: Mapping[str, Any]) -> str:
    """What decides whether two ``model:`` sections share loaded weights (`LOAD_KEYS`), as JSON."""
    return json.dumps({k: model.get(k) for k in LOAD_KEYS}, sort_keys=True, default=str)


def load_backend(model: Mapping[str, Any], registry: Any = None) -> Any:
    """The backend for a ``model:`` config section (loads weights)."""
    if model["name"] == "dummy":
        return DummyBackend(model.get("options") or {})
    return HFBackend(model, registry)


# ------------------------------------------------------------------------------------------------
# Hugging Face models
# ------------------------------------------------------------------------------------------------

_LOAD_OPTIONS = ("local_files_only", "low_cpu_mem_usage", "device_map")


class HFBackend:
    """A transformers VLM with its processor; pruning through ``vtprune.framework.prune``."""

    def __init__(self, model: Mapping[str, Any], registry: Any = None) -> None:
        import transformers
        from transformers import AutoConfig

        self.spec = dict(model)
        self.registry = registry
        options = dict(model.get("options") or {})
        unknown = sorted(set(options) - set(_LOAD_OPTIONS))
        if unknown:
            raise VtpruneError(f"model.options: unknown {unknown}; valid for Hugging Face models: {', '.join(_LOAD_OPTIONS)}")
        path = resolve_model_path(model["name"])
        self.device = _device(model.get("device", "auto"))
        self.dtype = _dtype(model.get("dtype", "auto"), self.device)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "revision": model.get("revision"), **options}
        if model.get("attn_implementation"):
            kwargs["attn_implementation"] = model["attn_implementation"]
        config = AutoConfig.from_pretrained(path, revision=model.get("revision"), local_files_only=options.get("local_files_only", False))
        architecture = (getattr(config, "architectures", None) or [None])[0]
        loader = getattr(transformers, architecture, None) if architecture else None
        loader = loader or transformers.AutoModelForImageTextToText
        from vtprune.experiments.organism.loading import checked_from_pretrained, load_processor

        if model["name"].startswith("pkg:"):  # shipped weights (the organisms): every key must load, else refuse
            self.module = checked_from_pretrained(loader, path, **kwargs)
        else:
            self.module = loader.from_pretrained(path, **kwargs).eval()
        if "device_map" not in options:
            self.module.to(self.device)
        self.config = self.module.config
        self.processor = load_processor(path, revision=model.get("revision"))
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if getattr(self.tokenizer, "padding_side", None) is not None:
            self.tokenizer.padding_side = "left"
        self._set_prompt(model)
        self.image_token_id = getattr(self.config, "image_token_id", None) or getattr(self.config, "image_token_index", None)
        self.video_token_id = getattr(self.config, "video_token_id", None) or getattr(self.config, "video_token_index", None)

    def _set_prompt(self, model: Mapping[str, Any]) -> None:
        self.spec = dict(model)
        self.template = model.get("prompt_template")
        self.prompt_stop = None
        if model.get("prompt_stop"):
            self.prompt_stop = self.tokenizer(model["prompt_stop"], add_special_tokens=False)["input_ids"]

    def for_model(self, model: Mapping[str, Any]) -> "HFBackend":
        """This backend (same loaded weights) with ``model``'s prompt template, prompt stop and
        adapter: ``model`` differs from the loaded one only outside `LOAD_KEYS`."""
        view = copy.copy(self)
        view._set_prompt(model)
        return view

    def prune(self, pipeline: Any, budget: Any, positions: str) -> Any:
        if pipeline is None:
            return contextlib.nullcontext(None)
        from vtprune.framework.prune import prune

        return prune(
            self.module,
            pipeline,
            budget=budget,
            positions=positions,
            prompt_stop=self.prompt_stop,
            registry=self.registry,
            adapter=self.spec.get("adapter") or None,  # model.adapter: attach with the named adapter
        )

    def prompt(self, question: str, num_images: int, num_videos: int = 0) -> str:
        if self.template:
            return self.template.replace("{question}", question)
        return self.chat_prompt([{"role": "user", "content": question}], num_images, num_videos)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], num_images: int, num_videos: int = 0) -> str:
        """``messages`` (``{"role", "content"}``; content a string or a list of parts) rendered with the
        processor's chat template, ``num_videos`` video parts then ``num_images`` image parts first in the
        last user turn, and the generation prompt appended. A processor without a chat template raises
        `VtpruneError`."""
        if getattr(self.processor, "chat_template", None) is None:
            raise VtpruneError(
                f"the processor of {self.spec['name']!r} has no chat template: set model.prompt_template, e.g. "
                "'USER: <image>\\n{question} ASSISTANT:' (and do not ask lmms-eval to apply a chat template)"
            )
        parts = with_images(messages, num_images, num_videos)
        return self.processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def generate(
        self, samples: Sequence[Any], questions: Sequence[str], handle: Any, max_new_tokens: int,
        options: Any = None, prompts: Optional[Sequence[Optional[str]]] = None,
    ) -> list[Generation]:
        """One batch: ``questions`` wrapped in the prompt (or ``prompts[i]`` when given: a rendered
        prompt used as is), greedy unless ``options`` (a `GenerationOptions`) asks to sample; its
        ``until`` strings stop the generation (transformers' ``stop_strings``). A sample's ``videos``
        ((T, H, W, 3) frame arrays) go to the processor as ``videos=`` (`video.processor_inputs`)."""
        from PIL import Image

        from .video import processor_inputs

        prompts = prompts or [None] * len(samples)
        videos = [list(getattr(s, "videos", None) or []) for s in samples]
        texts = [p if p is not None else self.prompt(q, len(s.images), len(v)) for s, q, p, v in zip(samples, questions, prompts, videos)]
        images = [[img if isinstance(img, Image.Image) else Image.fromarray(img) for img in s.images] for s in samples]
        flat = [img for group in images for img in group]
        inputs = processor_inputs(self.processor, texts, flat, [v for group in videos for v in group])
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.dtype)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        settings = options.generate_kwargs() if options is not None else {"do_sample": False}
        if options is not None and options.until:
            from transformers import StoppingCriteriaList

            prompt_length = inputs["input_ids"].shape[1]
            settings["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self.tokenizer, options.until, prompt_length)])
        output = self.module.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **settings)
        length = inputs["input_ids"].shape[1]
        answers = self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        real = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [length] * len(samples)
        ids = inputs["input_ids"]  # (B, L)
        placeholders = [t for t in (self.image_token_id, self.video_token_id) if t is not None]
        image_counts = sum(((ids == t).sum(dim=1) for t in placeholders), torch.zeros(len(samples), dtype=torch.long)).tolist()
        result = getattr(handle, "last_selection", None) if handle is not None else None
        return [
            _generation(i, answer.strip(), int(real[i]), int(image_counts[i]), len(samples[i].images) + len(videos[i]), result)
            for i, answer in enumerate(answers)
        ]


class _StopStrings:
    """A transformers stopping criterion: a row is done once its decoded new tokens contain a stop
    string (transformers' own ``stop_strings`` needs a tokenizer whose vocabulary it can parse)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, tuple(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:  # (B, L) -> (B,)
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


def with_images(messages: Sequence[Mapping[str, Any]], num_images: int, num_videos: int = 0) -> list[dict[str, Any]]:
    """Chat messages with list-of-parts content (a string becomes one text part) and ``num_videos``
    video parts then ``num_images`` image parts first in the last user message (images and videos the
    messages already hold are kept and counted)."""
    out = []
    for message in messages:
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        out.append({**message, "content": parts})
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    if (num_images or num_videos) and not users:
        raise VtpruneError("the chat has no user message to put the images or videos in")
    for kind, number in (("image", num_images), ("video", num_videos)):
        if number:
            last = out[users[-1]]
            present = sum(p.get("type") == kind for m in out for p in m["content"])
            last["content"] = [{"type": kind} for _ in range(max(number - present, 0))] + last["content"]
    return out


def _generation(row: int, answer: str, total: int, visual: int, num_images: int, result: Any) -> Generation:
    """A `Generation` for batch row ``row`` from the adapter's `PruneResult` (or None)."""
    if result is None or not len(result.num_tokens):
        share = [visual // max(num_images, 1)] * num_images
        return Generation(answer, total, share)
    images = [r for r, sample in enumerate(result.image_sample.tolist()) if sample == row]
    visual_tokens = [int(result.num_tokens[r]) for r in images]
    per_layer = {int(d.layer): [int(d.counts[r]) for r in images] for d in result.drops}
    selection = result.selection
    kept_indices = [selection.row_indices(r).tolist() for r in images]
    return Generation(
        prediction=answer,
        total_tokens=total,
        visual_tokens=visual_tokens,
        kept=[int(selection.counts[r]) for r in images],
        kept_from_layer={layer: sum(counts) for layer, counts in per_layer.items()},
        per_layer_kept=per_layer,
        kept_indices=kept_indices,
    )


# ------------------------------------------------------------------------------------------------
# The dummy model
# ------------------------------------------------------------------------------------------------


class _DummyHandle:
    def __init__(self, pipeline: Any, budget: Any) -> None:
        self.pipeline, self.budget = pipeline, budget

    def __enter__(self) -> "_DummyHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class DummyBackend:
    """A fake VLM: real pipelines select on seeded random signals; the answer is right with a
    probability that grows with the share of visual tokens kept. Runs in milliseconds.

    Options: ``num_tokens`` (visual tokens per image, a square; default 64), ``text_tokens``
    (default 24), ``layers`` (default 4), ``fail_budgets`` (budgets whose cells raise, to test
    failure handling).
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.num_tokens = int(self.options.get("num_tokens", 64))
        self.text_tokens = int(self.options.get("text_tokens", 24))
        self.config = self.make_config(self.options)
        self.module = torch.nn.Linear(8, 8)
        self.prompt_stop = None

    @staticmethod
    def make_config(options: Mapping[str, Any]) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=int(options.get("layers", 4)),
            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
        )

    def for_model(self, model: Mapping[str, Any]) -> "DummyBackend":
        """This backend (the dummy has no prompt settings)."""
        return self

    def prune(self, pipeline: Any, budget: Any, positions: str) -> Any:
        if pipeline is None:
            return contextlib.nullcontext(None)
        if budget in (self.options.get("fail_budgets") or []):
            raise RuntimeError(f"dummy model: budget {budget} is configured to fail (model.options.fail_budgets)")
        return _DummyHandle(pipeline, budget)

    def _signals(self, sample_id: str) -> Any:
        from vtprune.framework.signals import Signals

        seed = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16)
        generator = torch.Generator().manual_seed(seed)
        n, side = self.num_tokens, int(round(self.num_tokens**0.5))
        return Signals(
            visual=torch.randn(1, n, 16, generator=generator),
            visual_mask=torch.ones(1, n, dtype=torch.bool),
            prompt=torch.randn(1, 5, 16, generator=generator),
            prompt_mask=torch.ones(1, 5, dtype=torch.bool),
            attention=torch.softmax(torch.randn(1, 2, n, generator=generator), dim=-1),
            visual_keys=torch.randn(1, n, 2, 4, generator=generator),
            prompt_keys=torch.randn(1, 5, 2, 4, generator=generator),
            clip_visual=torch.randn(1, n, 6, generator=generator),
            clip_text=torch.randn(1, 3, 6, generator=generator),
            clip_text_mask=torch.ones(1, 3, dtype=torch.bool),
            cls_attention=torch.softmax(torch.randn(1, 2, n, generator=generator), dim=-1),
            grid=(side, side) if side * side == n else None,
        )

    def _select(self, sample_id: str, handle: Any) -> tuple[dict[int, int], list[int]]:
        """{layer: kept} over the placement's drops, and the final kept indices (dropped tokens are
        masked out before the next drop, as an adapter removes them)."""
        import dataclasses

        signals = self._signals(sample_id)
        present = torch.ones(1, self.num_tokens, dtype=torch.bool)  # (1, N)
        per_layer: dict[int, int] = {}
        for drop in handle.pipeline.placement.drops(handle.budget):
            selection = handle.pipeline.select(dataclasses.replace(signals, visual_mask=present), drop.budget)
            present = selection.kept_mask(self.num_tokens)  # (1, N)
            per_layer[int(drop.layer or 0)] = int(present.sum())
        return per_layer, present[0].nonzero().flatten().tolist()

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], num_images: int, num_videos: int = 0) -> str:
        """``role: text`` lines (the dummy has no chat template), ``<video>`` / ``<image>`` parts in the last user turn."""
        lines = []
        for message in with_images(messages, num_images, num_videos):
            parts = message["content"]
            text = " ".join(f"<{p['type']}>" if p.get("type") in ("image", "video") else str(p.get("text", "")) for p in parts)
            lines.append(f"{message['role']}: {text}")
        return "\n".join(lines + ["assistant:"])

    def generate(
        self, samples: Sequence[Any], questions: Sequence[str], handle: Any, max_new_tokens: int,
        options: Any = None, prompts: Optional[Sequence[Optional[str]]] = None,
    ) -> list[Generation]:
        """Answers that depend on the sample id and the share of tokens kept (``options`` and
        ``prompts`` are accepted and do not change them)."""
        out = []
        self.module(torch.zeros(1, self.text_tokens + self.num_tokens, 8))  # the "prefill"
        for _ in range(max(max_new_tokens - 1, 0)):
            self.module(torch.zeros(1, 1, 8))  # one "decode step"
        for sample in samples:
            total = self.text_tokens + self.num_tokens * len(sample.images)
            visual = [self.num_tokens] * len(sample.images)
            if handle is None:
                share, generation = 1.0, Generation("", total, visual)
            else:
                per_layer, indices = self._select(sample.id, handle)
                share = min(per_layer.values()) / self.num_tokens
                generation = Generation(
                    "", total, visual, kept=[len(indices)] * len(sample.images),
                    kept_from_layer={k: v * len(sample.images) for k, v in per_layer.items()},
                    per_layer_kept={k: [v] * len(sample.images) for k, v in per_layer.items()},
                    kept_indices=[indices] * len(sample.images),
                )
            draw = int(hashlib.sha1(sample.id.encode()).hexdigest()[:6], 16) / 0xFFFFFF
            right = draw < 0.35 + 0.6 * share**0.5
            generation.prediction = sample.answers[0] if right and sample.answers else "unknown"
            out.append(generation)
        return out
