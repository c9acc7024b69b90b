"""Word-level tokenizer and ``Qwen2VLProcessor`` for the Qwen2-VL model organism.

Contract
--------
* ``QWEN_SPECIAL_TOKENS``: the LLaVA organism's special tokens, then (after the task words) the Qwen2-VL
  vision tokens ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``. The first
  ``len(SPECIAL_TOKENS) + len(vocabulary())`` ids are exactly the LLaVA organism's ids, so its word
  embeddings can initialise this model (``qwen_model.init_text_from_llava``).
* ``build_qwen_tokenizer()`` is a real ``PreTrainedTokenizerFast`` (WordLevel, whitespace split, ``<s>``
  prepended, left padding) with ``image_token`` / ``video_token`` / ``vision_*_token`` attributes.
* ``build_qwen_image_processor()`` is the torchvision-free ``Qwen2VLImageProcessorPil``: patch 14, temporal
  patch 2, merge 2, ``min_pixels = max_pixels = QWEN_IMAGE_SIZE ** 2`` so every ``IMAGE_SIZE`` scene is
  resized (bicubic) to ``QWEN_IMAGE_SIZE`` square = 16 x 16 patches = 8 x 8 merged tokens; each merged
  token covers exactly one ``PATCH`` x ``PATCH`` patch of the scene, so ``Sample.patch_labels`` index the
  visual tokens (row-major) as for the LLaVA organism. Normalisation as the LLaVA organism.
* ``build_qwen_processor()`` -> ``ImageOnlyQwen2VLProcessor``: a ``Qwen2VLProcessor`` (subclass) without a
  video processor. transformers' video processors need torchvision, and ``Qwen2VLProcessor.__init__`` checks
  its ``video_processor`` argument against a torchvision-only base class even when it is ``None``, so the
  stock class cannot be built on a torchvision-free install; the subclass only drops that argument (its
  ``processor_class`` is saved as ``Qwen2VLProcessor`` so tools with torchvision load the stock class). One
  ``<|image_pad|>`` in the prompt expands to ``QWEN_IMAGE_TOKENS`` = 64 tokens.
* Prompt (single turn): ``"USER: <|vision_start|> <|image_pad|> <|vision_end|> {question} ASSISTANT:"``.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessorPil, Qwen2VLProcessor

from .processor import IMAGE_MEAN, IMAGE_STD, SPECIAL_TOKENS, word_level_tokenizer
from .task import IMAGE_SIZE, PATCH, vocabulary

__all__ = [
    "QWEN_IMAGE_SIZE", "QWEN_IMAGE_TOKENS", "QWEN_MERGE", "QWEN_PATCH", "QWEN_TEMPORAL_PATCH",
    "QWEN_VISION_TOKENS", "IMAGE_PAD", "ImageOnlyQwen2VLProcessor", "VIDEO_PAD", "VISION_END", "VISION_START", "build_qwen_image_processor",
    "build_qwen_processor", "build_qwen_prompt", "build_qwen_tokenizer", "qwen_vocabulary",
]

QWEN_PATCH = 14
QWEN_MERGE = 2
QWEN_TEMPORAL_PATCH = 2
# one merged token (QWEN_MERGE x QWEN_PATCH px) per PATCH x PATCH patch of the IMAGE_SIZE scene
QWEN_IMAGE_SIZE = (IMAGE_SIZE // PATCH) * QWEN_MERGE * QWEN_PATCH  # 224
QWEN_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
QWEN_VISION_TOKENS: tuple[str, ...] = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %} {% endif %}USER:"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} <|vision_start|> <|image_pad|> <|vision_end|>"
    "{% elif item['type'] == 'video' %} <|vision_start|> <|video_pad|> <|vision_end|>"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} ASSISTANT:"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %} </s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def qwen_vocabulary() -> list[str]:
    """All tokens in id order: LLaVA organism specials, task words, Qwen2-VL vision tokens."""
    return list(SPECIAL_TOKENS) + vocabulary() + list(QWEN_VISION_TOKENS)


def build_qwen_prompt(question: str) -> str:
    """The single-turn prompt for ``question`` (one image placeholder between the vision markers)."""
    return f"USER: {VISION_START} {IMAGE_PAD} {VISION_END} {question} ASSISTANT:"


def build_qwen_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``qwen_vocabulary()`` then ``extra_words`` (ids in that order; the video
    organism's new words, ``qwen_video``)."""
    return word_level_tokenizer(qwen_vocabulary(), extra_words, {
        "image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
        "vision_start_token": VISION_START, "vision_end_token": VISION_END,
    })


def build_qwen_image_processor() -> Qwen2VLImageProcessorPil:
    """Resize (bicubic) every image to ``QWEN_IMAGE_SIZE`` square, normalise, cut into 14 px patches."""
    pixels = QWEN_IMAGE_SIZE * QWEN_IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH,
        merge_size=QWEN_MERGE, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (no ``video_processor``; see the module docstring)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        # what Qwen2VLProcessor.__init__ sets, without passing a video processor to ProcessorMixin
        self.image_token = getattr(tokenizer, "image_token", IMAGE_PAD)
        self.video_token = getattr(tokenizer, "video_token", VIDEO_PAD)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        """As the stock processor's (``processor_class`` = ``Qwen2VLProcessor``)."""
        out = super().to_dict()
        out["processor_class"] = Qwen2VLProcessor.__name__
        return out


def build_qwen_processor() -> ImageOnlyQwen2VLProcessor:
    """The Qwen2-VL organism's processor (tokenizer + image processor + chat template; no videos)."""
    return ImageOnlyQwen2VLProcessor(
        image_processor=build_qwen_image_processor(), tokenizer=build_qwen_tokenizer(), chat_template=CHAT_TEMPLATE
    )
