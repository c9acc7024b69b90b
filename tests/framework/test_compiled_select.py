"""`Pipeline.compile()`: one torch.compile graph (inductor on this CPU) with the eager selections.

Compiling takes seconds per pipeline on a small machine: the tests that compile are few, tiny and
marked slow; planning, fallback and error paths run without compiling.
"""

from __future__ import annotations

import pytest
import torch

from vtprune.framework import Signals, compose
from vtprune.framework.compiled import CompiledSelect, SelectCompileError, plan_select


def _signals(batch: int = 2, tokens: int = 48, dim: int = 16, seed: int = 0, mask: bool = False) -> Signals:
    g = torch.Generator().manual_seed(seed)
    visual_mask = None
    if mask:
        visual_mask = torch.ones(batch, tokens, dtype=torch.bool)
        visual_mask[0, -5:] = False
    return Signals(
        visual=torch.randn(batch, tokens, dim, generator=g),
        visual_mask=visual_mask,
        prompt=torch.randn(batch, 6, dim, generator=g),
        attention=torch.softmax(torch.randn(batch, 4, tokens, generator=g), dim=-1),
    )


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("indices", "mask", "critical"))


def test_plan_matches_the_eager_counts() -> None:
    plan = plan_select(compose("zspaprune"), 1, 576, 64)
    assert (plan.total, plan.critical, plan.remaining) == (64, 38, 26)  # critical = round(0.6 * 64)
    assert plan_select(compose("fastv"), 2, 576, 64).critical == 64  # top-k fills the budget
    assert plan_select(compose("divprune"), 2, 576, 64).critical == 0  # no scores
    assert plan_select(compose("zspaprune"), 1, 40, 64).total == 40  # budget above N keeps every token


def test_score_dependent_split_is_refused_with_a_clear_error() -> None:
    with pytest.raises(SelectCompileError, match="dynamic.*Pipeline.select"):
        compose("zspaprune_dynamic").compile()


def test_padded_rows_and_float_budgets_fall_back_to_eager(monkeypatch) -> None:
    pipeline = compose("zspaprune")
    compiled = pipeline.compile()
    assert isinstance(compiled, CompiledSelect)
    monkeypatch.setattr(compiled, "_graph", lambda *a: pytest.fail("the graph must not run"))
    padded = _signals(mask=True)
    assert not compiled.compiles(padded, 12) and not compiled.compiles(_signals(), 0.25)
    assert _same(compiled(padded, 12), pipeline.select(padded, 12))
    assert _same(compiled(_signals(), 0.25), pipeline.select(_signals(), 0.25))
    assert _same(compiled(_signals(), [12, 9]), pipeline.select(_signals(), [12, 9]))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["zspaprune", "fastv", "divprune"])
def test_compiled_select_equals_eager(recipe: str) -> None:
    pipeline = compose(recipe)
    compiled = pipeline.compile()  # fullgraph=True: a graph break would raise
    for seed in range(2):
        signals = _signals(seed=seed)
        assert _same(compiled(signals, 12), pipeline.select(signals, 12))
    signals = _signals(seed=3)
    assert _same(compiled(signals, 48), pipeline.select(signals, 48))  # budget = N: every token


@pytest.mark.slow
def test_graph_break_under_fullgraph_is_a_clear_error() -> None:
    with pytest.raises(SelectCompileError, match="graph break.*fullgraph=False"):
        compose("random").compile()(_signals(), 12)


@pytest.mark.slow  # torch.compile (inductor) on the CPU
def test_prune_with_compile_matches_eager_on_a_tiny_llava():
    """``framework.prune(..., compile=True)`` selects exactly what the eager pipeline selects, through the
    compiled graph (the adapter's all-True ``visual_mask`` is dropped so the call compiles)."""
    from adapter_fixtures import llava_inputs, tiny_llava

    from vtprune.framework import prune
    from vtprune.framework.compiled import CompiledPipeline

    model = tiny_llava()
    inputs = llava_inputs(model, images_per_sample=(1,), question_lengths=(5,))
    with torch.no_grad():
        with prune(model, "zspaprune", budget=4) as eager:
            eager_logits = model(**inputs).logits
        with prune(model, "zspaprune", budget=4, compile=True) as compiled:
            assert isinstance(compiled.pipeline, CompiledPipeline)
            calls = []
            original = compiled.pipeline.select._graph
            compiled.pipeline.select._graph = lambda *a: calls.append(1) or original(*a)
            compiled_logits = model(**inputs).logits
    assert calls, "the drop did not take the compiled graph"
    assert torch.equal(eager.last_selection.selection.indices, compiled.last_selection.selection.indices)
    assert torch.equal(eager_logits, compiled_logits)
