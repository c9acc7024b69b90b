"""CLIP-space signals at ``pre_llm_clip`` (CDPruner) on the tiny LLaVA, against the official formulas.

The CLIP checkpoint is a tiny random ``CLIPModel`` whose vision model is the LLaVA tower (``save_pretrained`` to a
temporary folder, loaded back by path), with a text tower of 8 positions so that a long prompt gives two segments.
"""

from __future__ import annotations

import pytest
import torch

from adapter_fixtures import (
    SignalRecorder,
    llava_inputs,
    record_hooks,
    save_tiny_clip,
    single_thread,
    tiny_clip_model,
    tiny_llava,
    tiny_llava_next,
    tiny_tokenizer,
)
from vtprune import framework
from vtprune.framework.errors import MissingSignalError, VtpruneError
from vtprune.strategies.functional import cdpruner_select

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
STOP = [41, 42]  # the fixtures' "ASSISTANT:" marker


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def clip_path(model, tmp_path_factory):
    return save_tiny_clip(model, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, images_per_sample=(1, 2), question_lengths=(9, 3), seed=1)




def _official_text_embeds(path, text, segment=8):
    """CDPruner ``clip_encoder.forward``: CLIP tokenizer without truncation, zero-padded to a multiple of the
    text positions, one ``text_embeds`` per segment (``CLIPTextModelWithProjection``)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(path)
    tower = CLIPTextModelWithProjection.from_pretrained(path).eval()
    encoded = tokenizer(text=text, return_tensors="pt")
    count = (encoded.input_ids.shape[1] - 1) // segment + 1
    padding = segment * count - encoded.input_ids.shape[1]
    feed = {k: torch.cat([v, v.new_zeros((1, padding))], dim=1).reshape(-1, segment) for k, v in encoded.items()}
    with torch.no_grad():
        return tower(**feed).text_embeds


def test_clip_signals_follow_the_official_formulas(model, clip_path, inputs):
    from transformers import CLIPModel

    spy = SignalRecorder(framework.compose("cdpruner"))
    with framework.prune(
        model, spy, budget=5, prompt_stop=STOP, clip_model=clip_path, tokenizer=tiny_tokenizer()
    ) as handle, torch.no_grad():
        model(**inputs)
    signals = spy.seen[-1]
    clip = CLIPModel.from_pretrained(clip_path).eval()
    with torch.no_grad():
        hidden = clip.vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        tower = model.model.vision_tower
        post = getattr(tower, "vision_model", tower).post_layernorm  # the VLM tower's own post_layernorm
        image_embeds = clip.visual_projection(post(hidden).float())
    torch.testing.assert_close(signals.clip_visual, image_embeds, atol=1e-5, rtol=1e-5)

    decoder = tiny_tokenizer()
    sample_of_image = [0, 1, 1]
    for r, b in enumerate(sample_of_image):
        ids = inputs["input_ids"][b]
        last_image = int((ids == model.config.image_token_id).nonzero().max())
        stop = int(torch.nonzero(ids == STOP[0]).flatten()[-1])
        text = decoder.decode(ids[last_image + 1 : stop].tolist(), skip_special_tokens=True).strip()
        want = _official_text_embeds(clip_path, text)
        m = int(signals.clip_text_mask[r].sum())
        assert m == want.shape[0]
        torch.testing.assert_close(signals.clip_text[r, :m], want, atol=1e-5, rtol=1e-5)
    assert signals.clip_text_mask.sum(1).tolist() == [2, 1, 1]  # 10 prompt tokens = 2 segments of 8

    keep = cdpruner_select(signals.visual, signals.clip_visual, signals.clip_text, 5, None, signals.clip_text_mask)
    for r in range(3):
        assert handle.last_selection.selection.row_indices(r).tolist() == keep[r].nonzero().flatten().tolist()


def test_loaded_clip_model_and_generate(model, clip_path, inputs):
    from transformers import AutoTokenizer

    clip = tiny_clip_model(model)
    kwargs = dict(budget=4, clip_model=clip, clip_tokenizer=AutoTokenizer.from_pretrained(clip_path), tokenizer=tiny_tokenizer())
    with framework.prune(model, "cdpruner", **kwargs) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert handle.last_selection.counts.tolist() == [4, 4, 4]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    with framework.prune(model, "cdpruner", budget=4, clip_model=clip_path, tokenizer=tiny_tokenizer()) as by_path:
        again = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(by_path.last_selection.selection.indices, handle.last_selection.selection.indices)
    assert torch.equal(out, again)


def test_errors_are_clear_and_leave_no_hooks(model, clip_path, tmp_path):
    before = record_hooks(model)
    with pytest.raises(MissingSignalError, match="clip_model"):
        framework.prune(model, "cdpruner", budget=4)
    with pytest.raises(ValueError, match="tokenizer"):
        framework.prune(model, "cdpruner", budget=4, clip_model=clip_path)
    from transformers import CLIPConfig, CLIPModel

    from adapter_fixtures import tiny_clip_config

    wrong = CLIPModel(CLIPConfig(vision_config=tiny_clip_config(hidden_size=48).to_dict()))
    with pytest.raises(ValueError, match="does not match the vision tower"):
        framework.prune(model, "cdpruner", budget=4, clip_model=wrong, clip_tokenizer=tiny_tokenizer(), tokenizer=tiny_tokenizer())
    assert record_hooks(model) == before
    nxt = tiny_llava_next(layers=2)
    with pytest.raises(VtpruneError, match="pre_llm_clip"):
        framework.prune(nxt, "cdpruner", budget=4, clip_model=clip_path, tokenizer=tiny_tokenizer())
