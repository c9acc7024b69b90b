"""The model-agnostic decoder machinery on a plain Llama decoder (no images): a usage example for adapter
authors and a check of its pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from adapter_fixtures import generation_positions, left_pad, masked_reference, single_thread, tiny_llama_config
from vtprune.adapters.decoder import (
    Decision,
    DecoderPruner,
    DecoderSpec,
    DropState,
    gather_seq,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


class _Wrapper(torch.nn.Module):
    """Gives a LlamaForCausalLM the ``model.model.language_model`` path masked_reference expects."""

    def __init__(self, llm):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.language_model = llm.model


def _llm(attn="sdpa"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config())
    llm.set_attn_implementation(attn)
    llm.generation_config.eos_token_id = None
    return llm.eval()


@dataclass
class DropOddPositions:
    """Drops the odd original positions in [lo, hi) before ``layer``; records the attention row it saw."""

    layer: int
    lo: int
    hi: int
    query: Optional[torch.Tensor] = None
    seen: Optional[DropState] = None

    @property
    def layers(self):
        return (self.layer,)

    def wants(self, layer):
        return frozenset({"attention", "keys"})

    def decide(self, layer, state):
        self.seen = state
        drop = (state.index >= self.lo) & (state.index < self.hi) & (state.index % 2 == 1)
        return Decision(keep=~drop)

    def finish(self, session):
        self.session = session


def test_gather_seq_layouts():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3)
    index = torch.tensor([[0, 4], [1, 2]])
    assert gather_seq(x, index, 1).tolist() == [[x[0, 0].tolist(), x[0, 4].tolist()], [x[1, 1].tolist(), x[1, 2].tolist()]]
    mrope = torch.arange(3 * 2 * 5).view(3, 2, 5)  # (3, B, L) position ids
    assert gather_seq(mrope, index, -1)[:, 1].tolist() == mrope[:, 1, [1, 2]].tolist()
    broadcast = torch.arange(5 * 4).view(1, 5, 4).float()  # cos with batch 1
    assert gather_seq(broadcast, index, -2).shape == (2, 2, 4)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("layer", [0, 2])
def test_llama_drop_matches_masked_reference(layer, positions):
    llm = _llm()
    ids, mask = left_pad([[1, *range(3, 20)], [1, *range(30, 42)]])
    query = torch.full((2,), ids.shape[1] - 1)
    plan = DropOddPositions(layer, 6, 16, query=query)
    spec = DecoderSpec.for_llama_like(llm.model)
    pruner = DecoderPruner(spec, lambda embeds, mask2d, pos: plan, positions=positions)
    pruner.attach()
    try:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    finally:
        pruner.remove()
    session = pruner.last_session
    removed = torch.zeros_like(mask, dtype=torch.bool)
    removed[:, 6:16] = (torch.arange(6, 16) % 2 == 1)
    per_layer = [removed if number >= layer else torch.zeros_like(removed) for number in range(4)]
    with masked_reference(_Wrapper(llm), per_layer, positions):
        if positions == "compact" and layer == 0:
            per_layer_mask = mask.clone()
            per_layer_mask[removed] = 0
            ref = llm.generate(ids, attention_mask=mask, position_ids=generation_positions(per_layer_mask),
                               max_new_tokens=6, do_sample=False)
        else:
            ref = llm.generate(ids, attention_mask=mask, position_ids=generation_positions(mask),
                               max_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert out.cache.layers[3].keys.shape[-2] == ids.shape[1] - 5 + 5
    assert session.final.dropped.tolist() == [5, 5]
    assert not any(m._forward_pre_hooks for m in llm.modules())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recomputed_row_equals_eager_attention(attn):
    llm, eager = _llm(attn), _llm("eager")
    ids, mask = left_pad([[1, *range(3, 20)], [1, *range(30, 38)]])
    plan = DropOddPositions(3, 6, 16, query=torch.tensor([17, 14]))
    pruner = DecoderPruner(DecoderSpec.for_llama_like(llm.model), lambda *a: plan)
    pruner.attach()
    with torch.no_grad():
        llm(ids, attention_mask=mask)
    pruner.remove()
    with torch.no_grad():
        attentions = eager(ids, attention_mask=mask, output_attentions=True).attentions
    want = attentions[2][torch.arange(2), :, plan.query]  # layer k-1 = 2, (B, H, L)
    torch.testing.assert_close(plan.seen.attention, want, atol=1e-6, rtol=0)
    assert plan.seen.keys.shape == (2, ids.shape[1], 2, 16)  # GQA: 2 key heads
