"""The ``vtprune`` model of lmms-eval: any supported VLM with a pruning recipe attached.

::

    pip install 'vtprune[eval]'
    lmms-eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=zspaprune,budget=64,prompt_stop=" ASSISTANT:" \\
        --tasks gqa,pope --batch_size 1

Discovery: lmms-eval (>= 0.4) loads ``ModelManifest`` objects from the entry-point group
``lmms_eval.models``; vtprune declares ``vtprune = "vtprune.experiments.lmms_eval_model:manifest"``
in its pyproject, so no lmms-eval file is edited and no ``LMMS_EVAL_PLUGINS`` variable is needed.
The model class is built on first access (module ``__getattr__``) because its base class,
``lmms_eval.api.model.lmms``, is only importable where lmms-eval is installed; importing this
module never imports lmms-eval.

``model_args`` (strings from the command line; ``budget=64`` is an int, ``0.25`` a fraction):
``pretrained``, ``recipe`` (default "zspaprune"; "none" = unpruned), ``budget``, ``placement``,
``positions``, ``device``, ``dtype``, ``attn_implementation``, ``prompt_template``, ``prompt_stop``,
``max_new_tokens``, ``batch_size`` (1), ``revision``, and any stage parameter (``critical=0.3``).
Only ``generate_until`` requests are supported (GQA, POPE, TextVQA, MME, ...); log-likelihood tasks
raise with a clear message.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .metrics import requested_tokens
from .pipelines import build_pipeline
from .samples import Sample

__all__ = ["manifest", "MODEL_ID", "CLASS_PATH", "evaluate_with_lmms_eval", "build_model_class"]

MODEL_ID = "vtprune"
CLASS_PATH = "vtprune.experiments.lmms_eval_model.VtpruneLMM"
_CLASS: Optional[type] = None


def _require_lmms_eval() -> Any:
    try:
        import lmms_eval  # noqa: F401
        from lmms_eval.api.model import lmms
    except ImportError as error:
        raise RuntimeError(
            "this needs lmms-eval: pip install 'vtprune[eval]' (lmms-eval requires torchvision; install it in "
            "an environment where torch and torchvision match)"
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
            device: str = "auto",
            dtype: str = "auto",
            attn_implementation: Optional[str] = None,
            prompt_template: Optional[str] = None,
            prompt_stop: Optional[str] = None,
            max_new_tokens: int = 32,
            batch_size: Any = 1,
            revision: Optional[str] = None,
            max_batch_size: Any = None,
            _backend: Any = None,
            _handle: Any = None,
            **params: Any,
        ) -> None:
            super().__init__()
            from .models import load_backend  # imports torch: only when the model is built

            self.max_new_tokens = int(max_new_tokens)
            self.batch_size_per_gpu = int(batch_size)
            self.records: list[Any] = []
            if _backend is not None:
                self.backend, self.handle, self._owns_handle = _backend, _handle, False
                return
            model = {
                "name": pretrained, "dtype": dtype, "device": device, "attn_implementation": attn_implementation,
                "revision": revision, "prompt_template": prompt_template, "prompt_stop": prompt_stop, "options": {},
            }
            self.backend = load_backend(model)
            method = None if str(recipe).lower() in ("none", "unpruned") else {"recipe": recipe, "params": params}
            run = {"method": method, "placement": placement, "seed": 0, "budget": budget}
            pipeline = build_pipeline(run) if method else None
            self.handle = self.backend.prune(pipeline, budget, positions).__enter__() if pipeline else None
            self._owns_handle = True

        @classmethod
        def from_backend(cls, backend: Any, handle: Any, max_new_tokens: int = 32) -> "VtpruneLMM":
            """Wrap an already loaded backend and attached handle (a grid cell's)."""
            return cls(_backend=backend, _handle=handle, max_new_tokens=max_new_tokens)

        def generate_until(self, requests: list) -> list[str]:
            answers = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
                visuals = [v for v in (visuals or []) if v is not None]
                kwargs = dict(gen_kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                question = str(context).replace("<image>", "").strip()
                sample = Sample(f"{task}/{split}/{doc_id}", visuals, question, [])
                new_tokens = int(kwargs.get("max_new_tokens", self.max_new_tokens))
                (output,) = self.backend.generate([sample], [question], self.handle, new_tokens)
                text = output.prediction
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                self.records.append((sample.id, output))
                answers.append(text.strip())
            return answers

        def loglikelihood(self, requests: list) -> list:
            raise NotImplementedError(
                "the vtprune lmms-eval model supports generate_until tasks (GQA, POPE, TextVQA, MME, ...) only"
            )

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("the vtprune lmms-eval model does not support multi-round generation")

        def __del__(self) -> None:
            if getattr(self, "_owns_handle", False) and self.handle is not None:
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


def evaluate_with_lmms_eval(task: Any, context: Any) -> dict[str, float]:
    """Run lmms-eval's evaluator on a cell's backend and handle (task ``lmms_eval``)."""
    _require_lmms_eval()
    from lmms_eval import evaluator

    model = build_model_class().from_backend(context.backend, context.handle, context.max_new_tokens)
    output = evaluator.simple_evaluate(
        model=model,
        tasks=list(task.tasks),
        num_fewshot=task.num_fewshot,
        limit=context.limit,
        gen_kwargs=task.gen_kwargs or None,
        log_samples=task.log_samples,
        batch_size=context.batch_size,
    )
    metrics = flatten_results(output or {})
    if metrics:
        primary = task.metric if task.metric in metrics else next(iter(metrics))
        metrics["accuracy"] = metrics[primary]
    if model.records:
        outputs = [o for _, o in model.records]
        visual = [sum(o.visual_tokens) for o in outputs]
        kept = [sum(o.kept) if o.kept is not None else v for o, v in zip(outputs, visual)]
        budget = None if context.pipeline is None else context.cell.config.get("budget")
        metrics["n_samples"] = len(outputs)
        metrics["tokens_visual"] = sum(visual) / len(visual)
        metrics["tokens_kept"] = sum(kept) / len(kept)
        metrics["tokens_requested"] = sum(requested_tokens(budget, o.visual_tokens) for o in outputs) / len(outputs)
        if metrics["tokens_visual"]:
            metrics["kept_ratio"] = metrics["tokens_kept"] / metrics["tokens_visual"]
    return metrics
