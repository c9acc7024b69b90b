"""The drop plan of one pruned prefill (implements ``decoder.DropPlan``): signals for each drop, the pipeline's
selection, the decision, the records.

A plan receives data only: the forward in flight (`ForwardCall`), its input embeddings and masks, the vision
capture, and a `PlanContext` (the adapter description, the pipeline and its settings, a ``project`` function and
a ``publish`` function for the `PruneResult`). The hook runtime (``adapters.runtime``) builds one per pruned
prefill through its plan factory (`Plan` by default).

This module builds each drop's `Signals` and runs the pipeline; ``plan_context`` holds `PlanContext` and
`check_drops`, ``decisions`` turns the selection into the decoder's `Decision` and the drop's record
(``tower_merge`` does for ``vision_layers``).

Rows of `Signals` are images, in the order the model consumes them (row-major over the batch: all images of
sample 0, then sample 1, ...), which is also the order of ``pixel_values``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vtprune.framework.hints import (  # the stage hints the runtime honours (docs/adapters.md)
    HINT_APPEND_MERGED, HINT_FINAL_NORM, HINT_INPUT_EMBEDDINGS, HINT_LAST_QUERY, HINT_OWN_LAYER, HINT_PLAIN_PROMPT,
)
from vtprune.framework.signals import Signals
from vtprune.framework.stages import pipeline_at_drop

from .call import ForwardCall
from .capture import VisionCapture
from .decisions import apply_selection, apply_with_cls
from .decoder import Decision, DropState, Session
from .plan_context import INPUT_DROPS, PlanContext, check_drops
from .records import DropRecord, ImageLayout, PruneResult
from .row_fields import (
    frame_fields, frame_spans, input_fields, view_fields, visual_attention_field, visual_query_slots,
)
from .row_fields import pad_rows as _pad_rows
from .spans import last_real_tokens
from .tower_merge import apply_tower_merge

__all__ = [
    "ForwardCall", "PlanContext", "Plan", "check_drops", "frame_fields", "HINT_FINAL_NORM",
    "HINT_OWN_LAYER", "HINT_APPEND_MERGED", "HINT_LAST_QUERY", "HINT_PLAIN_PROMPT", "HINT_INPUT_EMBEDDINGS",
]


def _pad_prompt(rows: Tensor, width: int) -> Tensor:
    """(R, H, width, N): ``rows`` (R, H, T, N) padded with zero rows along the prompt axis to ``width``."""
    if rows.shape[2] >= width:
        return rows[:, :, :width]
    pad = rows.new_zeros(rows.shape[0], rows.shape[1], width - rows.shape[2], rows.shape[3])
    return torch.cat([rows, pad], dim=2)


class Plan:
    """The drop plan of one prefill (implements ``decoder.DropPlan``).

    Args:
        context: the attachment's fixed settings (`PlanContext`).
        call: the forward in flight.
        embeds: (B, L, D) the decoder input embeddings.
        image_mask: (B, L) bool, True at visual placeholders.
        mask2d: (B, L) bool attention mask.
        capture: what the vision hooks captured for this forward.
        budget: the budget of this forward, normalised by the runtime (`normalize_budget`): an int, a float,
            or a tuple with one per image.
    """

    def __init__(
        self,
        context: PlanContext,
        call: ForwardCall,
        embeds: Tensor,
        image_mask: Tensor,
        mask2d: Tensor,
        capture: VisionCapture,
        budget: Any,
    ):
        self.context = context
        self.adapter = adapter = context.adapter
        self.call = call
        self.device = embeds.device
        self.length = image_mask.shape[1]
        self.capture = capture
        counts = adapter.image_counts(call, int(image_mask.sum().item()))
        flat = image_mask.nonzero()  # (T, 2) row-major (sample, position)
        if sum(counts) != flat.shape[0]:
            raise ValueError(f"{adapter.name}: {flat.shape[0]} image tokens in the input but the images need {sum(counts)}")
        self.image_sample, self.image_positions = [], []
        offset = 0
        for count in counts:
            chunk = flat[offset : offset + count]
            offset += count
            if not bool((chunk[:, 0] == chunk[0, 0]).all()):
                raise ValueError("an image's placeholder tokens span two samples")
            self.image_sample.append(int(chunk[0, 0]))
            self.image_positions.append(chunk[:, 1])
        self.num_images = len(counts)
        self.token_embeds = [embeds[b, p.to(embeds.device)] for b, p in zip(self.image_sample, self.image_positions)]
        self.layouts: list[ImageLayout] = adapter.layouts(call, counts, self.token_embeds)
        self.prompts, query = adapter.prompt_span(call, image_mask, mask2d, context.prompt_stop)
        self.query = last_real_tokens(mask2d) if HINT_LAST_QUERY in context.hints else query.to(self.device)
        budgets = list(budget) if isinstance(budget, tuple) else [budget] * self.num_images  # normalised
        if len(budgets) != self.num_images:
            raise ValueError(f"budget has {len(budgets)} entries for {self.num_images} images in this forward")
        placement = context.pipeline.placement
        self.drops_per_image = [placement.drops(b) for b in budgets]
        structure = {tuple((d.where, d.layer) for d in drops) for drops in self.drops_per_image}
        if len(structure) != 1:
            raise ValueError("per-image budgets must give the same drop points")
        self.drops = self.drops_per_image[0] if self.drops_per_image else ()
        check_drops(self.drops, context.num_layers, getattr(placement, "drops_after_last_layer", False))
        self.layers = tuple(0 if d.where in INPUT_DROPS else int(d.layer) for d in self.drops)
        self.records: list[DropRecord] = []
        self.requires = context.requires
        # the original token each image-token slot holds: the identity until an append_merged drop rewrites the slots
        self.held = [torch.arange(layout.num_tokens) for layout in self.layouts]
        self._inputs = None  # the decoder input embeddings, for stages that ask (hint input_embeddings)
        if HINT_INPUT_EMBEDDINGS in context.hints:
            prompt_embeds = [embeds[b, self.prompts[b].to(embeds.device)] for b in self.image_sample]
            self._inputs = input_fields(self.token_embeds, prompt_embeds)
        self._cls_rows = None
        self._vkey_rows = None

    # -- DropPlan API -----------------------------------------------------------------------------------

    def score_layer(self, layer: int) -> int:
        """Layer whose own q/k score the drop at ``layer``: ``layer`` under the ``own_layer_scoring`` hint
        (PyramidDrop), else ``layer - 1`` (FastV)."""
        return layer if HINT_OWN_LAYER in self.context.hints else layer - 1

    def wants(self, layer: int) -> frozenset[str]:
        wanted = set()
        if "attention" in self.requires:
            wanted.add("attention")
        if self.requires & {"visual_keys", "prompt_keys"}:
            wanted.add("keys")
        if self.requires & {"prompt_attention", "visual_attention"} and layer > 0:  # visual rows ride along
            wanted.add(HINT_PLAIN_PROMPT if HINT_PLAIN_PROMPT in self.context.hints else "prompt_attention")
        return frozenset(wanted)

    def prompt_query_slots(self, index: Tensor, valid: Tensor) -> Tensor:
        """(B, Q) long: the current slots of each sample's prompt tokens (``index`` / ``valid``: the segment's
        (B, Ls) original positions and real slots), in prompt order; a shorter prompt repeats its last slot (its
        extra rows are never read); Q = the longest prompt (at least 1)."""
        slot_of = self._slot_map(DropState(0, index.new_zeros(0), index, valid))
        width = max([p.numel() for p in self.prompts] + [1])
        out = torch.zeros(index.shape[0], width, dtype=torch.long, device=self.device)
        for b, prompt in enumerate(self.prompts):
            if prompt.numel():
                slots = slot_of[b, prompt.to(self.device)]
                out[b, : slots.numel()] = slots
                out[b, slots.numel() :] = slots[-1]
        if "visual_attention" in self.requires:  # then each sample's image slots, after the Q prompt columns
            out = visual_query_slots(out, self._rows(DropState(0, index.new_zeros(0), index, valid), slot_of)[1],
                                     self.image_sample)
        return out

    def decide(self, layer: int, state: DropState) -> Optional[Decision]:
        number = self.layers.index(layer)
        drop = self.drops[number]
        budgets = [drops[number].budget for drops in self.drops_per_image]
        if drop.where == "vision_layers":
            return apply_tower_merge(self, drop, layer, budgets, state)
        if drop.where == "vision":
            signals, columns, slots = self._vision_signals(state)
        else:
            signals, columns, slots = self._llm_signals(state, drop)
        pipeline = pipeline_at_drop(self.context.pipeline, number)  # per-drop step
        selection = pipeline.select(signals, budgets if len(set(budgets)) > 1 else budgets[0])
        if drop.where == "vision" and self.context.keep_cls:
            return apply_with_cls(self, drop, layer, budgets, selection, signals, columns, slots, state)
        return apply_selection(self, drop, layer, budgets, selection, columns, slots, state)

    def finish(self, session: Session) -> None:
        final = session.final
        self.context.publish(PruneResult(
            drops=tuple(self.records),
            image_sample=torch.tensor(self.image_sample, dtype=torch.long),
            num_tokens=torch.tensor([layout.num_tokens for layout in self.layouts], dtype=torch.long),
            image_positions=tuple(p.cpu() for p in self.image_positions),
            sequence_index=final.index.cpu(),
            sequence_mask=final.valid.cpu(),
        ))

    # -- signals ----------------------------------------------------------------------------------------

    def _slot_map(self, state: DropState) -> Tensor:
        batch, width = state.index.shape
        slot_of = torch.full((batch, self.length + 1), -1, dtype=torch.long, device=self.device)
        target = torch.where(state.valid, state.index, torch.full_like(state.index, self.length))
        slot_of.scatter_(1, target, torch.arange(width, device=self.device).expand(batch, -1))
        return slot_of[:, : self.length]

    def _rows(self, state: DropState, slot_of: Optional[Tensor] = None) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: present token ids (image coords) and their current slots (``slot_of``: the drop's
        `_slot_map`, built here when not given)."""
        slot_of = self._slot_map(state) if slot_of is None else slot_of
        columns, slots = [], []
        for r in range(self.num_images):
            s = slot_of[self.image_sample[r], self.image_positions[r].to(self.device)]
            tokens = (s >= 0).nonzero().flatten()
            columns.append(tokens)
            slots.append(s[tokens])
        return columns, slots

    def _cls(self) -> Optional[list[Tensor]]:
        if self._cls_rows is None and self.capture.cls is not None:
            per_crop = self._strip_cls(self.capture.cls.transpose(1, 2))  # (crops, n, H)
            self._cls_rows = [row.float().t().to(self.device) for row in self._vision_rows(per_crop)]
        return self._cls_rows

    def _vision_keys(self) -> Optional[list[Tensor]]:
        if self._vkey_rows is None and self.capture.keys is not None:
            keys = self._strip_cls(self.capture.keys)  # (crops, n, H, d)
            crops, n, heads, dim = keys.shape
            rows = self._vision_rows(keys.reshape(crops, n, heads * dim))
            self._vkey_rows = [row.float().view(row.shape[0], heads, dim) for row in rows]
        return self._vkey_rows

    def _vision_rows(self, per_crop: Tensor) -> list[Tensor]:
        return self.adapter.vision_rows(self.capture, self.layouts, self.token_embeds, per_crop)

    def _strip_cls(self, per_crop: Tensor) -> Tensor:
        return per_crop[:, 1:] if self.adapter.strategy(self.call) == "default" else per_crop

    def _row_grids(self, columns: list[Tensor]) -> list[Optional[tuple[int, int]]]:
        """Per image, its (h, w) token grid while all its tokens are present (a drop breaks the grid)."""
        return [
            layout.grid if c.numel() == layout.num_tokens else None for c, layout in zip(columns, self.layouts)
        ]

    def _common(self, columns: list[Tensor], fields: dict) -> None:
        if "cls_attention" in self.requires:
            rows = self._cls()
            if rows is not None:
                fields["cls_attention"] = _pad_rows([rows[r][:, c].t() for r, c in enumerate(columns)]).transpose(1, 2)
        grids = self._row_grids(columns)
        if grids and len(set(grids)) == 1 and grids[0] is not None:
            fields["grid"] = grids[0]  # one grid for every row
        elif any(g is not None for g in grids):  # rows differ: per-row grids, (0, 0) = none
            fields["grids"] = torch.tensor([g if g is not None else (0, 0) for g in grids], dtype=torch.long)
        if getattr(self.adapter, "has_frames", False):
            width = fields["visual"].shape[1]
            fields["frames"], fields["frame_index"] = frame_fields(self.layouts, columns, width, self.device)
            fields["frame_span"] = frame_spans(self.layouts, columns, self.records, width, self.device)
        if getattr(self.adapter, "has_views", False):
            fields["view_index"] = view_fields(self.layouts, columns, fields["visual"].shape[1], self.device)

    def _llm_signals(self, state: DropState, drop: Any):
        slot_of = self._slot_map(state)  # (B, L): built once, read for the image rows and the prompt
        columns, slots = self._rows(state, slot_of)
        hidden = state.hidden
        if drop.where == "layer" and HINT_FINAL_NORM in self.context.hints:
            with torch.no_grad():
                hidden = self.adapter.final_norm()(hidden)  # DART: similarities on model.norm(hidden states)
        hidden = hidden.float()
        fields: dict[str, Any] = {}
        fields["visual"] = _pad_rows([hidden[self.image_sample[r], slots[r]] for r in range(self.num_images)])
        fields["visual_mask"] = _pad_rows([torch.ones(len(s), dtype=torch.bool, device=self.device) for s in slots], value=False)
        width = fields["visual"].shape[1]
        prompt_slots = [slot_of[b, self.prompts[b].to(self.device)] for b in range(state.hidden.shape[0])]
        if any(bool((p < 0).any()) for p in prompt_slots):
            raise RuntimeError("a prompt token was dropped")
        # prompt hidden states are cheap; stages that do not read them ignore them
        rows = [hidden[self.image_sample[r], prompt_slots[self.image_sample[r]]] for r in range(self.num_images)]
        if max(r.shape[0] for r in rows) > 0:
            fields["prompt"] = _pad_rows(rows)
            fields["prompt_mask"] = _pad_rows(
                [torch.ones(r.shape[0], dtype=torch.bool, device=self.device) for r in rows], value=False
            )
        if self._inputs is not None:
            fields.update({k: v for k, v in self._inputs.items() if k != "input_prompt" or "prompt" in fields})
        if state.attention is not None:
            rows = [state.attention[self.image_sample[r]][:, slots[r]].t() for r in range(self.num_images)]
            fields["attention"] = _pad_rows(rows, width).transpose(1, 2)
        if state.prompt_attention is not None and "prompt" in fields:
            tmax = fields["prompt"].shape[1]
            rows = []
            for r in range(self.num_images):
                b = self.image_sample[r]
                part = state.prompt_attention[b, :, : self.prompts[b].numel()][:, :, slots[r]]  # (H, T_b, n)
                rows.append(_pad_prompt(part.unsqueeze(0), tmax)[0].permute(2, 0, 1))  # (n, H, T)
            fields["prompt_attention"] = _pad_rows(rows, width).permute(0, 2, 3, 1)  # (R, H, T, N)
        if state.prompt_attention is not None and "visual_attention" in self.requires:
            fields["visual_attention"] = visual_attention_field(state.prompt_attention, self.prompts, slots,
                                                                self.image_sample, width)
        if state.keys is not None:
            keys = state.keys.float()
            fields["visual_keys"] = _pad_rows([keys[self.image_sample[r], slots[r]] for r in range(self.num_images)], width)
            if "prompt" in fields:
                fields["prompt_keys"] = _pad_rows(
                    [keys[self.image_sample[r], prompt_slots[self.image_sample[r]]] for r in range(self.num_images)]
                )
        if drop.where == "pre_llm" and self.context.clip is not None:
            self._clip_fields(columns, fields)
        self._common([self.held[r][c.cpu()].to(c.device) for r, c in enumerate(columns)], fields)  # original tokens
        return Signals(**fields), columns, slots

    def _clip_fields(self, columns: list[Tensor], fields: dict) -> None:
        """``clip_visual`` / ``clip_text`` / ``clip_text_mask`` (CDPruner; see ``adapters/clip_signals.py``)."""
        clip = self.context.clip
        features = self.capture.features
        if features is None:
            raise RuntimeError("pre_llm_clip: the vision tower did not run for this forward")
        if self.call.input_ids is None:
            raise ValueError("pre_llm_clip needs input_ids to recover the prompt text (inputs_embeds was given)")
        per_crop = clip.image_embeds(features)  # (crops, n, C) fp32
        rows = self._vision_rows(per_crop)
        fields["clip_visual"] = _pad_rows([row[c].float() for row, c in zip(rows, columns)]).to(self.device)
        cache: dict = {}
        texts = []
        for r in range(self.num_images):
            b = self.image_sample[r]
            ids = self.call.input_ids[b, self.prompts[b].to(self.call.input_ids.device)]
            texts.append(clip.prompt_embeds(ids, cache).to(self.device))
        fields["clip_text"] = _pad_rows(texts)
        fields["clip_text_mask"] = _pad_rows(
            [torch.ones(t.shape[0], dtype=torch.bool, device=self.device) for t in texts], value=False
        )

    def _vision_feature_rows(self) -> list[Tensor]:
        """Per image, the vision-side features aligned with its LLM tokens (``adapter.vision_features``)."""
        return self.adapter.vision_features(self.call, self.capture, self.layouts, self.token_embeds, self.device)

    def _vision_signals(self, state: DropState):
        columns, slots = self._rows(state)
        rows = self._vision_feature_rows()
        newline = [layout.newline for layout in self.layouts]
        fields: dict[str, Any] = {
            "visual": _pad_rows([row.float() for row in rows]),
            "visual_mask": _pad_rows(
                [
                    (~n if n is not None else torch.ones(row.shape[0], dtype=torch.bool, device=row.device))
                    for row, n in zip(rows, newline)
                ],
                value=False,
            ).to(self.device),
        }
        fields["visual"] = fields["visual"].to(self.device)
        if "visual_keys" in self.requires:
            keys = self._vision_keys()
            if keys is not None:
                fields["visual_keys"] = _pad_rows(keys).to(self.device)
        self._common(columns, fields)
        return Signals(**fields), columns, slots
