"""Merged / masked references for the temporal video methods end to end (FastVID, HoliTom, PruneVid), written
without vtprune code: the unpruned model is fed the merged values at the kept slots (positions as in the unpruned
sequence) and the dropped tokens are masked out (``adapter_fixtures.masked_reference`` /
``qwen_fixtures.MaskedReference``).

- :func:`plain_frame_attention`: the parameter-free frame self-attention the presets use as salience / dominant
  score, written as a loop over frames and queries.
- :class:`EmbedsOverride`: a pre-hook on the decoder stack writing given values into ``inputs_embeds`` at given
  positions (the prefill only), for models whose reference is fed ``input_ids`` + pixels (Qwen2.5-VL).
- :class:`InnerMerge`: HoliTom's inner-LLM merge at layer k on the reference model: a forward hook on layer k-1's
  attention captures its (eager) attention weights, a pre-hook on layer k takes, per row, the head mean of the last
  position's attention over the row's present visual positions, runs `ref_inner_merge` on the hidden states
  entering layer k and writes the merged values at the kept positions. The query is the sequence's last position
  by default (official HoliTom, ``[0, -1]``); ``query`` gives another per sample (vtprune's query token is the last
  prompt token: on a chat template, the end of the user turn; docs/methods.md, "HoliTom deviations").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from density_video_reference import ref_inner_merge

__all__ = ["plain_frame_attention", "EmbedsOverride", "InnerMerge", "decoder_stack"]


def decoder_stack(model):
    """The decoder stack (``.layers``) of a LLaVA-OneVision / Qwen2.5-VL model."""
    return model.model.language_model


def plain_frame_attention(tokens: torch.Tensor) -> torch.Tensor:
    """(T, n): per frame, the mean over the frame's queries of ``softmax(q . k / sqrt(D))`` over the frame's keys."""
    t_len, n, dim = tokens.shape
    out = torch.zeros(t_len, n)
    for t in range(t_len):
        x = tokens[t].float()
        for q in range(n):
            logits = torch.tensor([float(x[q] @ x[j]) / math.sqrt(dim) for j in range(n)])
            out[t] += logits.softmax(dim=0) / n
    return out


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class EmbedsOverride:
    """Context manager: while active, the decoder stack's ``inputs_embeds`` of a full-length (prefill) call get
    ``values[i]`` at ``(batch, position)`` ``writes[i]``."""

    def __init__(self, model, length: int, writes: Sequence[tuple[int, int]], values: Sequence[torch.Tensor]):
        self.stack, self.length, self.writes, self.values = decoder_stack(model), length, list(writes), list(values)
        self.handle = None

    def _hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[1] != self.length:
            return args, kwargs
        embeds = embeds.clone()
        for (b, p), value in zip(self.writes, self.values):
            embeds[b, p] = value.to(embeds.dtype)
        return args, {**kwargs, "inputs_embeds": embeds}

    def __enter__(self):
        self.handle = self.stack.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class InnerMerge:
    """Context manager on an eager-attention reference model: HoliTom's inner merge before layer ``k`` on each
    row's ``present`` (batch, positions) tokens, keeping ``round(len(positions) * keep)`` (half to even, Python
    ``round``). After a prefill, ``kept[i]`` is row i's kept positions (ascending) and ``merged[i]`` their values."""

    def __init__(
        self, model, k: int, rows: Sequence[tuple[int, torch.Tensor]], keep: float, length: int,
        query: Sequence[int] | None = None,
    ):
        layers = decoder_stack(model).layers
        self.before, self.at = layers[k - 1].self_attn, layers[k]
        self.rows, self.keep, self.length = list(rows), keep, length
        self.query = query
        self.weights = None
        self.kept: list[list[int]] = []
        self.merged: list[dict[int, torch.Tensor]] = []
        self.handles = []

    def _capture(self, module, args, output):
        weights = output[1]
        if weights is not None and weights.shape[-2] == self.length:
            self.weights = weights.detach()  # (B, H, L, L)

    def _merge(self, module, args, kwargs):
        hidden = _hidden(args, kwargs)
        if hidden.shape[1] != self.length:
            return args, kwargs
        assert self.weights is not None, "the reference model must run eager attention"
        hidden = hidden.clone()
        self.kept, self.merged = [], []
        for b, positions in self.rows:
            q = -1 if self.query is None else self.query[b]
            scores = self.weights[b, :, q, positions].float().mean(dim=0)  # the query's attention, head mean
            count = round(positions.numel() * self.keep)
            merged = ref_inner_merge(hidden[b, positions], scores, count)
            values = {int(positions[i]): v for i, v in merged.items()}
            for p, v in values.items():
                hidden[b, p] = v
            self.kept.append(sorted(values))
            self.merged.append(values)
        return _with_hidden(args, kwargs, hidden)

    def __enter__(self):
        self.handles = [
            self.before.register_forward_hook(self._capture),
            self.at.register_forward_pre_hook(self._merge, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
