"""A loop-style re-implementation of the official FitPrune code, without vtprune code, for the tests.

Official code: github.com/ywh187/FitPrune @ d28e418c920912b20dc888325651ecc6e214e6a1:
``LLaVA_1.5/llava/model/language_model/modeling_llama.py`` (``LlamaAttention.forward``, the "fitprune" block) for
the inference, ``LLaVA_1.5/llava/eval/statistical_analysis.py`` (``compute_attention_weights``, ``fit_model``,
``rest_flops``, ``calculate_origin_flops``, ``statistical_analysis``) for the fitting. In our own words, in the
official op order, one sample (batch of one, no padding) at a time as the official code runs.

Where the official code physically removes tokens after layer l's attention, this reference runs the *unpruned* model
with the removed tokens masked out of every later layer's attention (``masked_reference``, original position ids
kept, as the official code slices ``position_ids``) and reads layer l's eager attention map: the same
probabilities over the present keys. The official hard-coded 35 (the system prompt before the image) is the image's
first position, and 576 / 4096 / 11008 / 32 the model's image tokens and config.
"""

from __future__ import annotations

import torch

from adapter_fixtures import masked_reference


def _attention(model, sample, removed, layer):
    """Layer ``layer``'s (H, L, L) eager attention map of a batch-of-one sample with ``removed`` masked out."""
    model.set_attn_implementation("eager")
    try:
        with masked_reference(model, removed), torch.no_grad():
            return model(**sample, output_attentions=True).attentions[layer][0].float()
    finally:
        model.set_attn_implementation("sdpa")


def _layout(model, sample):
    ids = sample["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    text = torch.arange(int(image[-1]) + 1, ids.numel())
    return image, text


def reference_inference(model, sample, deletions):
    """The official inference on one sample: after each layer l with ``deletions[l] > 0``, delete the first
    ``deletions[l]`` of ``torch.sort(cross * self)``. Returns the per-layer removed masks (list of (1, L) bool) and,
    per pruning layer, the kept image positions."""
    layers = model.config.text_config.num_hidden_layers
    length = sample["input_ids"].shape[1]
    image, text = _layout(model, sample)
    removed = [torch.zeros(1, length, dtype=torch.bool) for _ in range(layers)]
    kept_after = {}
    for layer in range(layers):
        if deletions[layer] == 0:
            continue
        attn = _attention(model, sample, removed, layer)  # (H, L, L)
        headmax = attn.max(dim=0).values  # (L, L)
        present = image[~removed[layer][0, image]]  # (n,)
        n = present.numel()
        self_attention = (headmax[present][:, present] / n).sum(dim=0)  # (n,)
        cross_attention = headmax[text][:, present].sum(dim=0)  # (n,)
        delete = torch.sort(cross_attention * self_attention, dim=-1).indices[: deletions[layer]]
        for later in range(layer + 1, layers):
            removed[later][0, present[delete]] = True
        kept = torch.ones(n, dtype=torch.bool)
        kept[delete] = False
        kept_after[layer] = present[kept]
    return removed, kept_after


def reference_weights(model, sample):
    """``compute_attention_weights`` for one sample: per layer (W_cross, W_self) of the unpruned model."""
    layers = model.config.text_config.num_hidden_layers
    image, text = _layout(model, sample)
    removed = [torch.zeros(1, sample["input_ids"].shape[1], dtype=torch.bool)] * layers
    out = []
    for layer in range(layers):
        headmax = _attention(model, sample, removed, layer).max(dim=0).values  # (L, L)
        cross = headmax[text][:, image].sum().item() / text.numel()
        self_part = headmax[image][:, image].sum().item()
        out.append((cross, self_part / max(image.numel(), 1)))
    return out


def _rest_flops(tokens, layer, hidden, inter, layers):
    flops = tokens * hidden**2 + 3 * inter * hidden * tokens
    left = layers - 1 - layer
    flops += ((tokens * hidden * hidden * 3 + tokens * tokens * hidden + tokens * hidden * tokens + tokens * hidden * hidden)
              + (hidden * inter * tokens * 3)) * left
    return flops


def reference_fit_model(model, samples, alpha, weights, reduction, prune_last_layer=True):
    """``fit_model``: (budget met, per-layer scheme). ``prune_last_layer=False``: no deletions at the last layer
    (vtprune's stated deviation: they change no output)."""
    config = model.config.text_config
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    starts = [int((s["input_ids"][0] == model.config.image_token_id).sum()) for s in samples]
    origin = ((starts[0] * hidden * hidden * 3 + starts[0] * starts[0] * hidden + starts[0] * hidden * starts[0]
               + starts[0] * hidden * hidden) + (hidden * inter * starts[0] * 3)) * layers
    flops_reach = False
    already = 0
    left = list(starts)
    removed = [[torch.zeros(1, s["input_ids"].shape[1], dtype=torch.bool) for _ in range(layers)] for s in samples]
    scheme = {i: 0 for i in range(layers)}
    for layer in range(layers):
        forecast = 0
        for tokens in left:
            already += tokens * hidden**2 * 3 + tokens**2 * hidden * 2
            forecast += _rest_flops(tokens, layer, hidden, inter, layers)
        if (already + forecast) / len(left) <= origin * (1 - reduction):
            flops_reach = True
            break
        for s, sample in enumerate(samples):
            image, text = _layout(model, sample)
            headmax = _attention(model, sample, removed[s], layer).max(dim=0).values  # (L, L)
            present = image[~removed[s][layer][0, image]]
            n = present.numel()
            focus = headmax[text][:, present].sum(dim=0) / text.numel()  # (n,)
            img_part = (headmax[present][:, present] / n).sum(dim=0)  # (n,)
            w_cross, w_self = weights[s][layer]
            threshold_cross, threshold_self = w_cross * alpha, w_self * alpha
            sorted_cross, sorted_self = torch.argsort(focus), torch.argsort(img_part)
            cross_sum, self_sum = focus.sum(), img_part.sum()
            del_cross = n - 1  # the rule's continuation where no i qualifies (vtprune's stated deviation)
            for i in range(len(sorted_cross)):
                if (cross_sum - focus[sorted_cross[:i]].sum()) < (w_cross - threshold_cross):
                    del_cross = max(i - 1, 0)
                    break
            del_self = n - 1
            for i in range(len(sorted_self)):
                if (self_sum - img_part[sorted_self[:i]].sum()) < (w_self - threshold_self):
                    del_self = max(i - 1, 0)
                    break
            combined = torch.cat([sorted_cross[:del_cross], sorted_self[:del_self]])
            values, counts = combined.unique(return_counts=True, sorted=False)
            both = values[counts > 1]
            if layer == layers - 1 and not prune_last_layer:
                both = both[:0]
            scheme[layer] += both.shape[0]
            for later in range(layer + 1, layers):
                removed[s][later][0, present[both]] = True
            left[s] -= both.shape[0]
            already += left[s] * hidden**2 + 3 * inter * hidden * left[s]
    return flops_reach, [scheme[i] // len(samples) for i in range(layers)]


def reference_search(model, samples, reduction, prune_last_layer=True):
    """``statistical_analysis``'s bisection: the last probed scheme, and every (alpha, met) probe."""
    weights = [reference_weights(model, s) for s in samples]
    max_alpha, min_alpha = 1.0, 0.0
    probes, scheme = [], None
    while max_alpha - min_alpha > (0.01 + 1e-6):
        mid_alpha = (min_alpha + max_alpha) / 2
        flops_reach, scheme = reference_fit_model(model, samples, mid_alpha, weights, reduction, prune_last_layer)
        probes.append((mid_alpha, flops_reach))
        if flops_reach:
            max_alpha = mid_alpha
        else:
            min_alpha = mid_alpha
    return scheme, probes
