"""Word-level tokenizer and ``LlavaProcessor`` for the model organism.

Contract
--------
* ``build_tokenizer()`` returns a real ``PreTrainedTokenizerFast`` (``tokenizers``
  WordLevel model, whitespace pre-tokenizer) over the task vocabulary with the special
  tokens ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, ``<image>``=4; it prepends
  ``<s>`` to every encoded text and pads on the left (ready for batched generation).
* ``build_processor()`` returns a ``LlavaProcessor`` whose image processor is the
  torchvision-free ``CLIPImageProcessorPil`` (no resize/crop: images are already
  ``IMAGE_SIZE`` square; rescale to [0, 1] then normalise with ``IMAGE_MEAN``/``IMAGE_STD``).
  LLaVA-1.5 conventions: ``vision_feature_select_strategy="default"`` (the CLS token is
  dropped), ``num_additional_image_tokens=1``, so one ``<image>`` in the prompt expands
  to ``(IMAGE_SIZE // PATCH) ** 2`` = 64 image tokens, one per patch, row-major.
* Prompt format (single turn): ``"USER: <image> {question} ASSISTANT:"``; the target
  is ``" {answer} </s>"``. Multi-turn training sequences continue with
  ``" USER: {question} ASSISTANT: {answer} </s>"``. ``build_prompt`` and the chat
  template produce the same string.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .task import IMAGE_SIZE, PATCH, vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %} {% endif %}USER:"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} <image>{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} ASSISTANT:"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %} </s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_prompt(question: str) -> str:
    """The single-turn prompt for ``question`` (one ``<image>`` placeholder)."""
    return f"USER: {IMAGE_TOKEN} {question} ASSISTANT:"


def word_level_tokenizer(
    words: Sequence[str], extra_words: Sequence[str], extra_special_tokens: dict[str, str]
) -> PreTrainedTokenizerFast:
    """The organisms' word-level tokenizer (whitespace pre-tokenizer, ``<s>`` prepended, left padding) over
    ``words`` then ``extra_words`` (ids in that order). ``extra_words`` (new words not already in ``words``, each
    once) get ids after every existing one, so the shipped weights' ids do not move (a model that knows them needs
    its embeddings grown to match). ``words`` must hold ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``."""
    base = list(words)
    vocab = {tok: i for i, tok in enumerate(base + [w for w in dict.fromkeys(extra_words) if w not in base])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=dict(extra_special_tokens),
        padding_side="left",
        model_max_length=512,
    )


def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``SPECIAL_TOKENS + vocabulary()`` then ``extra_words`` (`word_level_tokenizer`)."""
    return word_level_tokenizer(list(SPECIAL_TOKENS) + vocabulary(), extra_words, {"image_token": IMAGE_TOKEN})


# CLIP's mean with a tighter std: scaling the inputs up ~3x (equivalent to a larger
# learning rate for the patch embedding) made shape features emerge much sooner.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.09, 0.09, 0.09)


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP-style normalisation for ``IMAGE_SIZE`` square uint8 images, no resize or crop."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return CLIPImageProcessorPil(
        do_resize=False, size=size, do_center_crop=False, crop_size=size, do_convert_rgb=True,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )


def build_processor(extra_words: Sequence[str] = ()) -> LlavaProcessor:
    """The organism's ``LlavaProcessor`` (tokenizer + image processor + chat template); see ``build_tokenizer``."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(extra_words),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
