"""Built-in adapters, registered through the ``vtprune_register_adapters`` hook."""

from __future__ import annotations

import pluggy

from .gemma3 import Gemma3Adapter
from .generic import GenericAdapter
from .glm4v import Glm4vAdapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .llava_onevision1_5 import LlavaOnevision15Adapter
from .mistral3 import Mistral3Adapter
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen3_vl_moe import Qwen3VLMoeAdapter
from .video_llava import VideoLlavaAdapter

__all__ = ["BUILTIN_ADAPTERS", "vtprune_register_adapters"]

hookimpl = pluggy.HookimplMarker("vtprune")

#: Adapters of this package, in registration order (the generic adapter, a fallback consulted only when no
#: adapter's ``model_classes`` names the model's class, comes last).
BUILTIN_ADAPTERS: tuple[type, ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    QwenVLAdapter,
    LlavaOnevisionAdapter,
    Qwen3VLAdapter,
    Qwen3VLMoeAdapter,
    LlavaOnevision15Adapter,
    Glm4vAdapter,
    InternVLAdapter,
    Idefics3Adapter,
    SmolVLMAdapter,
    Mistral3Adapter,
    Gemma3Adapter,
    LlavaNextVideoAdapter,
    VideoLlavaAdapter,
    GenericAdapter,
)


@hookimpl
def vtprune_register_adapters(registry):
    for adapter in BUILTIN_ADAPTERS:
        registry.add_adapter(adapter)
