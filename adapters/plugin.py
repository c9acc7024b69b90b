"""Built-in adapters, registered through the ``vtprune_register_adapters`` hook."""

from __future__ import annotations

import pluggy

from .gemma3 import Gemma3Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mistral3 import Mistral3Adapter
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter

__all__ = ["BUILTIN_ADAPTERS", "vtprune_register_adapters"]

hookimpl = pluggy.HookimplMarker("vtprune")

#: Adapters of this package, in registration order.
BUILTIN_ADAPTERS: tuple[type, ...] = (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, LlavaOnevisionAdapter, Qwen3VLAdapter)
BUILTIN_ADAPTERS += (Mistral3Adapter,)
BUILTIN_ADAPTERS += (Gemma3Adapter,)


@hookimpl
def vtprune_register_adapters(registry):
    for adapter in BUILTIN_ADAPTERS:
        registry.add_adapter(adapter)
