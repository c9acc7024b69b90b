"""Peer-method maths: vtprune.strategies.functional vs literal per-sample references.

Each reference below is written inside the test, batch size 1, following the official code's
order of operations (full-sequence tensors, Python sets / lists where the official code uses
them). Inputs are seeded and include near-ties (values snapped to a coarse grid) and ragged
batches (batch result == per-row result).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtprune.strategies.functional import (
    cdpruner_select,
    dart_select,
    dart_token_topk,
    divprune_keep_count,
    divprune_select,
    fastv_keep_count,
    fastv_select,
    pdrop_select,
    pdrop_stage_counts,
    pooled_grid_shape,
    pooling_select,
    random_select,
    vispruner_select,
    visionzip_select,
)
from vtprune.strategies.functional.common import cosine_matrix, topk_keep

SEEDS = range(4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _snap(x: torch.Tensor, step: float) -> torch.Tensor:
    """Snap to a coarse grid so that many entries tie exactly."""
    return torch.round(x / step) * step


def _mask_of(indices, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.as_tensor(indices, dtype=torch.long)] = True
    return m


def _ragged_valid(batch: int, tokens: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    valid = torch.rand(batch, tokens, generator=g) > 0.25
    valid[0] = True  # one full row
    return valid


# ----------------------------------------------------------------------------------- FastV


def _fastv_reference(attn_full: torch.Tensor, sys_len: int, n_img: int, drop_ratio: float) -> torch.Tensor:
    """attn_full: (1, H, L, L). Official llava-hf fastv_forward arithmetic."""
    avg = torch.mean(attn_full, dim=1)[0]
    last = avg[-1]
    image = last[sys_len : sys_len + n_img]
    top = image.topk(round(n_img * (1 - drop_ratio))).indices + sys_len
    return _mask_of(top - sys_len, n_img)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("snap", [None, 0.002])
def test_fastv_matches_reference(seed, snap):
    g = _gen(seed)
    heads, sys_len, n_img, n_txt = 4, 5, 30, 6
    length = sys_len + n_img + n_txt
    logits = torch.randn(1, heads, length, length, generator=g)
    attn = torch.softmax(logits, dim=-1)
    if snap:
        attn = _snap(attn, snap)
    for ratio in (0.5, 0.75, 0.25):
        ref = _fastv_reference(attn, sys_len, n_img, ratio)
        got = fastv_select(attn[:, :, -1, sys_len : sys_len + n_img], fastv_keep_count(n_img, ratio))
        assert torch.equal(got[0], ref)


def test_fastv_keep_count_rounding():
    assert fastv_keep_count(576, 0.75) == 144
    assert fastv_keep_count(576, 0.5) == 288
    assert fastv_keep_count(5, 0.5) == 2  # round(2.5) -> 2 (half to even)
    assert fastv_keep_count(7, 0.5) == 4  # round(3.5) -> 4


# -------------------------------------------------------------------------------- PyramidDrop


def test_pdrop_stage_counts_are_cumulative_truncations():
    assert pdrop_stage_counts(576, [8, 16, 24], 0.5) == [288, 144, 72]
    assert pdrop_stage_counts(577, [8, 16, 24], [0.5, 0.25, 0.125]) == [288, 144, 72]
    ratio_list = [1.0] + [0.6, 0.36, 0.216]
    assert pdrop_stage_counts(101, [8, 16, 24], [0.6, 0.36, 0.216]) == [int(101 * r) for r in ratio_list[1:]]
    # not the chained rule int(int(N * l) * l):
    assert pdrop_stage_counts(575, [8, 16, 24], 0.5)[2] == int(575 * 0.125) == 71


def _pdrop_reference(q: torch.Tensor, k: torch.Tensor, last: int, image_index: int, n_img: int, keep: int):
    """q, k: (H, L, d) post-RoPE states of one sample; causal mask; official rank_drop ops."""
    heads, length, dim = q.shape
    causal = torch.full((length, length), torch.finfo(q.dtype).min).triu(1)
    text_q = q[:, last, :].unsqueeze(1)  # (H, 1, d)
    text_mask = causal[last, :].unsqueeze(0)  # (1, L)
    w = torch.matmul(text_q, k.transpose(1, 2)) / math.sqrt(dim)
    w = w + text_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)  # (H, 1, L)
    avg_head = torch.mean(w, dim=0)[:, image_index : image_index + n_img]
    avg_text = torch.mean(avg_head, dim=0)
    top = avg_text.topk(keep).indices + image_index
    return _mask_of(top.sort().values - image_index, n_img), w


@pytest.mark.parametrize("seed", SEEDS)
def test_pdrop_select_matches_reference(seed):
    g = _gen(seed)
    heads, length, dim, image_index, n_img = 4, 50, 8, 3, 36
    q = torch.randn(heads, length, dim, generator=g)
    k = torch.randn(heads, length, dim, generator=g)
    for keep in pdrop_stage_counts(n_img, [8, 16, 24], 0.5):
        ref, w = _pdrop_reference(q, k, length - 1, image_index, n_img, keep)
        attention = w[:, 0, image_index : image_index + n_img].unsqueeze(0)  # (1, H, N)
        assert torch.equal(pdrop_select(attention, keep)[0], ref)


# ----------------------------------------------------------------------------------- DivPrune


def _divprune_reference(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Official DivPrune loop (index_select recomputation, topk(2) first pick)."""
    terms = int(round(ratio * x.shape[0]))
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(unit, unit.t())
    s = torch.empty(terms, dtype=torch.long)
    for i in range(terms):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            rows = torch.index_select(dist, 0, torch.index_select(s, 0, torch.arange(0, i)))
            scores = torch.min(rows, dim=0).values
        s[i] = torch.argmax(scores)
    return _mask_of(s, x.shape[0])


def _divprune_inputs(seed: int, n: int = 40, d: int = 16, kind: str = "gauss") -> torch.Tensor:
    g = _gen(seed)
    if kind == "gauss":
        return torch.randn(n, d, generator=g)
    if kind == "near_tie":  # few prototypes + tiny noise -> near-tied distances
        protos = torch.randn(5, d, generator=g)
        return protos[torch.randint(0, 5, (n,), generator=g)] + 1e-4 * torch.randn(n, d, generator=g)
    protos = torch.randn(3, d, generator=g)  # exact duplicates: exercises the re-pick quirk
    return protos[torch.randint(0, 3, (n,), generator=g)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["gauss", "near_tie", "dupes"])
def test_divprune_matches_reference(seed, kind):
    x = _divprune_inputs(seed, kind=kind)
    for ratio in (0.098, 0.25, 0.5):
        ref = _divprune_reference(x, ratio)
        got = divprune_select(x.unsqueeze(0), divprune_keep_count(x.shape[0], ratio))
        assert torch.equal(got[0], ref)


def test_divprune_count_rounding():
    assert divprune_keep_count(576, 0.098) == 56  # round(56.448)
    assert divprune_keep_count(25, 0.1) == 2  # round(2.5) -> 2 (half to even)


# ----------------------------------------------------------------------------------- CDPruner


def _cdpruner_reference(feat, img_emb, txt_emb, count, theta=None):
    """feat (1, N, D), img_emb (1, N, C), txt_emb (M, C): official encode_images arithmetic."""
    B, N, _ = feat.shape
    img_n = (feat / feat.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(img_n, img_n.transpose(1, 2))
    img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
    txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
    rel = torch.matmul(img_emb, txt_emb.t())
    rel = (-rel).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    kernel = rel.unsqueeze(2) * similarity * rel.unsqueeze(1)
    cis = torch.zeros((count, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    sel = torch.empty((count, B), dtype=torch.long)
    for i in range(count):
        j = torch.argmax(di2s, dim=-1)
        sel[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) / torch.sqrt(
            di2s[torch.arange(B), j]
        ).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    sel = torch.sort(sel.t()).values
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, sel, True)
    return mask[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("theta", [None, 0.5])
def test_cdpruner_matches_reference(seed, theta):
    g = _gen(seed)
    n, d, c, m = 36, 24, 12, 3
    feat = torch.randn(1, n, d, generator=g)
    if seed % 2:  # near-duplicate features
        feat = feat[:, torch.randint(0, 6, (n,), generator=g)] + 1e-3 * torch.randn(1, n, d, generator=g)
    img = torch.randn(1, n, c, generator=g)
    txt = torch.randn(m, c, generator=g)
    for count in (4, 9, 20):
        ref = _cdpruner_reference(feat, img, txt, count, theta)
        got = cdpruner_select(feat, img, txt.unsqueeze(0), count, theta=theta)
        assert torch.equal(got[0], ref)
        assert int(got.sum()) == count


# ---------------------------------------------------------------------------------- VisionZip


def _visionzip_reference(hidden, attn, metric, dominant_num, contextual_num):
    """hidden (1, 1+N, D) with CLS first, attn (1, H, 1+N, 1+N), metric (1, 1+N, dk)."""
    cls_attention = attn[:, :, 0, 1:]
    top = cls_attention.sum(dim=1).topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((1, 1), dtype=top.dtype), top], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant = hidden.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, hidden.shape[2])
    metric_f = metric[mask].view(1, hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_f = hidden.masked_select(mask.unsqueeze(-1)).view(1, hidden.shape[1] - (dominant_num + 1), hidden.shape[2])
    metric_n = metric_f / metric_f.norm(dim=-1, keepdim=True)
    R = metric_n.shape[1]
    step = max(1, R // contextual_num)
    target = torch.arange(0, R, step)[:contextual_num]
    others = ~torch.isin(torch.arange(R), target)
    sim = torch.bmm(metric_n[:, others, :], metric_n[:, target, :].transpose(1, 2))
    one_hot = torch.zeros(1, int(others.sum()), contextual_num, dtype=hidden_f.dtype)
    one_hot.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    agg = torch.bmm(one_hot.transpose(1, 2), hidden_f[:, others, :]) / counts
    contextual = hidden_f[:, target, :] + agg
    # positions (patch index, CLS excluded) of the filtered tokens and of the dominant patches
    filtered_pos = torch.nonzero(mask[0], as_tuple=False).flatten() - 1
    dominant_pos = torch.nonzero(~mask[0], as_tuple=False).flatten()[1:] - 1
    return dominant[0, 1:], dominant_pos, contextual[0], filtered_pos[target]


@pytest.mark.parametrize("seed", SEEDS)
def test_visionzip_matches_reference(seed):
    g = _gen(seed)
    n, d, heads, dk = 49, 16, 4, 8
    hidden = torch.randn(1, 1 + n, d, generator=g)
    attn = torch.softmax(torch.randn(1, heads, 1 + n, 1 + n, generator=g), dim=-1)
    keys = torch.randn(1, 1 + n, heads, dk, generator=g)
    if seed % 2:  # near-tied keys: many tokens share a direction
        keys = keys[:, torch.randint(0, 4, (1 + n,), generator=g)] * (1 + 1e-4 * torch.rand(1, 1 + n, 1, 1, generator=g))
    metric = keys.transpose(1, 2).mean(1)  # official raw_key_states (B, H, L, dk).mean(1)
    for dom, ctx in ((10, 5), (20, 7), (30, 10)):
        dom_v, dom_pos, ctx_v, ctx_pos = _visionzip_reference(hidden, attn, metric, dom, ctx)
        keep, values, dmask = visionzip_select(
            hidden[:, 1:], attn[:, :, 0, 1:], metric[:, 1:], dominant=dom, contextual=ctx
        )
        assert torch.equal(torch.nonzero(dmask[0]).flatten(), dom_pos)
        assert torch.equal(values[0, dom_pos], dom_v)
        ctx_mask = keep[0] & ~dmask[0]
        assert torch.equal(torch.nonzero(ctx_mask).flatten(), ctx_pos.sort().values)
        torch.testing.assert_close(values[0, ctx_pos], ctx_v, rtol=0, atol=0)
        # head-averaging inside the function gives the same result from (B, N, Hk, dk) keys
        keep4, values4, _ = visionzip_select(hidden[:, 1:], attn[:, :, 0, 1:], keys[:, 1:], dom, ctx)
        assert torch.equal(keep4, keep)


# ------------------------------------------------------------------------------------- DART


def _dart_reference(states, keys, start, n_img, topk, p_img=4, p_txt=4):
    """states (L, D) normed hidden states, keys (1, H, L, d): official get_retained_image_token."""
    flat = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)
    k_img = flat[0][start : start + n_img, :]
    k_txt = flat[0][start + n_img :, :]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(p_img).indices + start).tolist()
    query_indices = (torch.norm(k_txt, p=1, dim=-1).topk(p_txt).indices + start + n_img).tolist()
    chosen = set(image_indices + query_indices)
    remaining = set(range(start, start + n_img)) - set(image_indices)
    remaining_list = list(remaining)
    for item in list(chosen):
        vecs = states[remaining_list, :]
        neg = -torch.nn.functional.cosine_similarity(states[item, :], vecs, dim=-1)
        picked = [remaining_list[i] for i in neg.topk(topk).indices]
        chosen.update(picked)
        remaining.difference_update(picked)
        remaining_list = list(remaining)
    chosen.difference_update(query_indices)
    return _mask_of([i - start for i in chosen], n_img)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start", [35, 5])
def test_dart_matches_reference(seed, start):
    g = _gen(seed)
    n_img, n_txt, d, heads, dk = 60, 12, 16, 2, 4
    length = start + n_img + n_txt
    states = torch.randn(length, d, generator=g)
    if seed % 2:  # near-duplicate image states
        idx = torch.randint(start, start + 8, (n_img,), generator=g)
        states[start : start + n_img] = states[idx] + 1e-4 * torch.randn(n_img, d, generator=g)
    keys = torch.randn(1, heads, length, dk, generator=g)
    for budget in (16, 32, 40):
        topk = dart_token_topk(n_img, budget)
        ref = _dart_reference(states, keys, start, n_img, topk)
        vk = keys.permute(0, 2, 1, 3)  # (1, L, H, dk)
        keep, pivots = dart_select(
            states[start : start + n_img].unsqueeze(0),
            vk[:, start : start + n_img],
            states[start + n_img :].unsqueeze(0),
            vk[:, start + n_img :],
            budget=budget,
            image_token_start_index=start,
        )
        assert torch.equal(keep[0], ref)
        assert int(keep.sum()) == 4 + 8 * topk
        assert bool((pivots & ~keep).sum() == 0)


def test_dart_token_topk_rule():
    assert dart_token_topk(576, 128) == 16
    assert dart_token_topk(576, None, 0.778) == math.ceil(576 * (1 - 0.778) // 8) == 15
    assert dart_token_topk(576, 130) == 16


# ---------------------------------------------------------------------------------- VisPruner


def _vispruner_reference(feat, attn_cls, total, ratio):
    """feat (1, N, C), attn_cls (1, H, N): official encode_images loop with B = 1."""
    B, N, C = feat.shape
    imp_n = int(total * ratio)
    div_n = total - imp_n
    order = attn_cls.mean(dim=1).argsort(dim=-1, descending=True)
    important, residual = order[:, :imp_n], order[:, imp_n:]
    unit = feat / feat.norm(dim=-1, keepdim=True)
    while div_n > 0:
        R = residual.shape[1]
        r = min(8, R - div_n)
        if r <= 0:
            break
        toks = unit[torch.arange(B).unsqueeze(-1).expand(-1, R), residual]
        a, b = toks[..., ::2, :], toks[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat(
            [residual[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct], residual[..., 1::2]],
            dim=-1,
        )
    sel = torch.cat([important, residual], dim=-1) if div_n > 0 else important
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, sel, True)
    return mask[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_vispruner_matches_reference(seed):
    g = _gen(seed)
    n, c, heads = 64, 16, 4
    feat = torch.randn(1, n, c, generator=g)
    if seed % 2:
        feat = feat[:, torch.randint(0, 10, (n,), generator=g)] + 1e-3 * torch.randn(1, n, c, generator=g)
    attn = torch.softmax(torch.randn(1, heads, n, generator=g), dim=-1)
    for total, ratio in ((16, 0.5), (24, 0.5), (10, 0.4), (32, 1.0)):  # even residuals (official crashes on odd)
        ref = _vispruner_reference(feat, attn, total, ratio)
        keep, important = vispruner_select(feat, attn, total, important_ratio=ratio)
        assert torch.equal(keep[0], ref)
        assert int(keep.sum()) == total
        assert int(important.sum()) == int(total * ratio)


# ------------------------------------------------------------------------------ baselines


def test_pooling_windows_and_values():
    g = _gen(0)
    h, w, d = 6, 6, 5
    x = torch.randn(1, h * w, d, generator=g)
    assert pooled_grid_shape(24, 24, 64) == (8, 8)
    assert pooled_grid_shape(24, 24, 144) == (12, 12)
    assert pooled_grid_shape(24, 24, 192) == (14, 13)
    keep, values = pooling_select(x, (h, w), 4)
    assert int(keep.sum()) == 4
    kept = torch.nonzero(keep[0]).flatten().tolist()
    assert kept == [0, 3, 18, 21]
    grid = x[0].reshape(h, w, d)
    for pos, (r, c) in zip(kept, [(0, 0), (0, 3), (3, 0), (3, 3)]):
        torch.testing.assert_close(values[0, pos], grid[r : r + 3, c : c + 3].reshape(-1, d).mean(0))
    keep5, _ = pooling_select(x, (h, w), 9)
    assert int(keep5.sum()) == 9


def test_random_seeded_and_counts():
    valid = _ragged_valid(3, 30, 1)
    a = random_select(valid, 7, seed=3)
    b = random_select(valid, 7, seed=3)
    assert torch.equal(a, b)
    assert (a.sum(1) == 7).all() and not (a & ~valid).any()


# ------------------------------------------------------------------- ragged batch == per row


def _check_rows(fn, batch_args, valid, row_args_of):
    full = fn(*batch_args)
    full = full if isinstance(full, tuple) else (full,)
    for b in range(valid.shape[0]):
        row = fn(*row_args_of(b))
        row = row if isinstance(row, tuple) else (row,)
        for f, r in zip(full, row):
            assert torch.equal(f[b : b + 1], r)
    assert not (full[0] & ~valid).any()


@pytest.mark.parametrize("seed", range(3))
def test_ragged_batches_equal_per_row(seed):
    g = _gen(100 + seed)
    B, N, D, H, C, T = 3, 40, 12, 4, 8, 6
    valid = _ragged_valid(B, N, seed)
    prompt_valid = torch.rand(B, T, generator=g) > 0.2
    prompt_valid[:, :4] = True
    x = _snap(torch.randn(B, N, D, generator=g), 0.25)
    attn = _snap(torch.softmax(torch.randn(B, H, N, generator=g), -1), 0.01)
    keys = torch.randn(B, N, H, C, generator=g)
    prompt = torch.randn(B, T, D, generator=g)
    pkeys = torch.randn(B, T, H, C, generator=g)
    clip_v = torch.randn(B, N, C, generator=g)
    clip_t = torch.randn(B, 3, C, generator=g)
    counts = torch.tensor([9, 5, 7])
    s = lambda t, b: t[b : b + 1]  # noqa: E731

    _check_rows(lambda *a: fastv_select(*a), (attn, counts, valid), valid, lambda b: (s(attn, b), counts[b], s(valid, b)))
    _check_rows(lambda *a: pdrop_select(*a), (attn, counts, valid), valid, lambda b: (s(attn, b), counts[b], s(valid, b)))
    _check_rows(divprune_select, (x, counts, valid), valid, lambda b: (s(x, b), counts[b], s(valid, b)))
    _check_rows(
        lambda *a: cdpruner_select(a[0], a[1], a[2], a[3], a[4]),
        (x, clip_v, clip_t, counts, valid),
        valid,
        lambda b: (s(x, b), s(clip_v, b), s(clip_t, b), counts[b], s(valid, b)),
    )
    _check_rows(
        lambda *a: visionzip_select(a[0], a[1], a[2], 5, 3, a[3]),
        (x, attn, keys, valid),
        valid,
        lambda b: (s(x, b), s(attn, b), s(keys, b), s(valid, b)),
    )
    _check_rows(
        lambda *a: vispruner_select(a[0], a[1], a[2], a[3]),
        (x, attn, counts + 5, valid),
        valid,
        lambda b: (s(x, b), s(attn, b), counts[b] + 5, s(valid, b)),
    )
    _check_rows(
        lambda *a: dart_select(a[0], a[1], a[2], a[3], a[4], a[5], budget=8, pivot_image_token=2, pivot_text_token=2),
        (x, keys, prompt, pkeys, valid, prompt_valid),
        valid,
        lambda b: (s(x, b), s(keys, b), s(prompt, b), s(pkeys, b), s(valid, b), s(prompt_valid, b)),
    )
    _check_rows(random_select, (valid, counts, 5), valid, lambda b: (s(valid, b), counts[b], 5))
    # a ragged row gives the same result as its dense valid slice alone
    pos = torch.nonzero(valid[1]).flatten()
    dense = divprune_select(x[1:2, pos], int(counts[1]))
    assert torch.equal(divprune_select(x, counts, valid)[1, pos], dense[0])
    assert torch.equal(topk_keep(attn.mean(1), counts, valid)[1, pos], topk_keep(attn[1:2, :, pos].mean(1), int(counts[1]))[0])


def test_cosine_matrix_is_plain_normalised_matmul():
    x = torch.randn(2, 5, 3, generator=_gen(0))
    u = x / x.norm(dim=-1, keepdim=True)
    assert torch.equal(cosine_matrix(x), u @ u.transpose(-1, -2))
