"""`decoding_view` (adapters/segments.py): a pruned segment extended by the tokens after the prefill, what a
decoding layer's keys are; and `DecoderSpec.layer_kwargs` runs on every layer of every segment while decoding."""

from __future__ import annotations

import torch

from vtprune.adapters.segments import Segment, Session, decoding_view

L = 6  # original prefill length


def _segment() -> tuple[Session, Segment]:
    """Two rows of 6 original tokens (row 0 left padded by 2), positions 2..5 dropped from row 1 and 3 from row 0;
    row 1 keeps fewer slots, so it gets a filler slot on the left."""
    original = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])  # (B, L) generate's position ids
    index = torch.tensor([[2, 4, 5], [0, 1, 5]])  # row 1: slot 0 filler (holds position 0 too, valid False)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    mask2d = torch.tensor([[True, True, True], [False, True, True]])
    rel = index.clone()
    segment = Segment(2, index, rel, valid, mask2d, original.gather(1, index), torch.zeros(2, dtype=torch.long),
                      torch.tensor([1, 3]))
    seg0 = Segment(0, torch.arange(L).expand(2, -1), torch.arange(L).expand(2, -1), torch.ones(2, L, dtype=torch.bool),
                   torch.tensor([[0, 0, 1, 1, 1, 1], [1] * L]).bool(), original, torch.zeros(2, dtype=torch.long),
                   torch.zeros(2, dtype=torch.long))
    return Session(L, "keep", original, [seg0, segment]), segment


def _expected(session: Session, segment: Segment, tail: int, new_positions: list[int], shift: list[int]):
    """Plain loops: what the view of ``segment`` must hold after ``tail`` tokens past the prefill."""
    index, rel, valid, positions = [], [], [], []
    for b in range(2):
        index.append(segment.index[b].tolist() + [L + t for t in range(tail)])
        rel.append(segment.rel[b].tolist() + [session.segments[0].length + t for t in range(tail)])
        valid.append(segment.valid[b].tolist() + [True] * tail)
        last = int(session.original_positions[b, -1])
        earlier = [last + 1 + t for t in range(tail - 1)]
        positions.append(segment.positions[b].tolist() + [p - shift[b] for p in earlier + [new_positions[b]]])
    return index, rel, valid, positions


def test_view_after_three_decoding_steps_keep():
    session, segment = _segment()
    tail = 3  # two cached tokens, one in flight
    mask2d = torch.cat([segment.mask2d, torch.ones(2, tail, dtype=torch.bool)], dim=1)
    new = torch.tensor([[6], [8]])  # row 0: 3 + 3, row 1: 5 + 3
    view = decoding_view(session, segment, mask2d, new, lambda p: p)
    index, rel, valid, positions = _expected(session, segment, tail, [6, 8], [0, 0])
    assert view.index.tolist() == index
    assert view.rel.tolist() == rel
    assert view.valid.tolist() == valid
    assert view.positions.tolist() == positions
    assert torch.equal(view.mask2d, mask2d)
    assert view.start == segment.start and view.length == segment.length + tail


def test_view_compact_shift_and_first_step():
    session, segment = _segment()
    mask2d = torch.cat([segment.mask2d, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    new = torch.tensor([[4], [6]])  # the first decoding step
    shifts = torch.tensor([[1], [3]])
    view = decoding_view(session, segment, mask2d, new, lambda p: p - shifts)
    _, _, _, positions = _expected(session, segment, 1, [4, 6], [1, 3])
    assert view.positions.tolist() == positions
    assert view.index[:, -1].tolist() == [L, L]


def test_broadcast_new_positions_row():
    """``generate`` may give one row of position ids for the batch: the view expands it."""
    session, segment = _segment()
    mask2d = torch.cat([segment.mask2d, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    view = decoding_view(session, segment, mask2d, torch.tensor([[6]]), lambda p: p)
    assert view.positions[:, -1].tolist() == [6, 6]


def test_layer_kwargs_runs_on_every_decoding_layer_with_the_view():
    """A spec's ``layer_kwargs`` (identity here, recording) is called at each decoding step for every layer, segment
    0 included, with the view of that layer's segment: its keys are the layer's cache slots after the step, and the
    view's last index is the in-flight token's original position."""
    from dataclasses import replace as dc_replace

    from transformers import LlamaForCausalLM

    from adapter_fixtures import left_pad, tiny_llama_config
    from vtprune.adapters.decoder import Decision, DecoderPruner, DecoderSpec

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    llm.generation_config.eos_token_id = None
    ids, mask = left_pad([[1, *range(3, 20)], [1, *range(30, 42)]])

    class DropOdd:  # drops the odd original positions in [6, 16) before layer 2
        layers, query = (2,), None

        def wants(self, layer):
            return frozenset()

        def decide(self, layer, state):
            return Decision(keep=~((state.index >= 6) & (state.index < 16) & (state.index % 2 == 1)))

        def finish(self, session):
            pass

    plan = DropOdd()
    calls = []

    def record(layer, hidden, kwargs, segment, cache, prefill):
        if not prefill:
            calls.append((layer, segment.length, int(segment.index[0, -1]), cache.get_seq_length(layer) + hidden.shape[1]))
        return kwargs

    spec = dc_replace(DecoderSpec.for_llama_like(llm.model), layer_kwargs=record)
    pruner = DecoderPruner(spec, lambda embeds, mask2d, pos: plan, positions="keep")
    pruner.attach()
    try:
        llm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    finally:
        pruner.remove()
    length = ids.shape[1]
    steps = 2  # 3 new tokens: the prefill makes the first
    assert [c[0] for c in calls] == [0, 1, 2, 3] * steps
    for step in range(steps):
        for layer in range(4):
            _, view_length, last_index, cache_slots = calls[4 * step + layer]
            assert view_length == cache_slots  # the view's slots are the layer's keys after this step
            assert last_index == length + step
    assert calls[0][1] == length + 1 and calls[2][1] == length - 5 + 1  # segment 0 full, segment 1 lost 5 tokens
