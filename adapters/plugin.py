"""Built-in adapters, registered through the ``vtprune_register_adapters`` hook."""

from __future__ import annotations

import pluggy

from .generic import GenericAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter
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
    LlavaNextVideoAdapter,
    VideoLlavaAdapter,
    GenericAdapter,
)


@hookimpl
def vtprune_register_adapters(registry):
    for adapter in BUILTIN_ADAPTERS:
        registry.add_adapter(adapter)
