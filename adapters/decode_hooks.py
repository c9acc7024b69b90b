"""Decode-time KV-cache pruning (placement ``decode``): hooks that hide visual cache entries at every decoding step.

The prefill runs as the wrapped prefill placement says (``adapters.decoder.DecoderPruner``). These hooks, added
after the pruner's so they see the masks and position embeddings it rewrote, then act on every later stack
forward that continues a cache they saw filled:

1. stack pre-hook at the prefill (empty cache): remember the image placeholders of the forward in flight;
   stack forward hook: store, per returned cache object (``WeakKeyDictionary``), a `_CacheState` with the
   image mask in original coordinates and the pruner's `Session` (which original position each cache slot of
   each layer holds), and the `PruneResult` whose ``decode_records`` the steps append to.
2. decoding step, pre-hook of layer ``layer - 1`` (policy ``attention``): the current (last) token's softmax
   attention over that layer's cache entries plus itself, recomputed as eager attention does (fp32 softmax,
   under the layer's own mask and the entries hidden for this step), head mean, ranks the visual entries
   still present; each row keeps its top ``keep`` (`framework.budget.resolve_budget`, counted on the visual
   entries the row had after prefill), ties to the earlier entry. Policy ``dycoke``: the same ranking, the count
   ``int(n * (1 - prune_ratio))``, and a row hides nothing at a step whose attention (original positions) has a
   cosine >= ``threshold`` with its previous step's (DyCoke's ``dycoke_pruning``). Policy ``final``: the kept set is the
   prefill's last segment (MustDrop's decode stage).
3. pre-hooks of layers ``>= layer``: their attention mask is ANDed with "not a hidden visual entry" (4-D bool
   under sdpa, additive under eager), so exactly those cache entries are invisible to this step's token.

Nothing is deleted from the cache (the prefill's own compaction is the pruner's); ``mode="evict"`` never lets a
hidden entry back, which is the same attention as deleting it. Each step appends a `DecodeRecord` (original
positions hidden, per batch row). Limitations: Llama-style layers (``q_proj`` / ``k_proj``, ``DecoderSpec``),
dynamic caches, ``eager`` / ``sdpa`` attention (not flash: its masks are 2-D).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vtprune.framework.budget import resolve_budget
from vtprune.framework.errors import VtpruneError

from .decoder_spec import DecoderSpec, _to_additive
from .records import DecodeRecord
from .segments import Session

__all__ = ["DecodeHooks", "decode_policy_of"]

_SUPPORTED_ATTENTION = ("eager", "sdpa")


def decode_policy_of(placement: Any) -> Optional[Any]:
    """The placement itself when it carries a decode policy (``policy`` / ``keep`` / ``layer`` / ``mode``), else None."""
    if getattr(placement, "name", None) == "decode" and hasattr(placement, "policy"):
        return placement
    return None


@dataclass
class _CacheState:
    """What a continued cache needs: image positions, the prefill session, the record sink, evict state."""

    image: Tensor  # (B, L) bool, original coordinates
    session: Optional[Session]
    result: Any
    length: int
    alive: Optional[Tensor] = None  # (B, L) bool: visual positions not evicted (mode "evict")
    steps: int = 0
    previous: Optional[Tensor] = None  # (B, L) float: last step's attention at the original positions (policy "dycoke")


@dataclass
class _Step:
    """One decoding step in flight."""

    state: _CacheState
    cache: Any
    hidden_orig: Optional[Tensor] = None  # (B, L) bool: original positions hidden from layers >= layer


def _scatter_positions(index: Tensor, flags: Tensor, length: int) -> Tensor:
    """(B, length) bool: True at the original positions ``index[b, j]`` (B, S) where ``flags[b, j]``."""
    batch = index.shape[0]
    out = torch.zeros(batch, length + 1, dtype=torch.bool, device=index.device)  # last column: sink for unflagged
    out.scatter_(1, torch.where(flags, index, length), True)
    return out[:, :length]


class DecodeHooks:
    """Installs the decode-policy hooks of one attachment (see the module docstring)."""

    def __init__(self, attachment: Any, spec: DecoderSpec, placement: Any):
        impl = getattr(spec.config, "_attn_implementation", "eager") or "eager"
        if impl not in _SUPPORTED_ATTENTION:
            raise VtpruneError(f"placement 'decode' needs attn_implementation in {_SUPPORTED_ATTENTION}, got {impl!r}")
        if placement.layer >= len(spec.layers):
            raise VtpruneError(f"decode layer={placement.layer} but the decoder has {len(spec.layers)} layers")
        self.attachment = attachment
        self.spec = spec
        self.placement = placement
        self.eager = impl == "eager"
        self.states: "weakref.WeakKeyDictionary[Any, _CacheState]" = weakref.WeakKeyDictionary()
        self._flights: list[Any] = []

    def install(self) -> list:
        stack = self.spec.stack
        handles = [
            stack.register_forward_pre_hook(self._stack_pre, with_kwargs=True),
            stack.register_forward_hook(self._stack_post, with_kwargs=True, always_call=True),
        ]
        first = self.placement.layer
        for number, layer in enumerate(self.spec.layers):
            if number >= first - 1:
                handles.append(layer.register_forward_pre_hook(self._layer_hook(number), with_kwargs=True))
        return handles

    # -- stack ------------------------------------------------------------------------------------------

    def _stack_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            call = self.attachment.current_call()
            image = call.image_mask if call is not None and call.has_images else None
            self._flights.append(("prefill", image))
            return None
        state = self.states.get(cache)
        self._flights.append(_Step(state, cache) if state is not None else None)
        return None

    def _stack_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        flight = self._flights.pop() if self._flights else None
        if not isinstance(flight, tuple):
            return None
        image = flight[1]
        cache = getattr(output, "past_key_values", None) if output is not None else None
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if image is None or cache is None or not bool(image.any()):
            return None
        session = self.attachment.decoder.sessions.get(cache)
        result = self.attachment.last_result
        self.states[cache] = _CacheState(image.bool(), session, result, int(image.shape[1]))
        return None

    # -- layers -----------------------------------------------------------------------------------------

    def _slots(self, state: _CacheState, number: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, S) original position of each prefill cache slot of layer ``number`` and (B, S) bool "real slot"."""
        if state.session is None:
            index = torch.arange(state.length, device=device).expand(batch, -1)
            return index, torch.ones_like(index, dtype=torch.bool)
        segment = state.session.segments[state.session.segment_of(number)]
        return segment.index.to(device), segment.valid.to(device)

    def _layer_hook(self, number: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            step = self._flights[-1] if self._flights else None
            if not isinstance(step, _Step):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if number == self.placement.layer - 1:
                step.hidden_orig = self._choose(module, number, step, hidden, kwargs)
                return None
            if step.hidden_orig is None:
                return None
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._masked(number, step, hidden, kwargs.get("attention_mask"), step.hidden_orig)
            return args, kwargs

        return hook

    def _allowed(self, number: int, step: _Step, hidden: Tensor, mask: Any) -> Tensor:
        """(B, 1, q, S + q) bool: what the layer's own mask lets each new token see."""
        batch, q_len = hidden.shape[:2]
        past = step.cache.get_seq_length(number)
        total = past + q_len
        if mask is None:
            causal = torch.ones(q_len, total, dtype=torch.bool, device=hidden.device).tril(total - q_len)
            return causal[None, None].expand(batch, 1, -1, -1)
        if not isinstance(mask, Tensor):
            raise VtpruneError(f"placement 'decode' cannot read a {type(mask).__name__} attention mask")
        allowed = mask if mask.dtype == torch.bool else mask == 0
        return allowed.expand(batch, -1, -1, -1)[..., -total:]

    def _hidden_slots(self, number: int, step: _Step, batch: int, total: int, device, hidden_orig: Tensor) -> Tensor:
        """(B, total) bool: cache columns of layer ``number`` hidden this step."""
        index, valid = self._slots(step.state, number, batch, device)
        hide = hidden_orig.to(device).gather(1, index) & valid  # (B, S)
        out = torch.zeros(batch, total, dtype=torch.bool, device=device)
        out[:, : hide.shape[1]] = hide
        return out

    def _masked(self, number: int, step: _Step, hidden: Tensor, mask: Any, hidden_orig: Tensor) -> Tensor:
        allowed = self._allowed(number, step, hidden, mask)  # (B, 1, q, KV)
        batch, total = allowed.shape[0], allowed.shape[-1]
        hide = self._hidden_slots(number, step, batch, total, hidden.device, hidden_orig)  # (B, KV)
        allowed = allowed & ~hide[:, None, None, :]
        if self.eager:
            return _to_additive(allowed, hidden.dtype)
        return allowed

    def _choose(self, module: nn.Module, number: int, step: _Step, hidden: Tensor, kwargs: dict) -> Tensor:
        """(B, L) bool: original positions of visual entries present in the scoring layer's cache that layers
        >= ``layer`` do not see this step; appends the record."""
        state, placement = step.state, self.placement
        device = hidden.device
        batch = hidden.shape[0]
        image = state.image.to(device)  # (B, L)
        index, valid = self._slots(state, number, batch, device)  # (B, S)
        present = image.gather(1, index) & valid  # (B, S): visual slots of the scoring layer
        present_orig = _scatter_positions(index, present, state.length)  # (B, L)
        if placement.policy == "final":
            final = self._final_positions(state, batch, device)  # (B, L)
            hidden_orig = present_orig & ~final
        else:
            if state.alive is None:
                state.alive = image.clone()
            candidates = present & state.alive.to(device).gather(1, index)  # (B, S)
            attention = self._attention(module, number, step, hidden, kwargs, candidates)  # (B, S)
            start = present.sum(1)  # (B,) visual entries after prefill
            if placement.policy == "dycoke":
                counts, prune = self._dycoke_counts(state, index, present, attention, start)  # (B,), (B,) bool
            else:
                counts = torch.cat([resolve_budget(placement.keep, start[b : b + 1]) for b in range(batch)])  # (B,)
                prune = torch.ones(batch, dtype=torch.bool, device=device)
            counts = torch.minimum(counts, candidates.sum(1))
            scores = attention.masked_fill(~candidates, float("-inf"))  # (B, S)
            order = scores.sort(dim=1, descending=True, stable=True).indices  # (B, S)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand(batch, -1))
            chosen = candidates & (rank < counts.unsqueeze(1))  # (B, S)
            hidden_orig = present_orig & ~_scatter_positions(index, chosen, state.length)
            hidden_orig = hidden_orig & prune.unsqueeze(1)  # rows whose step is not pruned hide nothing
            if placement.mode == "evict":
                state.alive = state.alive.to(device) & ~hidden_orig
        if state.result is not None and hasattr(state.result, "decode_records"):
            hidden_rows = tuple(hidden_orig[b].nonzero().flatten().cpu() for b in range(batch))
            state.result.decode_records.append(DecodeRecord(state.steps, placement.layer, hidden_rows))
        state.steps += 1
        return hidden_orig

    def _dycoke_counts(self, state: _CacheState, index: Tensor, present: Tensor, attention: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        """Policy ``dycoke``: per row the kept count ``int(n * (1 - prune_ratio))`` (float64 = Python float) and
        whether this step prunes (cosine of this step's visual attention with the previous step's < threshold;
        the first step always prunes). Remembers this step's attention."""
        placement = self.placement
        current = torch.zeros(index.shape[0], state.length, dtype=torch.float32, device=attention.device)  # (B, L)
        current.scatter_(1, torch.where(present, index, 0), torch.where(present, attention.float(), 0.0))
        if state.previous is None:
            prune = torch.ones(index.shape[0], dtype=torch.bool, device=attention.device)
        else:
            similarity = torch.nn.functional.cosine_similarity(current, state.previous.to(current.device), dim=1)  # (B,)
            prune = similarity < placement.threshold
        state.previous = current
        counts = torch.floor(start.double() * (1.0 - placement.prune_ratio)).long()  # (B,)
        return counts, prune

    @staticmethod
    def _final_positions(state: _CacheState, batch: int, device) -> Tensor:
        """(B, L) bool: original positions present after the prefill's last drop."""
        if state.session is None:
            return torch.ones(batch, state.length, dtype=torch.bool, device=device)
        final = state.session.final
        return _scatter_positions(final.index.to(device), final.valid.to(device), state.length)

    def _attention(self, module: nn.Module, number: int, step: _Step, hidden: Tensor, kwargs: dict, candidates: Tensor) -> Tensor:
        """(B, S) head-mean softmax attention of the last new token over layer ``number``'s prefill slots, with the
        visual entries not among ``candidates`` hidden (they are not in this step's cache view)."""
        spec = self.spec
        attn = spec.attention(module)
        batch, q_len = hidden.shape[:2]
        head_dim = attn.head_dim
        normed = spec.input_norm(module)(hidden[:, -1:])  # (B, 1, D)
        query = attn.q_proj(normed).view(batch, 1, -1, head_dim)
        key = attn.k_proj(normed).view(batch, 1, -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:
            query = attn.q_norm(query)
        if getattr(attn, "k_norm", None) is not None:
            key = attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, 1, d), (B, Hk, 1, d)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.narrow(spec.pe_seq_dim, cos.shape[spec.pe_seq_dim] - 1, 1), sin.narrow(spec.pe_seq_dim, sin.shape[spec.pe_seq_dim] - 1, 1)
        query, key = spec.apply_rope(query, key, cos, sin)
        layer_cache = step.cache.layers[number]
        past_keys = layer_cache.keys  # (B, Hk, P, d)
        keys = torch.cat([past_keys, key.to(past_keys.dtype)], dim=2)  # (B, Hk, P + 1, d)
        groups = query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        scores = torch.matmul(query, keys.transpose(2, 3).to(query.dtype)) * attn.scaling  # (B, H, 1, P + 1)
        allowed = self._allowed(number, step, hidden, kwargs.get("attention_mask"))[:, :, -1:, :]  # (B, 1, 1, KV)
        allowed = torch.cat([allowed[..., : past_keys.shape[2]], allowed[..., -1:]], dim=-1)  # (B, 1, 1, P + 1)
        width = candidates.shape[1]
        index, valid = self._slots(step.state, number, batch, hidden.device)
        image_slots = step.state.image.to(hidden.device).gather(1, index) & valid  # (B, S)
        gone = torch.zeros(batch, allowed.shape[-1], dtype=torch.bool, device=hidden.device)
        gone[:, :width] = image_slots & ~candidates
        allowed = allowed & ~gone[:, None, None, :]
        scores = scores + _to_additive(allowed, scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]  # (B, H, P + 1)
        return probs.mean(dim=1)[:, :width]  # (B, S)
