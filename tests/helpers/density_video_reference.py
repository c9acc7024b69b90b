"""Plain, loop-style re-implementations of the official FastVID (LunarShen/FastVID @ a40a109c,
``modeling_qwen2.py`` FastVID block) and HoliTom (cokeshao/HoliTom @ e9b2972f, ``holitom/llava_arch.py``,
``holitom/modeling_qwen2.py``) functions, written from the official code for the tests: one token at a time where
the official code is batched, same draws of tie noise (one ``torch.rand`` per official call, same generator)."""

from __future__ import annotations

import math

import torch

__all__ = ["ref_dpc", "ref_fastvid", "ref_holitom", "ref_inner_merge"]


def ref_dpc(x, k, gen):
    """Official cluster_dpc_knn / FastVID density for groups x (G, n, D): score (G, n), dist (G, n, n)."""
    groups, n, dim = x.shape
    dist = torch.cdist(x.float(), x.float()) / (dim ** 0.5)
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=gen, dtype=density.dtype) * 1e-6
    score = torch.zeros(groups, n)
    for g in range(groups):
        dmax = float(dist[g].max())
        for i in range(n):
            best = dmax
            for j in range(n):
                if density[g, j] > density[g, i] and dist[g, i, j] < best:
                    best = float(dist[g, i, j])
            score[g, i] = best * density[g, i]
    return score, dist


def ref_fastvid(tokens, salience, glob, ratio, c=8, tau=0.9, d=0.4, p=4, beta=0.6, gen=None):
    """Returns {(t, s): value} of the kept tokens (t frame, s index in the frame)."""
    t_len, n, dim = tokens.shape
    g = glob / glob.norm(dim=1, keepdim=True)
    sims = [float((g[i] * g[i + 1]).sum()) for i in range(t_len - 1)]
    cuts = set(sorted(range(t_len - 1), key=lambda i: (sims[i], i))[: min(c - 1, t_len - 1)])
    cuts |= {i for i in range(t_len - 1) if sims[i] < tau}
    segments, begin = [], 0
    for i in range(t_len):
        if i in cuts or i == t_len - 1:
            segments.append(i - begin + 1)
            begin = i + 1
    retain = int(n * ratio)
    salient = retain - int(retain * d)
    context = retain - salient
    counts = []
    for length in segments:
        per = (context * length) // math.ceil(length / p)
        counts += [per if (length - 1 - i) % p == 0 else 0 for i in range(length)]
    out = {}
    filtered = []
    for t in range(t_len):
        top = torch.topk(salience[t], salient).indices.tolist()
        for s in top:
            out[(t, s)] = tokens[t, s].clone()
        filtered.append([s for s in range(n) if s not in top])
    if context == 0:
        return out
    feats = torch.stack([tokens[t, filtered[t]] for t in range(t_len)])
    score, _ = ref_dpc(feats, min(4, n - salient), gen)

    def merge(anchor_ids, pool):  # anchor_ids: [(t, s)], pool: list of vectors
        anchors = [tokens[t, s] for t, s in anchor_ids]
        groups = {i: [] for i in range(len(anchors))}
        for v in pool:
            sims_v = [float((v / v.norm()) @ (a / a.norm())) for a in anchors]
            groups[max(range(len(anchors)), key=lambda i: (sims_v[i], -i))].append(v)
        for i, key in enumerate(anchor_ids):
            cnt = len(groups[i])
            w = max(1 / (cnt + 1), beta)
            mean = torch.stack(groups[i]).mean(0) if cnt else torch.zeros(dim)
            out[key] = w * anchors[i] + (1 - w) * mean

    for t in range(t_len):
        if counts[t] == context:
            local = torch.topk(score[t], context).indices.tolist()
            merge([(t, filtered[t][j]) for j in local], [tokens[t, s] for s in filtered[t]])
    start = 0
    for length in segments:
        if length > 1:
            k = counts[start + length - 1]
            pool = [tokens[t, s] for t in range(start, start + length) for s in filtered[t]]
            for t in range(start, start + length):
                if counts[t] > context:
                    local = torch.topk(score[t], k).indices.tolist()
                    merge([(t, filtered[t][j]) for j in local], pool)
        start += length
    return out


def ref_holitom(tokens, attn, ratio, tau=0.8, beta=0.6, gen=None, k_dpc=7):
    """HoliTom outer merging with D = 0. Returns ({(t, s): value} kept, windows)."""
    t_len, n, dim = tokens.shape
    normed = torch.nn.functional.normalize(tokens.float(), dim=-1)
    sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)

    def removed(s, e):  # (e - s) * tokens similar over all transitions s..e-1
        return (e - s) * sum(1 for j in range(n) if all(float(sim[t, j]) > tau for t in range(s, e)))

    dp, prev = [0.0] * t_len, [0] * t_len
    for i in range(t_len):
        best, best_j = (dp[i - 1] if i > 0 else 0.0), i
        for size in range(2, i + 2):
            j = i - size
            value = (dp[j] if j >= 0 else 0.0) + removed(j + 1, i)
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], t_len - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    windows = windows[::-1]
    total = t_len * n
    r = min(ratio / ((total - dp[-1]) / total), 1)
    out = {}
    for s, e in windows:
        static = [j for j in range(n) if e > s and all(float(sim[t, j]) > tau for t in range(s, e))]
        dynamic = [j for j in range(n) if j not in static]
        keep_n = round(math.ceil(len(dynamic) * r) * 1.0)
        for t in range(s, e + 1):
            if keep_n > 0:
                for j in torch.topk(attn[t, dynamic], keep_n).indices.tolist():
                    out[(t, dynamic[j])] = tokens[t, dynamic[j]].clone()
        cluster_num = round(len(static) * r)
        if e > s and cluster_num > 0:
            mean = torch.stack([tokens[s : e + 1, j].mean(0) for j in static])
            score, dist = ref_dpc(mean.unsqueeze(0), min(k_dpc, cluster_num), gen)
            centres = sorted(torch.topk(score[0], cluster_num).indices.tolist())
            members = {ci: [] for ci in centres}
            for i2 in range(len(static)):
                if i2 not in centres:
                    members[min(centres, key=lambda ci: (float(dist[0, i2, ci]), ci))].append(mean[i2])
            for ci in centres:
                value = beta * mean[ci] + (1 - beta) * torch.stack(members[ci]).mean(0) if members[ci] else mean[ci]
                out[(s, static[ci])] = value
    return out, windows


def ref_inner_merge(hidden, scores, keep_count):
    """Official in-place loop: returns {position: value} of kept tokens."""
    h = hidden.clone()
    top = scores.topk(keep_count).indices
    others = [i for i in range(hidden.shape[0]) if i not in top.tolist()]
    for i in others:
        sims = [float(hidden[i] @ hidden[t] / (hidden[i].norm() * hidden[t].norm())) for t in top.tolist()]
        best = top[max(range(len(sims)), key=lambda q: (sims[q], -q))]
        h[best] = (h[best] + h[i]) / 2
    return {int(t): h[t] for t in top.tolist()}
