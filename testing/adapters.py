"""The adapter contract, as a check a new adapter's tests call on a tiny model.

:func:`check_adapter` attaches a pipeline with ``framework.prune`` and checks, on a left-padded batch of several
samples, with ``positions="keep"``:

=========================  ======================================================================================
property                   rule
=========================  ======================================================================================
``keep-all``               budget 1.0: logits bit-identical to the unpruned model, every image keeps every token
``counts``                 ``handle.last_selection``: each image of the first drop keeps
                           ``pipeline.budget.resolve(budget, tokens)``; later drops keep a subset
``masked reference``       pruned logits at every real kept slot equal the unpruned model's where the dropped
                           visual tokens are masked out of attention (as keys, from each drop's layer on) and every
                           position id is unchanged, within ``atol`` (slots aligned by ``PruneResult.sequence_index``)
``batch == alone``         each row of the batch gives the logits of the sample alone at its real kept slots
``clean removal``          after ``handle.remove()``: the same hooks as before attaching, bit-identical logits
=========================  ======================================================================================

Only public API is used (``framework.prune``, ``handle.last_selection``, ``PruneResult.drops`` /
``image_positions`` / ``image_sample`` / ``num_tokens`` / ``sequence_index`` / ``sequence_mask``), and the reference
is built from the unpruned model itself with forward pre-hooks on its decoder layers that change only their
``attention_mask`` keyword. The reference keeps each kept token's own value, so ``recipe`` must be a selection
that does not merge tokens (``Selection.values`` None, or equal to the tokens' own values).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from vtprune.framework import prune

__all__ = ["AdapterContractError", "DEFAULT_ADAPTER_RECIPE", "check_adapter", "decoder_layers", "record_hooks"]

#: A recipe every adapter supports before the LLM (prompt cosine, top-k, farthest point sampling).
DEFAULT_ADAPTER_RECIPE = "prompt_cosine+critical+fps+split(critical=0.6)+pre_llm"
#: Hook tables of `torch.nn.Module` compared for a clean removal.
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


class AdapterContractError(AssertionError):
    """An adapter broke its contract on a tiny model; the message names the property, budget and row."""


def _fail(label: str, prop: str, budget: Any, detail: str, row: Optional[int] = None) -> AdapterContractError:
    at_row = f", row {row}" if row is not None else ""
    return AdapterContractError(f"[{label}] property {prop!r} fails at budget={budget!r}{at_row}: {detail}")


def record_hooks(model: Any) -> dict:
    """{(module name, hook table): hook ids} for every module of ``model`` with hooks."""
    out = {}
    for name, module in model.named_modules():
        for table in HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks:
                out[(name, table)] = tuple(hooks.keys())
    return out


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of a Hugging Face VLM (``model.model.language_model.layers`` and the usual variants)."""
    for path in (
        "model.language_model.layers", "language_model.layers", "model.text_model.layers", "model.layers", "language_model.model.layers"
    ):
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if found is not None:
            return found
    raise AttributeError(f"cannot find the decoder layers of {type(model).__name__}; pass decoder_layers=callable(model)")


def _logits(model: Any, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits  # (B, L', V)


def _removed_by_layer(result: Any, batch: int, length: int, layers: int) -> list[Tensor]:
    """(B, L) bool per decoder layer: the original positions removed before that layer."""
    removed = [torch.zeros(batch, length, dtype=torch.bool) for _ in range(layers)]
    for record in result.drops:
        for image, positions in enumerate(result.image_positions):
            positions = positions.cpu()
            kept = positions[record.selection.row_indices(image).cpu()]
            gone = positions[~torch.isin(positions, kept)]
            row = int(result.image_sample[image])
            for layer in range(int(record.layer), layers):
                removed[layer][row, gone] = True
    return removed


class _MaskedKeys:
    """Forward pre-hooks on the decoder layers of an unpruned model: from layer l on, the positions in
    ``removed[l]`` are masked out as keys (the layer's own mask AND the kept keys); nothing else changes."""

    def __init__(self, layers: Sequence[Any], removed: list[Tensor]):
        self.layers, self.removed, self.handles = layers, removed, []

    def __enter__(self) -> "_MaskedKeys":
        for number, layer in enumerate(self.layers):
            if bool(self.removed[number].any()):
                self.handles.append(layer.register_forward_pre_hook(self._hook(self.removed[number]), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    @staticmethod
    def _hook(removed: Tensor) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple:
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, length = hidden.shape[:2]
            mask = kwargs.get("attention_mask")
            if mask is None:
                allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(batch, 1, -1, -1)
            elif mask.dtype == torch.bool:
                allowed = mask.expand(batch, -1, -1, -1)
            else:
                allowed = (mask == 0).expand(batch, -1, -1, -1)  # additive mask: 0 = attend
            keys = ~removed.to(hidden.device)  # (B, L)
            allowed = allowed & keys[:, None, None, :]  # (B, 1, Q, K)
            if mask is not None and mask.dtype != torch.bool:
                allowed = torch.where(allowed, torch.zeros((), dtype=mask.dtype), torch.finfo(mask.dtype).min)
            return args, {**kwargs, "attention_mask": allowed}

        return hook


def _kept_slots(result: Any, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L') original position of every output slot, (B, L') True at real (kept, non-padding) slots."""
    index = result.sequence_index.cpu()
    real = attention_mask.bool().gather(1, index) & result.sequence_mask.cpu()
    return index, real


def check_adapter(
    model_factory: Callable[[], Any],
    inputs_factory: Callable[[Any, Sequence[int]], dict],
    recipe: Any = DEFAULT_ADAPTER_RECIPE,
    budgets: Sequence[Any] = (3, 0.5),
    *,
    samples: Sequence[int] = (0, 1),
    atol: float = 1e-5,
    registry: Any = None,
    layers: Optional[Callable[[Any], Sequence[Any]]] = None,
    label: Optional[str] = None,
    keep_all_recipe: Any = None,
) -> None:
    """Check an adapter on a tiny model (see the module docstring for the properties).

    Args:
        model_factory: ``() -> model``, a tiny random model the adapter supports (e.g. `vtprune.testing.models`).
        inputs_factory: ``(model, samples) -> inputs`` for ``model(**inputs)``: a left-padded batch of the numbered
            test samples; ``inputs_factory(model, [i])`` must be sample i alone (same prompt and images).
        recipe: a recipe or pipeline that does not merge token values (default: prompt cosine + FPS at ``pre_llm``).
        budgets: budgets checked against the masked reference and batch == alone (int and float).
        samples: which samples form the batch (at least two, of different lengths, to exercise left padding).
        atol: absolute tolerance of the reference and batch == alone comparisons (fp32: 1e-5).
        registry: the registry ``prune`` resolves the recipe and adapter in (default: installed plugins).
        layers: ``model -> decoder layers`` when :func:`decoder_layers` cannot find them.
        label: what failure messages call the check (default: model class and recipe).
        keep_all_recipe: the recipe of the keep-all check (default ``recipe``); a schedule whose later drops keep a
            ratio below 1 prunes even at budget 1.0, so give it the same schedule with ``ratio=1.0``.
    Raises: `AdapterContractError` naming the property, budget and row.
    """
    model = model_factory()
    label = label or f"{type(model).__name__} {recipe}"
    stack = (layers or decoder_layers)(model)
    inputs = inputs_factory(model, list(samples))
    base = _logits(model, inputs)
    hooks_before = record_hooks(model)  # after one forward: transformers may install its own hooks lazily

    with prune(model, keep_all_recipe or recipe, budget=1.0, registry=registry) as handle:
        out = _logits(model, inputs)
        result = handle.last_selection
    if result is None:
        raise _fail(label, "keep-all", 1.0, "handle.last_selection is None after a forward with images")
    if not torch.equal(out, base):
        raise _fail(label, "keep-all", 1.0, "logits are not bit-identical to the unpruned model's")
    if not torch.equal(result.counts.cpu(), result.num_tokens.cpu()):
        raise _fail(label, "keep-all", 1.0, f"kept {result.counts.tolist()} of {result.num_tokens.tolist()} tokens")

    singles = [inputs_factory(model, [sample]) for sample in samples]
    for budget in budgets:
        with prune(model, recipe, budget=budget, registry=registry) as handle:
            out = _logits(model, inputs)
            result = handle.last_selection
            pipeline = handle.pipeline
            alone = [(_logits(model, single), handle.last_selection) for single in singles]
        _check_counts(label, budget, pipeline, result)
        _check_reference(label, budget, model, stack, inputs, out, result, atol)
        _, real = _kept_slots(result, inputs["attention_mask"])
        for row, (single, single_result) in enumerate(alone):
            _, single_real = _kept_slots(single_result, singles[row]["attention_mask"])
            got, want = out[row][real[row]], single[0][single_real[0]]
            if got.shape != want.shape:
                raise _fail(label, "batch == alone", budget, f"{got.shape[0]} kept slots in the batch, {want.shape[0]} alone", row)
            if not torch.allclose(got, want, atol=atol, rtol=0):
                error = float((got - want).abs().max())
                raise _fail(label, "batch == alone", budget, f"logits differ from the sample alone by {error:.3g} > atol {atol}", row)

    if record_hooks(model) != hooks_before:
        raise _fail(label, "clean removal", budgets[-1] if budgets else 1.0, "hooks left on the model after handle.remove()")
    if not torch.equal(_logits(model, inputs), base):
        raise _fail(label, "clean removal", budgets[-1] if budgets else 1.0, "logits after handle.remove() differ from before")


def _check_counts(label: str, budget: Any, pipeline: Any, result: Any) -> None:
    if not result.drops:
        raise _fail(label, "counts", budget, "no drop was recorded (handle.last_selection.drops is empty)")
    first = result.drops[0]
    drop_budget = pipeline.placement.drops(budget)[0].budget
    expected = pipeline.budget.resolve(drop_budget, result.num_tokens.cpu())
    counts = first.selection.counts.cpu()
    if not torch.equal(counts, expected):
        raise _fail(label, "counts", budget, f"images kept {counts.tolist()} tokens, the budget resolves to {expected.tolist()}")
    for record in result.drops[1:]:
        if bool((record.selection.counts.cpu() > counts).any()):
            raise _fail(label, "counts", budget, f"drop at layer {record.layer} keeps more tokens than an earlier drop")
        counts = record.selection.counts.cpu()


def _check_reference(label: str, budget: Any, model: Any, stack: Sequence[Any], inputs: dict, out: Tensor, result: Any, atol: float) -> None:
    batch, length = inputs["input_ids"].shape
    removed = _removed_by_layer(result, batch, length, len(stack))
    with _MaskedKeys(stack, removed):
        reference = _logits(model, inputs)  # (B, L, V)
    index, real = _kept_slots(result, inputs["attention_mask"])
    aligned = reference.gather(1, index.unsqueeze(-1).expand(-1, -1, reference.shape[-1]))  # (B, L', V)
    if out.shape[:2] != index.shape:
        raise _fail(label, "masked reference", budget, f"output has {tuple(out.shape[:2])} slots, sequence_index {tuple(index.shape)}")
    for row in range(batch):
        got, want = out[row][real[row]], aligned[row][real[row]]
        if not torch.allclose(got, want, atol=atol, rtol=0):
            error = float((got - want).abs().max())
            raise _fail(
                label, "masked reference", budget,
                f"logits at kept slots differ from the unpruned model with the dropped tokens masked out by {error:.3g} > atol {atol}",
                row,
            )
