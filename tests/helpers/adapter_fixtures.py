"""Tiny, random, real transformers VLMs for adapter tests (CPU, fp32, seconds to build).

Reusable by plugin authors: every builder takes the knobs that matter (attention implementation, dtype,
layers, GQA, seed) and returns a real ``*ForConditionalGeneration`` in eval mode. Nothing is downloaded.

- :func:`tiny_llava` / :func:`tiny_llava_next`: models (CLIP vision tower + Llama decoder).
- :func:`llava_inputs` / :func:`llava_next_inputs`: ready batches (left padding, several images per sample).
- :func:`tiny_llava_onevision` / :func:`llava_onevision_inputs`: LLaVA-OneVision (SigLIP + Qwen2), images and
  videos; :func:`two_scene_video_inputs`: its eager model with a video batch of two scenes of still frames.
- :func:`tiny_video_llava`: Video-LLaVA (CLIP image and video towers + Llama).
- References without vtprune code: :func:`masked_reference` (dropped tokens masked out of attention),
  :func:`kept_only_inputs` (the model fed only the kept tokens, from :func:`merged_embeddings`).
- :func:`tiny_tokenizer`, :func:`tiny_llava_processor`: a WordLevel ``PreTrainedTokenizerFast`` and a
  ``LlavaProcessor`` (``CLIPImageProcessor`` without torchvision) for end-to-end tests.
- :func:`record_hooks`: a snapshot of every hook dict of a model (to assert clean removal).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from vtprune.testing import models as kit_models
from vtprune.testing.models import finish_tiny
from vtprune.testing.models import tiny_clip_config, tiny_llama_config, tiny_text_values, tiny_vision_values

__all__ = [
    "keep_all_params",
    "IMAGE_TOKEN_ID",
    "PAD_ID",
    "VOCAB",
    "tiny_clip_config",
    "tiny_llama_config",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_llava_onevision",
    "tiny_video_llava",
    "two_scene_video_inputs",
    "llava_onevision_inputs",
    "llava_inputs",
    "llava_next_inputs",
    "left_pad",
    "tiny_tokenizer",
    "tiny_llava_processor",
    "tiny_clip_model",
    "save_tiny_clip",
    "record_hooks",
    "single_thread",
    "generation_positions",
    "PLACEMENT_RECIPES",
    "SignalRecorder",
    "NeedsCls",
    "forward_logits",
    "sample_alone",
    "check_forward_and_generate",
    "check_batch_equals_samples_alone",
]

VOCAB = 96
IMAGE_TOKEN_ID = 95
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_SIZE = 28
PATCH_SIZE = 7  # 4 x 4 = 16 patches per crop


# The tiny configs and the LLaVA / LLaVA-NeXT builders are the public kit's (`vtprune.testing.models`): one source
# for plugin authors and this suite. These wrappers keep the suite's argument order (attn, dtype, seed, layers).
_vision_values = tiny_vision_values
_text_values = tiny_text_values


def _finish(model, attn: str, dtype: torch.dtype):
    return finish_tiny(model, attn, PAD_ID, dtype)


def tiny_llava(attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 4, **text):
    """A random ``LlavaForConditionalGeneration``: 16 image tokens per image, 4 Llama layers (GQA 4/2)."""
    return kit_models.tiny_llava(seed=seed, layers=layers, attn=attn, dtype=dtype, **text)


def tiny_llava_next(attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 4, **text):
    """A random ``LlavaNextForConditionalGeneration`` with AnyRes pinpoints 28x56, 56x28, 56x56."""
    return kit_models.tiny_llava_next(seed=seed, layers=layers, attn=attn, dtype=dtype, **text)


def tiny_llava_onevision(
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: int = 4,
    video_token_id: int = 94,
    vision_aspect_ratio: str = "anyres_max_2",
    **text,
):
    """A random ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (16 patches per crop, no CLS), Qwen2
    decoder (GQA 4/2), AnyRes pinpoints 28x56, 56x28, 56x56, image tokens ``IMAGE_TOKEN_ID``, video tokens
    ``video_token_id``. ``anyres_max_2`` makes crop grids above ~2 crops of tokens bilinearly down-scaled (the
    56x56 pinpoint's 8x8 grid becomes 5x5), so both packing paths are exercised."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(**_vision_values(vision_use_head=False))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_values(**{"num_hidden_layers": layers, **text})),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration(config), attn, dtype)


def tiny_video_llava(attn: str = "sdpa", seed: int = 0, layers: int = 4, video_token_id: int = 94, **vision):
    """A random ``VideoLlavaForConditionalGeneration``: CLIP image and video towers (16 patches per image / frame,
    ``vision`` overrides the tower config, e.g. ``num_hidden_layers``), feature layer -2, ``layers`` Llama layers,
    image tokens ``IMAGE_TOKEN_ID``, video tokens ``video_token_id``."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    config = VideoLlavaConfig(
        vision_config=tiny_clip_config(**vision),
        text_config=tiny_llama_config(num_hidden_layers=layers),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=video_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return _finish(VideoLlavaForConditionalGeneration(config), attn, torch.float32)


def llava_onevision_inputs(
    model,
    items: Sequence[Sequence[tuple]] = ((("image", (56, 56)),), (("image", (30, 50)), ("image", (28, 28)))),
    question_lengths: Optional[Sequence[int]] = None,
    frames: int = 3,
    batch_num_images: bool = True,
    seed: int = 0,
    vision_aspect_ratio: Optional[str] = None,
):
    """Left-padded batch for ``tiny_llava_onevision``. ``items[i]`` lists sample i's images and videos in prompt
    order: ``("image", (height, width))`` or ``("video",)`` (``frames`` frames each). With ``batch_num_images``
    the batch carries it (as the processor does): the image of a one-image sample is cut into AnyRes crops, the
    images of a multi-image sample are one crop each; without it every image is cropped. Placeholder counts are
    the lengths of the model's own ``get_image_features`` / ``get_video_features`` outputs (not the adapter's);
    ``vision_aspect_ratio`` is handed to ``get_image_features`` (and must then be given to ``generate``)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    images = [[tuple(item[1]) for item in sample if item[0] == "image"] for sample in items]
    videos = sum(1 for sample in items for item in sample if item[0] == "video")
    flat_sizes = [s for sample in images for s in sample]
    numbers = torch.tensor([len(sample) for sample in images], dtype=torch.long)
    patched = [len(sample) == 1 or not batch_num_images for sample in images for _ in sample]
    crops = [
        image_size_to_num_patches(list(s), config.image_grid_pinpoints, size) if p else 1 for s, p in zip(flat_sizes, patched)
    ]
    out: dict = {}
    image_counts: list[int] = []
    video_counts: list[int] = []
    with torch.no_grad():
        if flat_sizes:
            pixel_values = torch.zeros(len(flat_sizes), max(crops), 3, size, size)
            for i, c in enumerate(crops):
                pixel_values[i, :c] = torch.randn(c, 3, size, size, generator=generator)
            out["pixel_values"] = pixel_values.to(model.dtype)
            out["image_sizes"] = torch.tensor(flat_sizes, dtype=torch.long)
            extra = {"vision_aspect_ratio": vision_aspect_ratio} if vision_aspect_ratio else {}
            if batch_num_images:
                out["batch_num_images"] = numbers
                extra["batch_num_images"] = numbers
            features = model.model.get_image_features(out["pixel_values"], out["image_sizes"], **extra).pooler_output
            image_counts = [int(f.shape[0]) for f in features]
        if videos:
            out["pixel_values_videos"] = torch.randn(videos, frames, 3, size, size, generator=generator).to(model.dtype)
            features = model.model.get_video_features(out["pixel_values_videos"]).pooler_output
            video_counts = [int(f.shape[0]) for f in features]
    question_lengths = question_lengths or [4 + i for i in range(len(items))]
    rows = []
    for i, (sample, q) in enumerate(zip(items, question_lengths)):
        gen = torch.Generator().manual_seed(seed + i)
        row = [BOS_ID] + torch.randint(3, 40, (3,), generator=gen).tolist()  # system prefix
        for j, item in enumerate(sample):
            if item[0] == "image":
                row += [IMAGE_TOKEN_ID] * image_counts.pop(0)
            else:
                row += [int(config.video_token_id)] * video_counts.pop(0)
            row += [10 + j]  # "\n"-like separator
        row += torch.randint(3, 90, (q,), generator=generator).tolist()
        row += [41, 42]  # "assistant" marker
        rows.append(row)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, **out}


def two_scene_video_inputs(question_lengths: Sequence[int] = (3, 6), frames: int = 6):
    """(model, inputs): the eager :func:`tiny_llava_onevision` and a batch of one video per sample whose ``frames``
    frames are two scenes of still frames (the first frame repeated 3 times, then the fourth frame), plus a little
    seeded noise, so temporal segments, static tokens and merging all happen."""
    model = tiny_llava_onevision(attn="eager")
    video = ((("video",),),) * len(question_lengths)
    inputs = llava_onevision_inputs(model, video, question_lengths=question_lengths, frames=frames)
    videos = inputs["pixel_values_videos"]  # (B, T, 3, S, S)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(5)) * 0.02
    scenes = [videos[:, :1].expand(-1, 3, -1, -1, -1), videos[:, 3:4].expand(-1, frames - 3, -1, -1, -1)]
    inputs["pixel_values_videos"] = (torch.cat(scenes, dim=1) + noise).contiguous()
    return model, inputs


def left_pad(rows: Sequence[Sequence[int]], pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with left padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row))
        mask[i, width - len(row) :] = 1
    return ids, mask


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` builds them (cumsum of the mask - 1, pads at 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _prompt(images: int, tokens_per_image: Sequence[int], question: Sequence[int], seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    row = [BOS_ID] + torch.randint(3, 40, (3,), generator=generator).tolist()  # system prefix
    for i in range(images):
        row += [IMAGE_TOKEN_ID] * tokens_per_image[i]
        row += [10 + i]  # "\n"-like separator
    row += list(question)
    row += [41, 42]  # "ASSISTANT:" marker
    return row


def llava_inputs(model, images_per_sample: Sequence[int] = (1,), question_lengths: Optional[Sequence[int]] = None, seed: int = 0):
    """Left-padded batch for ``tiny_llava``: sample i has ``images_per_sample[i]`` images and a question of
    ``question_lengths[i]`` tokens. Returns a dict for ``model(**inputs)`` / ``model.generate(**inputs)``."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    tokens = side * side
    question_lengths = question_lengths or [4 + i for i in range(len(images_per_sample))]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, (n, q) in enumerate(zip(images_per_sample, question_lengths)):
        question = torch.randint(3, 90, (q,), generator=generator).tolist()
        rows.append(_prompt(n, [tokens] * n, question, seed + i))
    ids, mask = left_pad(rows)
    total = sum(images_per_sample)
    pixel_values = torch.randn(total, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values.to(model.dtype)}


def llava_next_inputs(
    model,
    image_sizes: Sequence[Sequence[tuple[int, int]]] = (((30, 50),),),
    question_lengths: Optional[Sequence[int]] = None,
    seed: int = 0,
):
    """Left-padded batch for ``tiny_llava_next``: ``image_sizes[i]`` lists the (height, width) of sample i's
    images. Placeholder counts come from the model's own ``get_image_features`` (not from the adapter)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    flat_sizes = [s for sample in image_sizes for s in sample]
    crops = [
        image_size_to_num_patches(list(s), config.image_grid_pinpoints, config.vision_config.image_size) for s in flat_sizes
    ]
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixel_values = torch.zeros(len(flat_sizes), max(crops), 3, size, size)
    for i, c in enumerate(crops):
        pixel_values[i, :c] = torch.randn(c, 3, size, size, generator=generator)
    sizes_tensor = torch.tensor(flat_sizes, dtype=torch.long)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values.to(model.dtype), sizes_tensor).pooler_output
    counts = [int(f.shape[0]) for f in features]
    question_lengths = question_lengths or [4 + i for i in range(len(image_sizes))]
    rows, k = [], 0
    for i, (sample, q) in enumerate(zip(image_sizes, question_lengths)):
        question = torch.randint(3, 90, (q,), generator=generator).tolist()
        rows.append(_prompt(len(sample), counts[k : k + len(sample)], question, seed + i))
        k += len(sample)
    ids, mask = left_pad(rows)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values.to(model.dtype),
        "image_sizes": sizes_tensor,
    }


def tiny_tokenizer():
    """A WordLevel ``PreTrainedTokenizerFast`` over ``w3 .. w94`` plus specials and ``<image>`` (id 95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    for i in range(3, VOCAB - 1):
        vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_clip_model(vlm, text_positions: int = 8, seed: int = 0):
    """A random ``CLIPModel`` whose vision model IS ``vlm``'s vision tower (same config, weights copied), with a
    tiny text tower (vocabulary of :func:`tiny_tokenizer`, ``text_positions`` positions per segment so that long
    prompts give several CDPruner text segments) and random projection heads."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    vision = vlm.config.vision_config
    text = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=text_positions,
        projection_dim=vision.projection_dim,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    tower = vlm.model.vision_tower
    missing = clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return clip


def save_tiny_clip(vlm, directory, **kwargs) -> str:
    """:func:`tiny_clip_model` and :func:`tiny_tokenizer` saved with ``save_pretrained`` into ``directory``
    (loadable with ``CLIPModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``); returns the path."""
    path = str(directory)
    tiny_clip_model(vlm, **kwargs).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_llava_processor():
    """``LlavaProcessor`` = ``CLIPImageProcessor`` (28 px, no torchvision) + :func:`tiny_tokenizer`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def single_thread():
    """Generator for an autouse fixture: tiny matmuls are ~25x faster on one intra-op thread when the
    machine is busy (restores the previous setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def record_hooks(model) -> dict:
    """Every hook registered on every submodule: {(module name, hook dict name): tuple(hook ids)}."""
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    out = {}
    for module_name, module in model.named_modules():
        for attr in names:
            table = getattr(module, attr, None)
            if table:
                out[(module_name, attr)] = tuple(table.keys())
    return out


# --------------------------------------------------------------------------------------------------------
# Independent references (no vtprune code): masks and positions applied to the *unpruned* model
# --------------------------------------------------------------------------------------------------------


def lm_inputs_recorder(model):
    """A pre-hook recording the inputs_embeds the language model receives: (the list it appends to, the handle)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("inputs_embeds"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def removed_by_layer(result, batch: int, length: int, num_layers: int) -> list[torch.Tensor]:
    """(B, L) bool per decoder layer: original positions a pruned forward has removed before that layer,
    computed from ``handle.last_selection`` (a `PruneResult`)."""
    removed = [torch.zeros(batch, length, dtype=torch.bool) for _ in range(num_layers)]
    for record in result.drops:
        for r, positions in enumerate(result.image_positions):
            kept = positions[record.selection.row_indices(r).cpu()]
            gone = positions[~torch.isin(positions, kept)]
            b = int(result.image_sample[r])
            for layer in range(record.layer, num_layers):
                removed[layer][b, gone] = True
    return removed


class masked_reference:
    """Context manager: forward pre-hooks on the decoder layers of an *unpruned* model that mask the removed
    positions out of attention for each layer (a 4-D mask built here from the layer's own mask), and for
    ``positions="compact"`` give those layers rotary embeddings of renumbered positions (original position
    minus removed tokens before it; new tokens minus all removed). Works for prefill and decoding."""

    def __init__(self, model, removed: list[torch.Tensor], positions: str = "keep"):
        vlm = model.model
        self.stack = vlm.language_model if hasattr(vlm, "language_model") else vlm.text_model  # Idefics3: text_model
        self.removed = removed
        self.positions = positions
        self.handles = []

    def __enter__(self):
        eager = self.stack.config._attn_implementation == "eager"
        for number, layer in enumerate(self.stack.layers):
            rem = self.removed[number]
            if not bool(rem.any()):
                continue
            self.handles.append(layer.register_forward_pre_hook(self._hook(number, rem, eager), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, number, rem, eager):
        length = rem.shape[1]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, q_len = hidden.shape[:2]
            mask = kwargs.get("attention_mask")
            cache = kwargs.get("cache")
            if mask is None:
                past = cache.get_seq_length(number) if cache is not None else 0
                kv = past + q_len
                allowed = torch.ones(q_len, kv, dtype=torch.bool).tril(kv - q_len)[None, None].expand(batch, 1, -1, -1)
            elif mask.dtype == torch.bool:
                allowed = mask.expand(batch, -1, -1, -1)
            else:
                allowed = (mask == 0).expand(batch, -1, -1, -1)
            kv = allowed.shape[-1]
            # a sliding-window cache layer holds only the last kv positions: key j is position start + j
            start = 0
            if cache is not None and q_len < length:
                start = max(cache.get_seq_length(number) + q_len - kv, 0)
            keys = torch.ones(batch, kv, dtype=torch.bool)
            span = rem[:, start : start + kv]
            keys[:, : span.shape[1]] = ~span
            allowed = allowed & keys[:, None, None, :]
            kwargs = dict(kwargs)
            if eager:
                kwargs["attention_mask"] = torch.where(
                    allowed, torch.zeros((), dtype=hidden.dtype), torch.finfo(hidden.dtype).min
                )
            else:
                kwargs["attention_mask"] = allowed
            if self.positions == "compact":
                pos = kwargs["position_ids"].expand(batch, -1)
                if q_len == length:
                    shift = rem.long().cumsum(1)
                else:
                    shift = rem.long().sum(1, keepdim=True)
                kwargs["position_embeddings"] = self.stack.rotary_emb(hidden, pos - shift)
            return args, kwargs

        return hook


def merged_embeddings(model, inputs) -> torch.Tensor:
    """The decoder input embeddings of ``inputs`` (text embeddings with the image features, and LLaVA-OneVision's
    video features, scattered in), computed with the model's own public methods."""
    vlm = model.model
    ids = inputs["input_ids"]
    embeds = vlm.get_input_embeddings()(ids)
    if inputs.get("pixel_values") is not None:
        extra = {name: inputs[name] for name in ("image_sizes", "batch_num_images") if inputs.get(name) is not None}
        features = vlm.get_image_features(inputs["pixel_values"], **extra).pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.cat(list(features), dim=0).to(embeds.dtype))
    if inputs.get("pixel_values_videos") is not None:
        features = vlm.get_video_features(inputs["pixel_values_videos"]).pooler_output
        mask = (ids == model.config.video_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.flatten(0, 1).to(embeds.dtype))
    return embeds


def kept_only_inputs(model, inputs, removed: torch.Tensor) -> dict:
    """``inputs_embeds`` / ``attention_mask`` / ``position_ids`` of only the kept tokens (left padded), for
    the "model fed only the kept tokens" reference of ``positions="compact"``."""
    with torch.no_grad():
        embeds = merged_embeddings(model, inputs)
    real = inputs["attention_mask"].bool() & ~removed
    rows = [embeds[b, real[b]] for b in range(embeds.shape[0])]
    width = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, embeds.shape[-1], dtype=embeds.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, width - r.shape[0] :] = r
        mask[b, width - r.shape[0] :] = 1
    return {"inputs_embeds": out, "attention_mask": mask, "position_ids": generation_positions(mask)}


def aligned(pruned_logits, result, reference_logits, attention_mask):
    """(pruned, reference) logits at every real kept slot of the pruned output (``keep`` references are
    aligned through ``result.sequence_index``)."""
    index, valid = result.sequence_index, result.sequence_mask
    real = attention_mask.bool().gather(1, index) & valid
    ref = reference_logits.gather(1, index.unsqueeze(-1).expand(-1, -1, reference_logits.shape[-1]))
    return pruned_logits[real], ref[real]


def sample_alone(inputs, b: int, first: int, count: int) -> dict:
    """Sample ``b`` of a left-padded batch on its own (padding removed), with its ``count`` images: those from
    image ``first`` on (``pixel_values`` and, when the batch has them, ``image_sizes``)."""
    real = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, real], "attention_mask": inputs["attention_mask"][b : b + 1, real]}
    if count:
        for key in ("pixel_values", "image_sizes"):
            if key in inputs:
                out[key] = inputs[key][first : first + count]
    return out


def forward_logits(model, inputs, **extra) -> torch.Tensor:
    """``model(**inputs, **extra).logits`` without autograd."""
    with torch.no_grad():
        return model(**inputs, **extra).logits


# --------------------------------------------------------------------------------------------------------
# Checks shared by the LLaVA-family adapter tests (they prune with vtprune, then compare with the references)
# --------------------------------------------------------------------------------------------------------


def check_forward_and_generate(model, inputs, recipe, positions: str, kept_only: bool, budget=6, atol: float = 1e-5):
    """A pruned forward (given ``generate``'s position ids) and 8 greedy tokens equal the independent references:
    with ``kept_only`` (``compact`` after a drop at the decoder input) the model fed only the kept tokens
    (:func:`kept_only_inputs`), else the unpruned model under :func:`masked_reference`; the last layer's KV cache
    holds only the kept slots. Returns the `PruneResult` of the forward."""
    from vtprune.framework.prune import prune

    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, recipe, budget=budget, positions=positions) as handle:
        out = forward_logits(model, feed)
        result = handle.last_selection
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(handle.last_selection.selection.indices, result.selection.indices)
    batch, length = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    removed = removed_by_layer(result, batch, length, layers)
    last = layers - 1
    assert generated.cache.layers[last].keys.shape[-2] == int((~removed[last]).sum(1).max()) + 7
    new_tokens = generated.sequences[:, length:]
    if kept_only:
        reference_inputs = kept_only_inputs(model, inputs, removed[0])
        reference = forward_logits(model, reference_inputs)
        real = result.sequence_mask & inputs["attention_mask"].bool().gather(1, result.sequence_index)
        torch.testing.assert_close(out[real], reference[reference_inputs["attention_mask"].bool()], atol=atol, rtol=0)
        reference_inputs.pop("position_ids")
        ref_gen = model.generate(**reference_inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(new_tokens, ref_gen[:, -8:])
    else:
        with masked_reference(model, removed, positions):
            reference = forward_logits(model, feed)
            ref_gen = model.generate(**feed, max_new_tokens=8, do_sample=False)
        got, want = aligned(out, result, reference, inputs["attention_mask"])
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        assert torch.equal(new_tokens, ref_gen[:, length:])
    return result


def check_batch_equals_samples_alone(model, inputs, recipe, positions: str, budgets, alone, atol: float = 1e-5):
    """A left-padded batch pruned with per-image ``budgets`` equals each sample alone (its logits and 4 greedy
    tokens); ``alone[b]`` is (sample b's unpadded inputs, its images' budgets)."""
    from vtprune.framework.prune import prune

    feed = {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}
    with prune(model, recipe, budget=budgets, positions=positions) as handle:
        out = forward_logits(model, feed)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for b, (sample, sample_budgets) in enumerate(alone):
            handle.budget = sample_budgets
            single = forward_logits(model, sample)
            single_gen = model.generate(**sample, max_new_tokens=4, do_sample=False)
            torch.testing.assert_close(out[b, -single.shape[1] :], single[0], atol=atol, rtol=0)
            assert torch.equal(gen[b, -4:], single_gen[0, -4:])


#: One recipe per placement that the adapter tests run (signals each placement provides).
PLACEMENT_RECIPES = {
    "pre_llm": "prompt_cosine+critical+fps+pre_llm",
    "vision": "random+critical+fps+vision",
    "layer": "attention+critical+fps+layer(k=2)",
    "schedule": "attention+critical+fps+schedule(layers=[1,3],ratio=0.5)",
}


class SignalRecorder:
    """Wraps a composed pipeline and records the `Signals` of every drop; everything else (stages,
    budget, placement, adapter hints) stays visible through attribute access."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.seen = []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def select(self, signals, budget):
        self.seen.append(signals)
        return self.pipeline.select(signals, budget)


class NeedsCls:
    """A duck-typed pipeline at ``placement`` that requires ``cls_attention``: attaching it to an adapter whose
    vision tower has no CLS token must fail (so it never selects)."""

    requires = frozenset({"visual", "cls_attention"})

    def __init__(self, placement):
        self.placement = placement

    def select(self, signals, budget):  # pragma: no cover - never reached
        raise AssertionError


#: (stage name, parameter) -> the value at which a stage that prunes or merges beyond the budget keeps every token:
#: a schedule's later-drop ``ratio``, an in-LLM step's ``keep`` (HoliTom) / ``alpha`` (PruneVid), DyCoke's decode
#: ``prune_ratio``, PruneVid's merging (no token is static above a cosine threshold of 1; one cluster per token).
_KEEP_ALL_VALUES = {
    ("schedule", "ratio"): 1.0,
    ("fitprune", "deletions"): (),  # no recipe deletions: only the first drop, which the covering budget keeps whole
    ("pre_llm_layer", "keep"): 1.0,
    ("prunevid_layer", "alpha"): 1.0,
    ("decode", "prune_ratio"): 0.0,
    ("prunevid", "tau"): 1.0,
    ("prunevid", "cluster_ratio"): 1.0,
}


def keep_all_params(pipeline) -> dict:
    """The parameter overrides (for ``framework.prune(..., **params)``) that make every stage of ``pipeline`` keep every
    token, so that a budget covering every token must reproduce the unpruned model bit for bit."""
    from vtprune.framework.stages import stage_params

    out = {}
    for kind in ("relevance", "critical", "diversity", "budget", "placement"):
        stage = getattr(pipeline, kind)
        for spec in stage_params(type(stage)):
            value = _KEEP_ALL_VALUES.get((stage.name, spec.name))
            if value is not None:
                out[spec.name] = value
    return out
