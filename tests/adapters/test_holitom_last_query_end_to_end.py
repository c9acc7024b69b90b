"""HoliTom's inner-merge query on the tiny LLaVA-OneVision (issue 15): the official code scores the visual tokens at
layer k with the attention row of the sequence's LAST token (``Qwen2Model_holitom.forward``, ``[0, -1]``), which the
preset reproduces with ``pre_llm_layer(query=last)`` (``relevance.last_attention``).

The prompt is cut before the "assistant" marker (``prompt_stop``), so the adapter's query token (the last prompt
token) and the sequence's last token differ:

- the ``attention`` the layer step scores with equals, per row, the head-wise eager attention (RoPE, causal mask) of
  the row's last real token at layer k - 1 of the reference model (the unpruned model fed the first drop's merged
  values, its removed tokens masked out); ``query=prompt`` gives the last prompt token's row instead, and the two
  differ;
- a batch equals each sample alone, left- and right-padded (the query is each row's last REAL token).
"""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import (
    generation_positions,
    left_pad,
    masked_reference,
    merged_embeddings,
    removed_by_layer,
    single_thread,
    two_scene_video_inputs,
)

from vtprune.framework.prune import prune
from vtprune.strategies.relevance import AttentionRelevance

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

FRAMES = 6
K = 2
BUDGET = 12
STOP = [41, 42]  # the "assistant" marker ending every prompt of `llava_onevision_inputs`
PAD = 0


def _setup(question_lengths=(3, 6)):
    return two_scene_video_inputs(question_lengths, FRAMES)


class _Recorder:
    """Records the ``Signals.attention`` every attention relevance stage scores with (a test-only wrapper of the
    class's ``score``, restored by monkeypatch)."""

    def __init__(self, monkeypatch):
        self.seen: list[torch.Tensor] = []
        original = AttentionRelevance.score

        def score(stage, signals):
            self.seen.append(signals.attention.detach().clone())
            return original(stage, signals)

        monkeypatch.setattr(AttentionRelevance, "score", score)


def _run(model, inputs, query: str, monkeypatch):
    recorder = _Recorder(monkeypatch)
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, f"holitom+pre_llm_layer(k={K},keep=0.5,query={query})", budget=BUDGET, prompt_stop=STOP) as handle:
        with torch.no_grad():
            logits = model(**feed).logits
        result = handle.last_selection
    assert len(recorder.seen) == 1  # only the layer step reads attention
    return logits, result, recorder.seen[0]


def _reference_rows(model, inputs, result) -> torch.Tensor:
    """(B, H, L, L) eager attention weights of layer K - 1 of the reference model: merged embeddings with the first
    drop's values at its kept slots, the tokens it removed masked out."""
    batch, length = inputs["input_ids"].shape
    embeds = merged_embeddings(model, inputs)
    first = result.drops[0]
    for row in range(len(result.image_positions)):
        kept = first.selection.row_indices(row)
        values = first.selection.values[row][first.selection.mask[row]]
        b = int(result.image_sample[row])
        embeds[b, result.image_positions[row][kept]] = values.to(embeds.dtype)
    removed = removed_by_layer(result, batch, length, model.config.text_config.num_hidden_layers)
    feed = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"],
            "position_ids": generation_positions(inputs["attention_mask"])}
    with torch.no_grad(), masked_reference(model, removed):
        return model(**feed, output_attentions=True).attentions[K - 1]


def test_scores_are_the_last_tokens_attention_of_the_models_own_layer(monkeypatch):
    model, inputs = _setup()
    _, result, last = _run(model, inputs, "last", monkeypatch)
    _, prompt_result, prompt = _run(model, inputs, "prompt", monkeypatch)
    weights = _reference_rows(model, inputs, result)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for row in range(len(result.image_positions)):
        b = int(result.image_sample[row])
        present = result.image_positions[row][result.drops[0].selection.row_indices(row)]  # the merged tokens' slots
        n = present.numel()
        final = int(torch.nonzero(mask[b]).flatten()[-1])
        assert ids[b, final - 1 : final + 1].tolist() == STOP  # the sequence ends with the marker
        torch.testing.assert_close(last[row, :, :n], weights[b, :, final, present].float(), atol=1e-5, rtol=0)
        assert not bool(last[row, :, n:].any())  # padding columns
        # query=prompt: the last prompt token, the question's last (before the marker)
        torch.testing.assert_close(prompt[row, :, :n], weights[b, :, final - 2, present].float(), atol=1e-5, rtol=0)
        assert not torch.allclose(last[row, :, :n], prompt[row, :, :n], atol=1e-4)
    assert prompt_result.drops[0].selection.row_indices(0).tolist() == result.drops[0].selection.row_indices(0).tolist()


def _right_padded(inputs):
    mask = inputs["attention_mask"].bool()
    rows = [inputs["input_ids"][b][mask[b]].tolist() for b in range(mask.shape[0])]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    new_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], new_mask[b, : len(r)] = torch.tensor(r), 1
    return {**inputs, "input_ids": ids, "attention_mask": new_mask}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_equals_each_sample_alone_left_and_right_padded(padding, monkeypatch):
    model, inputs = _setup(question_lengths=(2, 7))
    if padding == "right":
        inputs = _right_padded(inputs)
    else:
        mask = inputs["attention_mask"].bool()
        inputs = {**inputs, **dict(zip(("input_ids", "attention_mask"),
                                       left_pad([inputs["input_ids"][b][mask[b]].tolist() for b in range(2)], PAD)))}
    logits, result, attention = _run(model, inputs, "last", monkeypatch)
    mask = inputs["attention_mask"].bool()
    for b in range(2):
        sample = {
            "input_ids": inputs["input_ids"][b : b + 1, mask[b]],
            "attention_mask": inputs["attention_mask"][b : b + 1, mask[b]],
            "pixel_values_videos": inputs["pixel_values_videos"][b : b + 1],
        }
        alone_logits, alone, alone_attention = _run(model, sample, "last", monkeypatch)
        for drop, alone_drop in zip(result.drops, alone.drops):
            assert drop.selection.row_indices(b).tolist() == alone_drop.selection.row_indices(0).tolist()
        n = int(alone_attention.shape[-1])
        torch.testing.assert_close(attention[b, :, :n], alone_attention[0], atol=1e-6, rtol=0)
        real = mask[b].gather(0, result.sequence_index[b]) & result.sequence_mask[b]  # real slots of the pruned sequence
        alone_real = alone.sequence_mask[0]
        torch.testing.assert_close(logits[b, real], alone_logits[0, alone_real], atol=1e-5, rtol=0)
