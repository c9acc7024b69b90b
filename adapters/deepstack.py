"""Qwen3-VL DeepStack under pruning: the feed handed to the text model (`DeepstackFeed`) and the hooks that
install it (`DeepstackHooks`, an `Extension` of the Qwen3-VL description).

The vision tower also returns features of intermediate vision layers, and ``Qwen3VLTextModel`` adds the i-th of
them to the visual tokens' hidden states after decoder layer i (``hidden[visual_pos_masks] +=
deepstack_visual_embeds[i]``, in ``_deepstack_process``). A forward pre-hook on that one text model (after the
decoder machinery's, so a drop at the decoder input has happened) replaces the two keyword arguments by the mask
and rows of the sequence the stack actually runs on, in a `DeepstackFeed` whose ``len()`` stops at the first
``layer(k)`` drop: the model adds the features of the layers before it itself. For a DeepStack layer i >= k, a
forward hook on layer i adds them to the kept visual slots with the model's own ``_deepstack_process``. A kept
token keeps receiving exactly its own features, a dropped one nothing; no tensor is modified in place.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence as SequenceABC
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from vtprune.framework.errors import VtpruneError

from .decoder import Session
from .description import Extension

__all__ = ["DeepstackFeed", "DeepstackHooks"]


class DeepstackFeed(SequenceABC):
    """The ``deepstack_visual_embeds`` a pruned prefill gives ``Qwen3VLTextModel``, with the matching
    ``visual_pos_masks`` (`mask`).

    Built from the model's own mask (B, L) and features (one (n_visual, D) tensor per DeepStack layer, rows in
    row-major order of the mask) and the decoder machinery's `Session` of the prefill in flight, whose segments
    grow as drops happen. Nothing is ever modified in place (neither the model's tensors nor this object's).

    - `mask` and the items are those of **segment 0**, the sequence the stack runs on before any ``layer(k)`` drop
      (compacted by a ``pre_llm`` / ``vision`` drop): the visual slots, and the rows of the visual tokens present.
      Without a drop at the input they are the model's own mask and tensors (a keep-all forward is bit-identical).
    - ``len()`` is what the text model reads after every layer to decide whether it adds DeepStack features: the
      number of DeepStack layers, cut at the first ``layer(k)`` drop once it has happened. So the model adds the
      features of layer i itself exactly while layer i runs on segment 0.
    - `after_layer` gives the (mask, rows) of a DeepStack layer that runs on a later segment (after a ``layer(k)``
      drop with k inside the DeepStack layers): the adapter adds them with the model's own ``_deepstack_process``
      from a forward hook on that layer. Reading an item of a later segment raises (a text model that read the
      length once would otherwise add the wrong rows).
    """

    def __init__(self, mask: Tensor, features: Sequence[Tensor], session: Session):
        self._full = mask.bool()  # (B, L) in the stack input's (original) coordinates
        self._features = list(features)
        self._session = session
        flat = self._full.flatten().long()
        self._rank = (flat.cumsum(0) - 1).view_as(self._full)  # (B, L) feature row of each visual position
        self._states: dict[int, tuple[Tensor, Optional[Tensor]]] = {}
        present, rows = self._state(0)
        self.mask = mask if rows is None else present

    def _state(self, number: int) -> tuple[Tensor, Optional[Tensor]]:
        """(visual slots (B, Ls) bool, feature rows, None for all of them) of segment ``number``."""
        if number not in self._states:
            segment = self._session.segments[number]
            index = segment.index.to(self._full.device)
            present = self._full.gather(1, index) & segment.valid.to(self._full.device)
            rows = self._rank.gather(1, index)[present]
            identity = present.shape == self._full.shape and torch.equal(present, self._full)
            self._states[number] = (present, None if identity else rows)
        return self._states[number]

    def _rows(self, layer: int, number: int) -> Tensor:
        feature = self._features[layer]
        rows = self._state(number)[1]
        return feature if rows is None else feature.index_select(0, rows.to(feature.device))

    def __len__(self) -> int:
        segments = self._session.segments
        return min(len(self._features), segments[1].start) if len(segments) > 1 else len(self._features)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self._features))[layer]]
        layer = operator.index(layer)
        layer = layer + len(self._features) if layer < 0 else layer
        if self._session.segment_of(layer) != 0:
            raise RuntimeError(
                f"DeepStack features of layer {layer} were read by the text model after a drop before layer "
                f"{self._session.segments[1].start}; this transformers version is not supported by the qwen3_vl adapter"
            )
        return self._rows(layer, 0)

    def after_layer(self, layer: int) -> Optional[tuple[Tensor, Tensor]]:
        """(visual slots (B, Ls), features (n, D)) to add after ``layer`` when it runs on a segment after a drop;
        None when the model adds them itself (segment 0) or the layer has no DeepStack features."""
        if layer >= len(self._features):
            return None
        number = self._session.segment_of(layer)
        if number == 0:
            return None
        return self._state(number)[0], self._rows(layer, number)


class DeepstackHooks(Extension):
    """A forward pre-hook on the text model (after the decoder machinery's) that hands it a `DeepstackFeed` and
    its mask during a pruned prefill, a forward hook that releases it, and forward hooks on the DeepStack layers
    that add their features after a ``layer(k)`` drop.

    Args:
        name: the adapter name (for errors); model_name: the model class name.
        stack: ``Qwen3VLTextModel``; layers: how many decoder layers receive DeepStack features.
    """

    def __init__(self, name: str, model_name: str, stack: nn.Module, layers: int):
        self.name, self.model_name, self.stack, self.layers = name, model_name, stack, layers
        self.runtime: Any = None
        self._feeds: list[Optional[DeepstackFeed]] = []

    def install(self, runtime: Any) -> list:
        stack = self.stack
        if self.layers and not callable(getattr(stack, "_deepstack_process", None)):
            raise VtpruneError(
                f"{self.model_name} (adapter {self.name!r}): {type(stack).__name__} has no "
                "_deepstack_process; DeepStack features cannot be pruned with this transformers version"
            )
        self.runtime = runtime
        handles = [
            stack.register_forward_pre_hook(self._pre, with_kwargs=True),
            stack.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]
        for number, layer in enumerate(list(stack.layers)[: self.layers]):
            handles.append(layer.register_forward_hook(self._layer_hook(number)))
        return handles

    def remove(self) -> None:
        self._feeds.clear()

    def _pre(self, module, args, kwargs):
        """Runs after the decoder machinery's stack pre-hook (a drop at the decoder input has happened)."""
        session = self.runtime.decoder.prefill_session
        mask, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if session is None or mask is None or features is None or len(features) == 0:
            self._feeds.append(None)
            return None
        if tuple(mask.shape) != (session.segments[0].index.shape[0], session.length):
            self._feeds.append(None)
            raise RuntimeError(
                f"{self.name}: visual_pos_masks has shape {tuple(mask.shape)}, the prefill has "
                f"{session.length} tokens; DeepStack features cannot be aligned with the pruned sequence"
            )
        feed = DeepstackFeed(mask, features, session)
        self._feeds.append(feed)
        kwargs = dict(kwargs)
        kwargs["visual_pos_masks"] = feed.mask
        kwargs["deepstack_visual_embeds"] = feed
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        if self._feeds:
            self._feeds.pop()
        return None

    def _layer_hook(self, number: int):
        """Forward hook of DeepStack layer ``number``: after a drop at a layer <= ``number``, add its features to
        the kept visual tokens (the text model adds them itself only on the undropped sequence)."""

        def hook(module, args, output):
            feed = self._feeds[-1] if self._feeds else None
            extra = feed.after_layer(number) if feed is not None else None
            if extra is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self.stack._deepstack_process(hidden, *extra)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook
