"""End to end: save_pretrained / from_pretrained + a real LlavaProcessor (no torchvision), then prune."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from adapter_fixtures import IMAGE_TOKEN_ID, single_thread, tiny_llava, tiny_llava_processor
from vtprune import framework
from vtprune.framework.prune import prune

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def test_saved_model_and_processor_prune_end_to_end(tmp_path):
    assert importlib.util.find_spec("torchvision") is None
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tiny_llava(seed=1).save_pretrained(tmp_path)
    tiny_llava_processor().save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    model.generation_config.eos_token_id = None
    processor = AutoProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 33, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["<s> w5 w6 <image> w7 w8 w9 w41 w42", "<s> w5 <image> w11 w12 w41 w42"]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 32  # 16 per image, expanded by the processor
    stop = processor.tokenizer(" w41 w42", add_special_tokens=False)["input_ids"]
    base = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with prune(model, "attention+critical+fps+layer(k=2)", budget=0.25, prompt_stop=stop) as handle:
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert handle.last_selection.counts.tolist() == [4, 4]
    assert out.sequences.shape == base.shape
    assert out.cache.layers[-1].keys.shape[-2] < batch["input_ids"].shape[1]
    # after removal the loaded model generates exactly as before
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), base)


def test_framework_prune_entry_point(tmp_path):
    model = tiny_llava()
    handle = framework.prune(model, "critical+fps", budget=4)
    try:
        assert handle.adapter.name == "llava"
        assert "PruneHandle" in repr(handle)
    finally:
        handle.remove()
    assert not handle.active
