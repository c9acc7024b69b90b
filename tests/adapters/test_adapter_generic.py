"""Generic adapter (any VLM with the standard multimodal interface) on VipLLaVA, a family no specific adapter names,
and on Video-LLaVA through a registry without its specific adapter; registry lookup and ``vtprune list --model``."""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import pytest
import torch

from adapter_fixtures import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    PLACEMENT_RECIPES,
    check_batch_equals_samples_alone,
    check_forward_and_generate,
    generation_positions,
    left_pad,
    single_thread,
    tiny_clip_config,
    tiny_llama_config,
    tiny_llava,
)
from adapter_fixtures import forward_logits as _forward
from family_checks import check_keep_all_is_bit_identical, check_remove_restores, check_sdpa_equals_eager
from vtprune import framework
from vtprune.adapters.generic import GenericAdapter
from vtprune.framework import VtpruneError
from vtprune.framework.errors import RegistrationError
from vtprune.framework.prune import adapter_for, prune
from vtprune.framework.tables import Registry
from vtprune.testing import check_adapter

ATOL = 1e-5
RECIPES = {name: recipe for name, recipe in PLACEMENT_RECIPES.items() if name != "vision"}
PLACEMENTS = list(RECIPES)
#: images per sample (separated by text, so each is its own run of placeholders)
SPEC = (1, 2)
VIDEO_TOKEN_ID = 94

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def tiny_vipllava(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    config = VipLlavaConfig(
        vision_config=tiny_clip_config(),
        text_config=tiny_llama_config(num_hidden_layers=layers),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=[-2, -1],
    )
    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def vipllava_inputs(model, samples: Sequence[int] = (0, 1), seed: int = 0):
    """Left-padded batch; sample i has ``SPEC[i]`` images, each from its own seed (a sample alone equals its row)."""
    size = model.config.vision_config.image_size
    with torch.no_grad():
        count = int(model.model.get_image_features(torch.zeros(1, 3, size, size)).pooler_output.shape[1])
    rows, images = [], []
    for i in samples:
        generator = torch.Generator().manual_seed(seed * 100 + i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()
        for j in range(SPEC[i]):
            images.append(torch.randn(3, size, size, generator=generator))
            row += [IMAGE_TOKEN_ID] * count + [10 + j]
        row += torch.randint(3, 90, (4 + 2 * i,), generator=generator).tolist() + [41, 42]
        rows.append(row)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(images)}


@pytest.fixture(scope="module")
def model():
    return tiny_vipllava()


@pytest.fixture(scope="module")
def inputs(model):
    return vipllava_inputs(model)


def _registry_without(name: str) -> Registry:
    full = framework.build_registry(autoload=False)
    adapters = {key: value for key, value in full.adapters.items() if key != name}
    return Registry(stages=full.stages, presets=full.presets, adapters=adapters, tasks=full.tasks, launchers=full.launchers)


def test_lookup_prefers_model_classes_then_the_probe(model):
    assert adapter_for(model) is GenericAdapter  # no adapter names VipLlava
    llava = tiny_llava(layers=2)
    renamed = type("MyLlavaForConditionalGeneration", (type(llava),), {})
    fake = renamed.__new__(renamed)
    assert adapter_for(fake).name == "llava"  # a subclass of a named class keeps its specific adapter
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(RegistrationError, match="no vtprune adapter supports LlamaForCausalLM"):
        adapter_for(LlamaForCausalLM(LlamaConfig(**tiny_llama_config().to_dict())))
    assert not GenericAdapter.accepts(type(llava).__mro__[0].__bases__[0])  # the PreTrainedModel base: no images


def test_vtprune_list_says_which_adapter_a_class_resolves_to():
    from vtprune.cli import main

    for name, want in (
        ("VipLlavaForConditionalGeneration", "'generic' (capability probe"),
        ("LlavaForConditionalGeneration", "'llava' (named in its model_classes"),
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["list", "--no-plugins", "--model", name]) == 0
        assert want in out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["list", "--no-plugins", "--model", "LlamaForCausalLM"]) == 1
    assert "no vtprune adapter supports LlamaForCausalLM" in err.getvalue()
    entries = {entry.name: entry for entry in framework.catalog(kind="adapter")}
    assert entries["generic"].params["fallback"][1] == "accepts(model)"


def test_one_row_per_run_of_placeholders(model, inputs):
    with prune(model, RECIPES["pre_llm"], budget=0.25) as handle:
        _forward(model, inputs)
    result = handle.last_selection
    assert result.image_sample.tolist() == [0, 1, 1]
    assert result.num_tokens.tolist() == [16, 16, 16]
    assert result.counts.tolist() == [4, 4, 4]
    for r in range(3):
        assert torch.all(inputs["input_ids"][result.image_sample[r], result.image_positions[r]] == IMAGE_TOKEN_ID)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_keep_all_is_bit_identical_and_remove_restores(model, inputs, placement):
    check_keep_all_is_bit_identical(model, inputs, RECIPES[placement], _forward)
    check_remove_restores(model, inputs, RECIPES[placement], 5, _forward)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_pruned_forward_and_generate_match_reference(model, inputs, placement, positions):
    kept_only = positions == "compact" and placement == "pre_llm"
    check_forward_and_generate(model, inputs, RECIPES[placement], positions, kept_only, atol=ATOL)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_batch_equals_samples_alone(model, inputs, positions):
    budgets = [5, 9, 3]
    alone = [(vipllava_inputs(model, [0]), budgets[:1]), (vipllava_inputs(model, [1]), budgets[1:])]
    check_batch_equals_samples_alone(model, inputs, RECIPES["layer"], positions, budgets, alone, atol=ATOL)


def test_sdpa_equals_eager(model, inputs):
    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    check_sdpa_equals_eager(model, tiny_vipllava(attn="eager"), feed, RECIPES["schedule"], 6, ATOL, _forward)


def test_check_adapter_and_limitations(model):
    check_adapter(tiny_vipllava, vipllava_inputs, recipe=RECIPES["layer"], budgets=(3, 0.5))
    with pytest.raises(VtpruneError, match="vision"):
        prune(model, "random+critical+fps+vision", budget=4)


def _tiny_video_llava():
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    config = VideoLlavaConfig(
        vision_config=tiny_clip_config(),
        text_config=tiny_llama_config(num_hidden_layers=3),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
    )
    torch.manual_seed(0)
    return VideoLlavaForConditionalGeneration(config).eval()


def _video_llava_inputs(model, samples: Sequence[int] = (0, 1), frames: int = 2):
    """Sample 0: an image then a video; sample 1: a video then an image (16 tokens per image, 17 per frame)."""
    size = model.config.vision_config.image_size
    rows, images, videos = [], [], []
    for i in samples:
        generator = torch.Generator().manual_seed(i)
        row = [BOS_ID, 5 + i]
        for j, kind in enumerate(("image", "video") if i == 0 else ("video", "image")):
            if kind == "image":
                images.append(torch.randn(3, size, size, generator=generator))
                row += [IMAGE_TOKEN_ID] * 16 + [10 + j]
            else:
                videos.append(torch.randn(frames, 3, size, size, generator=generator))
                row += [VIDEO_TOKEN_ID] * (frames * 17) + [10 + j]
        rows.append(row + torch.randint(3, 90, (3 + i,), generator=generator).tolist())
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(images), "pixel_values_videos": torch.stack(videos)}


def test_a_family_before_its_specific_adapter_is_registered():
    """Video-LLaVA (images and videos) through a registry without its adapter: the generic one, one row per run."""
    registry = _registry_without("video_llava")
    video_model = _tiny_video_llava()
    assert adapter_for(video_model, registry) is GenericAdapter
    inputs = _video_llava_inputs(video_model)
    with prune(video_model, RECIPES["pre_llm"], budget=3, registry=registry) as handle:
        _forward(video_model, inputs)
    assert handle.adapter is GenericAdapter
    assert handle.last_selection.image_sample.tolist() == [0, 0, 1, 1]
    assert handle.last_selection.num_tokens.tolist() == [16, 34, 34, 16]
    for recipe in (RECIPES["pre_llm"], RECIPES["layer"]):
        check_adapter(_tiny_video_llava, _video_llava_inputs, recipe=recipe, budgets=(3, 0.5), registry=registry)
