"""SparseVLM end to end on the tiny LLaVA.

- Masked-reference proof: the pruned logits and greedy tokens equal the *unpruned* model with, before each sparse
  layer, the image's kept tokens then its recycled (merged) tokens written into the image's first live slots (the
  merged values computed here from the reference's own hidden states: ``sum(x / (size + 1e-6))`` of the members the
  record assigns) and every other image slot masked out of attention from that layer on.
- Independent selection: on a 64-token LLaVA whose second drop removes tokens too, every drop's kept tokens are
  recomputed from the masked reference's own states by the official rules, with the raters chosen once from the
  decoder input embeddings (as ``LlamaDynamicvitModel.forward``); per-drop raters would select differently there.
- Records name original image tokens at every drop (``DropRecord.selection.indices``), also after a drop wrote the
  recycled tokens into the image's first slots: drop 2's kept tokens are among drop 1's.
- The adaptive counts (rank rule + recycled clusters) are reported per image and drop on ``last_selection``.
- A sample gives the same kept set, logits and answer alone as in a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import aligned, generation_positions, llava_inputs, masked_reference, single_thread, tiny_llava
from vtprune import framework
from vtprune.adapters.spans import prompt_positions
from vtprune.strategies.functional import sparsevlm as sv
from vtprune.testing.models import LLAVA_IMAGE_ID, PAD_ID, finish_tiny, tiny_clip_config, tiny_llama_config

REGISTRY = framework.build_registry(autoload=False)
RECIPE = "sparsevlm+sparse_layers(layers=[1,2])"
PARAMS = {"scale": 0.8, "bias": 0.0}  # TextVQA-64's pair: the rank rule prunes the tiny model's 16 tokens
MERGE_EPS = 1e-6  # SparseVLM's cluster_and_merge: x / (size + 1e-6), summed
NEW_TOKENS = 4

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=3)


def _llava_64(attn: str = "eager"):
    """A tiny LLaVA with 64 tokens per image (56 x 56 pixels, 7 x 7 patches): enough deleted tokens for two
    recycled clusters at the first drop, so the second drop removes tokens as well."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=tiny_clip_config(image_size=56, projection_dim=32),
        text_config=tiny_llama_config(num_hidden_layers=3),
        image_token_id=LLAVA_IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    return finish_tiny(LlavaForConditionalGeneration(config), attn, PAD_ID)


@pytest.fixture(scope="module")
def model64():
    return _llava_64()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, (1, 1), (5, 3), seed=3)


def _run(model, inputs, positions="keep", params=PARAMS):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with framework.prune(model, RECIPE, budget=64, registry=REGISTRY, positions=positions, **params) as handle, torch.no_grad():
        logits = model(**feed).logits
        result = handle.last_selection
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(handle.last_selection.drops[0].selection.indices, result.drops[0].selection.indices)
    return logits, out, result


class _WriteRecycled:
    """Forward pre-hooks on the decoder layers of the unpruned model: at a drop layer's prefill, each image's live
    slots (its first ``before`` placeholder positions) receive [critical kept tokens, merged tokens], each group in
    the order of the slots holding them, computed from the incoming hidden states. The records name original image
    tokens, so the reference keeps its own map of the original token each live slot holds (``holds``; the identity
    until a drop rewrites the slots). Records what it wrote, the hidden states entering each drop layer, and the
    map at each drop; layer 0's input (the decoder input embeddings) too."""

    def __init__(self, model, result, length):
        self.layers = model.model.language_model.layers
        self.result = result
        self.length = length
        self.handles = []
        self.written = {}  # (drop, image) -> {original token: the row written for it}
        self.hidden_in = {}  # drop -> (B, L, D) hidden states entering its layer, before the writes
        self.holds_at = {}  # drop -> per image, the original token of each live slot
        self.embeds = None

    def __enter__(self):
        self.handles.append(self.layers[0].register_forward_pre_hook(self._embeds, with_kwargs=True))
        for number, record in enumerate(self.result.drops):
            self.handles.append(
                self.layers[record.layer].register_forward_pre_hook(self._hook(number, record), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _embeds(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == self.length:  # a prefill: start from the identity map
            self.embeds = hidden.clone()
            self.holds = [list(range(int(n))) for n in self.result.num_tokens]
        return None

    def _hook(self, number, record):
        selection = record.selection

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != self.length:  # a decoding step: the cache already holds the prefill's values
                return None
            self.hidden_in[number] = hidden.clone()
            self.holds_at[number] = [list(h) for h in self.holds]
            if selection.assignment is None:  # nothing merged: the rank rule kept every token (nothing dropped)
                assert torch.equal(selection.counts, record.before)
                return None
            hidden = hidden.clone()
            for image, positions in enumerate(self.result.image_positions):
                b = int(self.result.image_sample[image])
                holds = self.holds[image][: int(record.before[image])]  # live slot -> original token
                slot = {token: place for place, token in enumerate(holds)}
                kept = selection.row_indices(image).tolist()  # original tokens, ascending
                critical = selection.critical[image][selection.mask[image]].tolist()
                assignment = selection.assignment[image].tolist()  # original token -> record slot
                rows = {}
                for k, (token, crit) in enumerate(zip(kept, critical)):
                    if crit:
                        rows[token] = hidden[b, positions[slot[token]]].clone()
                        continue
                    members = [j for j, a in enumerate(assignment) if a == k]
                    total = torch.zeros_like(hidden[b, 0])
                    for j in members:
                        total = total + hidden[b, positions[slot[j]]] * (1.0 / (len(members) + MERGE_EPS))
                    rows[token] = total
                order = sorted((t for t, c in zip(kept, critical) if c), key=slot.get)
                order += sorted((t for t, c in zip(kept, critical) if not c), key=slot.get)
                for place, token in enumerate(order):
                    hidden[b, positions[place]] = rows[token]
                self.holds[image] = order
                self.written[(number, image)] = rows
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook


def _removed(result, batch, length, layers):
    """(B, L) bool per decoder layer: the image slots gone before that layer (past each drop's kept count)."""
    removed = [torch.zeros(batch, length, dtype=torch.bool) for _ in range(layers)]
    for record in result.drops:
        for image, positions in enumerate(result.image_positions):
            gone = positions[int(record.selection.counts[image]) :]
            for layer in range(record.layer, layers):
                removed[layer][int(result.image_sample[image]), gone] = True
    return removed


def _masked_reference(model, inputs, positions, params):
    """Run the pruned model and the masked + written reference; check logits, greedy tokens and recorded values.
    Returns the pruned run's `PruneResult` and the reference's writer and (eager models) attentions."""
    logits, out, result = _run(model, inputs, positions, params)
    batch, length = inputs["input_ids"].shape
    assert [d.layer for d in result.drops] == [1, 2]
    first = result.drops[0].selection
    assert bool((first.counts < result.num_tokens).all())
    assert bool((~first.critical[first.mask]).any())  # something was merged
    layers = model.config.text_config.num_hidden_layers
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    eager = model.config.text_config._attn_implementation == "eager"
    writer = _WriteRecycled(model, result, length)
    with torch.no_grad(), writer, masked_reference(model, _removed(result, batch, length, layers), positions):
        output = model(**feed, output_attentions=eager)
        written = dict(writer.written)
        greedy = model.generate(**feed, max_new_tokens=NEW_TOKENS, do_sample=False)
    got, want = aligned(logits, result, output.logits, inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(out[:, length:], greedy[:, length:])
    # the recorded values are the ones the reference wrote for each kept original token
    for (number, image), rows in written.items():
        selection = result.drops[number].selection
        values = selection.values[image][selection.mask[image]]
        for k, token in enumerate(selection.row_indices(image).tolist()):
            torch.testing.assert_close(values[k], rows[token].float(), atol=1e-5, rtol=0)
    return result, writer, output.attentions if eager else None


#: The 64-token case: inputs seed and scale (bias 0) where both drops remove tokens and per-drop raters differ.
SEED_64, SCALE_64 = 0, 0.8

#: (inputs seed, scale, bias) on the 16-token model: the second drop re-merges without removing tokens
CASES = [(3, 0.8, 0.0), (5, 1.5, 0.0)]


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("seed,scale,bias", CASES)
def test_pruned_equals_masked_reference_with_recycled_values(model, positions, seed, scale, bias):
    inputs = llava_inputs(model, (1, 1), (5, 3), seed=seed)
    _masked_reference(model, inputs, positions, {"scale": scale, "bias": bias})


def _official_drop(embeds, hidden, attention, image, prompt, live, scale, bias, raters_from):
    """The official selection of one image at one drop, from the masked reference's own states: (critical live
    slots, centre live slots). ``embeds`` / ``hidden``: (L, D) the decoder input embeddings and the hidden states
    entering the drop layer; ``attention``: (H, L, L) the scoring layer's eager attention; ``image``: the image's
    positions; ``prompt``: the prompt positions; ``live``: the image's live slots; raters from the input embeddings
    (``"input"``, official) or from this drop's hidden states (``"drop"``)."""
    visual, text = (embeds[image], embeds[prompt]) if raters_from == "input" else (hidden[image[:live]], hidden[prompt])
    share = torch.softmax(visual @ text.T, dim=1).mean(0)  # (T,)
    raters = torch.where(share > share.mean())[0]
    rows = attention.mean(0)[prompt][raters][:, image[:live]]  # (T_r, n)
    rank = int(torch.linalg.matrix_rank(rows.float()))
    scores = rows.mean(0).tolist()
    if rank == live:
        return list(range(live)), []
    keep = min(int(rank * scale + bias), live - 1)
    by_score = sorted(range(live), key=lambda i: (-scores[i], i))
    critical = sorted(by_score[:keep])
    deleted = [i for i in by_score if i not in critical]  # by descending score
    recycled = deleted[: int(len(deleted) * 0.3) + 1]
    _, centres, _ = sv.cluster_and_merge(hidden[image[torch.tensor(recycled)]], int(len(recycled) / 10) + 1)
    return critical, [recycled[c] for c in centres.tolist()]


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_every_drop_keeps_the_official_tokens_with_raters_from_the_input_embeddings(model64, positions):
    """64 tokens per image: both drops remove tokens. Each drop's recorded kept tokens (original image tokens) and
    critical flags equal the official rules run on the masked reference's own states with the raters chosen once
    from the decoder input embeddings; raters chosen at each drop from its hidden states select differently here
    (so this fails for the per-drop rule); drop 2 keeps a subset of drop 1's tokens."""
    inputs = llava_inputs(model64, (1, 1), (5, 3), seed=SEED_64)
    params = {"scale": SCALE_64, "bias": 0.0}
    result, writer, attentions = _masked_reference(model64, inputs, positions, params)
    second = result.drops[1]
    assert bool((second.selection.counts < second.before).all())  # the second drop removes tokens too
    image_mask = inputs["input_ids"] == LLAVA_IMAGE_ID
    prompts, _ = prompt_positions(image_mask, inputs["attention_mask"].bool(), inputs["input_ids"])
    differs = False
    for number, record in enumerate(result.drops):
        attention = attentions[record.layer - 1]  # the scoring layer: the drop prunes layer k - 1's output
        for image, positions_ in enumerate(result.image_positions):
            b = int(result.image_sample[image])
            live = int(record.before[image])
            picks = {}
            for source in ("input", "drop"):
                critical, centres = _official_drop(
                    writer.embeds[b], writer.hidden_in[number][b], attention[b], positions_, prompts[b], live,
                    SCALE_64, 0.0, source,
                )
                holds = writer.holds_at[number][image]  # live slot -> original token
                picks[source] = ({holds[i] for i in critical}, {holds[i] for i in centres})
            critical, centres = picks["input"]
            kept = record.selection.row_indices(image).tolist()
            assert kept == sorted(critical | centres)
            flags = record.selection.critical[image][record.selection.mask[image]].tolist()
            assert {t for t, f in zip(kept, flags) if f} == critical
            differs |= picks["drop"] != picks["input"]
        if number:
            for image in range(len(result.image_positions)):
                later = set(record.selection.row_indices(image).tolist())
                assert later < set(result.drops[number - 1].selection.row_indices(image).tolist())
    assert differs, "per-drop raters select the same tokens here: the case does not tell the two rules apart"
    for image, positions_ in enumerate(result.image_positions):  # reports name the original sequence positions
        assert result.kept_positions(image).tolist() == positions_[second.selection.row_indices(image)].tolist()


def test_counts_are_adaptive_and_batch_equals_alone(model, inputs):
    logits, out, result = _run(model, inputs)
    first = result.drops[0].selection
    assert first.sizes is not None and int(first.sizes.sum()) <= 16
    for row in range(2):
        keep = inputs["attention_mask"].bool()[row]
        single = {k: (v[row : row + 1, keep] if k in ("input_ids", "attention_mask") else v[row : row + 1]) for k, v in inputs.items()}
        alone_logits, alone_out, alone = _run(model, single)
        for drop, alone_drop in zip(result.drops, alone.drops):
            assert alone_drop.selection.row_indices(0).tolist() == drop.selection.row_indices(row).tolist()
        torch.testing.assert_close(logits[row, -alone_logits.shape[1] :][-1], alone_logits[0, -1], atol=1e-5, rtol=0)
        assert alone_out[0, -NEW_TOKENS:].tolist() == out[row, -NEW_TOKENS:].tolist()
