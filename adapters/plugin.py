"""Built-in adapters, registered through the ``vtprune_register_adapters`` hook."""

from __future__ import annotations

import pluggy

from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

hookimpl = pluggy.HookimplMarker("vtprune")

#: Adapters of this package.
BUILTIN_ADAPTERS: tuple[type, ...] = (LlavaAdapter, LlavaNextAdapter)

try:  # the Qwen2-VL adapter lives in its own module (separate owner); registered here once it is complete
    from .qwen2_vl import QwenVLAdapter as _Qwen
except ImportError:  # pragma: no cover
    _Qwen = None
if _Qwen is not None and all(hasattr(_Qwen, a) for a in ("name", "model_classes", "placements", "provides")):
    BUILTIN_ADAPTERS = BUILTIN_ADAPTERS + (_Qwen,)

try:  # the LLaVA-OneVision adapter lives in its own module (separate owner); registered here once it is complete
    from .llava_onevision import LlavaOnevisionAdapter as _Onevision
except ImportError:  # pragma: no cover
    _Onevision = None
if _Onevision is not None and all(hasattr(_Onevision, a) for a in ("name", "model_classes", "placements", "provides")):
    BUILTIN_ADAPTERS = BUILTIN_ADAPTERS + (_Onevision,)

try:  # the Qwen3-VL adapter lives in its own module (separate owner); registered here once it is complete
    from .qwen3_vl import Qwen3VLAdapter as _Qwen3
except ImportError:  # pragma: no cover
    _Qwen3 = None
if _Qwen3 is not None and all(hasattr(_Qwen3, a) for a in ("name", "model_classes", "placements", "provides")):
    BUILTIN_ADAPTERS = BUILTIN_ADAPTERS + (_Qwen3,)


@hookimpl
def vtprune_register_adapters(registry):
    for adapter in BUILTIN_ADAPTERS:
        registry.add_adapter(adapter)
