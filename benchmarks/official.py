"""vtprune's ``Pipeline.select`` against each peer's official selection step, on identical inputs.

For every peer with official code (FastV, CDPruner, DivPrune, VisionZip, VisPruner, DART, PruMerge, PruMerge+,
G-Prune, FitPrune) it builds one set of random LLaVA-1.5-shaped tensors, hands the official step (``benchmarks/_official.py``: our own
op-for-op transcription of the official code as it executes, file / lines / commit cited there; the
official modules themselves import whole model stacks and are not vendored) the tensors the official
code holds at that point, and vtprune's ``select`` the same values as `Signals`, checks that both keep
exactly the same tokens (and, for VisionZip and PruMerge, the same merged values; the script exits non-zero if any
differ), then times the two interleaved (alternating which runs first) and prints the medians and
official / vtprune (> 1: vtprune is faster).

What each side does (from the tensors each one receives to its kept indices):

* official: the selection code between the model's tensors and the kept index / mask tensor, including
  its own bookkeeping (FastV's and DivPrune's concatenation with the text positions and sort; VisionZip's
  head mean of the key states and merge; DART's key permute); the model forward around it is not timed;
* vtprune: ``pipeline.select(signals, K)`` -> `Selection` (validation, budget, stages, indices / mask /
  critical / values), with ``visual_mask`` True everywhere as the adapters pass it; the adapter's hooks
  that fill `Signals` are not timed.

FastV is given two ways: ``fastv`` hands the official code the last query row of layer K-1's attention
(1, H, 1, S), the row vtprune's adapter hands ``select`` (like with like: the same ops on the same values);
``fastv (full map)`` hands it the whole (1, H, S, S) map it receives from the model with
``output_attentions=True`` and averages over heads before taking the last row (only up to
``--full-map-max-tokens``).

PruMerge / PruMerge+ run in the CLIP tower at its width (``--clip-width``, CLIP-L 1024): the official step from
the CLS row of the hooked layer's one-head attention, the hooked keys (CLS first) and the penultimate features to
its merged tokens (its IQR count in NumPy on the host, its per-token loop); vtprune's ``select`` gets the same row,
keys and features with a budget of N - 1 (a cap above the adaptive count, which both then keep). G-Prune: one
image graph over the N projected tokens (width ``--dim``), keeping K. FitPrune: one pruning layer's ranking and
deletion mask deleting N - K tokens; ``fitprune`` hands the official block the image and text query rows over the
image columns (1, H, N + T, N), the values vtprune's adapter hands ``select`` as ``visual_attention`` /
``prompt_attention`` (like with like), ``fitprune (full map)`` the whole (1, H, S, S) map its layer holds (up to
``--full-map-max-tokens``). VTW has no row: it withdraws every visual token after a fixed layer, with no ranking
or selection step to time.

    python benchmarks/official.py --threads 1                              # N 576 -> K 64 and 2880 -> 320, D 4096
    python benchmarks/official.py --tokens 576 --methods fastv cdpruner --json official.json
    python benchmarks/official.py --methods prumerge prumerge_plus gprune fitprune "fitprune (full map)"
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from vtprune.framework import Signals, build_registry, compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _official as official  # noqa: E402
from _opcount import count_ops, selection_signals  # noqa: E402

#: System-prompt tokens before the image in the LLaVA-1.5 settings of FastV, DivPrune and DART.
SYS_LENGTH = 35
METHODS = (
    "fastv", "fastv (full map)", "cdpruner", "divprune", "visionzip", "vispruner", "dart",
    "prumerge", "prumerge_plus", "gprune", "fitprune", "fitprune (full map)",
)


@dataclasses.dataclass
class Case:
    """One comparison: two zero-argument callables and a check of their results (raises if they differ)."""

    method: str
    run_official: Callable[[], object]
    run_vtprune: Callable[[], object]
    check: Callable[[object, object], None]


def _kept(selection) -> list[int]:
    return selection.indices[0][selection.mask[0]].tolist()


def _same(method: str, official_kept: list[int], vtprune_kept: list[int]) -> None:
    if sorted(official_kept) != sorted(vtprune_kept):
        only_official = sorted(set(official_kept) - set(vtprune_kept))
        only_vtprune = sorted(set(vtprune_kept) - set(official_kept))
        raise AssertionError(
            f"{method}: official and vtprune keep different tokens ({len(official_kept)} vs {len(vtprune_kept)}; "
            f"only official: {only_official[:10]}, only vtprune: {only_vtprune[:10]})"
        )


def _image_span(keep: torch.Tensor, tokens: int) -> list[int]:
    """Image positions (0-based within the image) in a full-sequence keep index tensor."""
    inside = (keep >= SYS_LENGTH) & (keep < SYS_LENGTH + tokens)
    return (keep[inside] - SYS_LENGTH).tolist()


def build_cases(
    signals: Signals, kept: int, methods: list[str], registry, full_map_max_tokens: int, clip_width: int = 1024
) -> list[Case]:
    """The comparisons for one input (batch of one): each official step's inputs built from ``signals``."""
    tokens = signals.num_tokens
    text = signals.prompt.shape[1]
    seq = SYS_LENGTH + tokens + text
    generator = torch.Generator().manual_seed(1)
    cases = []

    given = dataclasses.replace(signals, visual_mask=torch.ones(1, tokens, dtype=torch.bool))  # as adapters pass it

    def pipeline(name: str, **params):
        chosen = compose(name, registry=registry, **params)
        return lambda: chosen.select(given, kept)

    if "fastv" in methods or "fastv (full map)" in methods:
        heads = signals.attention.shape[1]
        row = torch.rand(1, heads, 1, seq, generator=generator)  # (1, H, 1, S): the last query row
        row[..., SYS_LENGTH : SYS_LENGTH + tokens] = signals.attention.unsqueeze(2)
        check = lambda keep, sel: _same("fastv", _image_span(keep, tokens), _kept(sel))  # noqa: E731
        if "fastv" in methods:
            cases.append(Case("fastv", lambda: official.fastv_official(row, SYS_LENGTH, tokens, kept), pipeline("fastv"), check))
        if "fastv (full map)" in methods and tokens <= full_map_max_tokens:
            full = torch.rand(1, heads, seq, seq, generator=generator)  # (1, H, S, S)
            full[:, :, -1:, :] = row
            cases.append(Case("fastv (full map)", lambda: official.fastv_official(full, SYS_LENGTH, tokens, kept), pipeline("fastv"), check))
    if "cdpruner" in methods:
        cases.append(Case(
            "cdpruner",
            lambda: official.cdpruner_official(signals.visual, signals.clip_visual, signals.clip_text[0], kept),
            pipeline("cdpruner"),
            lambda mask, sel: _same("cdpruner", mask[0].nonzero().flatten().tolist(), _kept(sel)),
        ))
    if "divprune" in methods:
        embeds = torch.cat([torch.randn(1, SYS_LENGTH, signals.visual.shape[-1], generator=generator), signals.visual, signals.prompt], 1)
        cases.append(Case(
            "divprune",
            lambda: official.divprune_official(embeds, SYS_LENGTH, tokens, kept / tokens),
            pipeline("divprune"),
            lambda keep, sel: _same("divprune", _image_span(keep, tokens), _kept(sel)),
        ))
    if "visionzip" in methods:
        cases.append(_visionzip_case(signals, kept, pipeline("visionzip"), registry, generator))
    if "vispruner" in methods:
        cases.append(Case(
            "vispruner",
            lambda: official.vispruner_official(signals.visual, signals.cls_attention, kept, 0.5),
            pipeline("vispruner"),
            lambda mask, sel: _same("vispruner", mask[0].nonzero().flatten().tolist(), _kept(sel)),
        ))
    if "dart" in methods:
        width = signals.visual.shape[-1]
        states = torch.cat([torch.randn(1, SYS_LENGTH, width, generator=generator), signals.visual, signals.prompt], 1)  # (1, S, D)
        sys_keys = torch.randn(1, SYS_LENGTH, *signals.visual_keys.shape[2:], generator=generator)
        keys = torch.cat([sys_keys, signals.visual_keys, signals.prompt_keys], 1).permute(0, 2, 1, 3).contiguous()  # (1, Hk, S, dk)
        cases.append(Case(
            "dart",
            lambda: official.dart_official(states, keys, SYS_LENGTH, tokens, kept),
            pipeline("dart", faithful=True),  # the official count: image pivots + 8 * (K // 8)
            lambda positions, sel: _same("dart", (positions - SYS_LENGTH).tolist(), _kept(sel)),
        ))
    for name in ("prumerge", "prumerge_plus"):
        if name in methods:
            cases.append(_prumerge_case(name, tokens, clip_width, registry, generator))
    if "gprune" in methods:
        cases.append(Case(
            "gprune",
            lambda: official.gprune_official(signals.visual[0], kept),
            pipeline("gprune"),
            lambda keep, sel: _same("gprune", keep.tolist(), _kept(sel)),
        ))
    if "fitprune" in methods or "fitprune (full map)" in methods:
        cases.extend(_fitprune_cases(given, kept, methods, registry, generator, full_map_max_tokens))
    return cases


def _prumerge_case(name: str, tokens: int, width: int, registry, generator) -> Case:
    """PruMerge / PruMerge+ in the CLIP tower (width ``width``: 1024 for CLIP-L): the official step gets the CLS row of
    the hooked layer's one-head attention, the hooked keys (CLS first) and the features; vtprune the same row as
    ``cls_attention`` (B, 1, N), the patch keys as one full-width head and the features. The budget is ``N - 1``, a
    cap above the adaptive count (the official method has none), so both keep the official count."""
    features = torch.randn(1, tokens, width, generator=generator)  # (1, N, C) penultimate features
    keys = torch.randn(1, tokens + 1, width, generator=generator)  # (1, N + 1, C) hooked k_proj output
    cls_attn = torch.softmax(torch.randn(1, tokens + 1, generator=generator), dim=-1)[:, 1:]  # (1, N): CLS row, CLS column cut
    signals = Signals(
        visual=features, cls_attention=cls_attn.unsqueeze(1), visual_keys=keys[:, 1:].unsqueeze(2),
        visual_mask=torch.ones(1, tokens, dtype=torch.bool),
    )
    plus = name == "prumerge_plus"
    chosen = compose(name, registry=registry)

    def check(result, selection) -> None:
        updated, idx = result
        order = idx[0].tolist()
        extra = sorted(set(range(tokens)) - set(order))[-1]  # vtprune writes the extra token at the last pruned slot
        _same(name, order + [extra], _kept(selection))
        slots = {p: i for i, p in enumerate(_kept(selection))}
        ours = selection.values[0, [slots[p] for p in order + [extra]]]  # (L + 1, C) in the official order
        if not torch.allclose(ours, updated[0], rtol=1e-5, atol=1e-5):
            raise AssertionError(f"{name}: the merged token values differ")

    return Case(
        name,
        lambda: official.prumerge_official(features, cls_attn, keys, plus),
        lambda: chosen.select(signals, tokens - 1),
        check,
    )


def _fitprune_cases(given: Signals, kept: int, methods: list[str], registry, generator, full_map_max_tokens: int) -> list[Case]:
    """FitPrune at one pruning layer deleting ``N - K`` tokens: ``fitprune`` hands the official block the image and
    text query rows over the image columns (1, H, N + T, N), whose two parts vtprune's ``select`` gets as
    ``visual_attention`` / ``prompt_attention`` (views of the same memory; like with like); ``fitprune (full map)``
    hands it the whole (1, H, S, S) map the official layer holds (its head max runs over all of it)."""
    tokens, text = given.num_tokens, given.prompt.shape[1]
    heads = given.prompt_attention.shape[1]
    seq = SYS_LENGTH + tokens + text
    full = None
    if "fitprune (full map)" in methods and tokens <= full_map_max_tokens:
        full = torch.rand(1, heads, seq, seq, generator=generator) / seq  # (1, H, S, S)
        block = full[:, :, SYS_LENGTH:, SYS_LENGTH : SYS_LENGTH + tokens].contiguous()  # (1, H, N + T, N)
    else:
        block = torch.rand(1, heads, tokens + text, tokens, generator=generator) / seq  # (1, H, N + T, N)
    signals = dataclasses.replace(given, visual_attention=block[:, :, :tokens], prompt_attention=block[:, :, tokens:])
    chosen = compose("fitprune", registry=registry)
    run_vtprune = lambda: chosen.select(signals, kept)  # noqa: E731
    deletions = tokens - kept
    cases = []
    if "fitprune" in methods:
        cases.append(Case(
            "fitprune",
            lambda: official.fitprune_official(block, 0, tokens, deletions),
            run_vtprune,
            lambda keep, sel: _same("fitprune", keep.nonzero().flatten().tolist(), _kept(sel)),
        ))
    if full is not None:
        cases.append(Case(
            "fitprune (full map)",
            lambda: official.fitprune_official(full, SYS_LENGTH, tokens, deletions),
            run_vtprune,
            lambda keep, sel: _same("fitprune", keep[SYS_LENGTH : SYS_LENGTH + tokens].nonzero().flatten().tolist(), _kept(sel)),
        ))
    return cases


def _visionzip_case(signals: Signals, kept: int, run_vtprune, registry, generator) -> Case:
    """VisionZip: the official step holds CLS + patches; vtprune's patches only (``keep_cls=False``), so the
    official ``dominant_num`` is vtprune's dominant patch count (its allocator's split of K)."""
    tokens, width = signals.num_tokens, signals.visual.shape[-1]
    totals = torch.tensor([kept])
    allocator = compose("visionzip", registry=registry).budget
    dominant = int(allocator.allocate(totals, torch.ones(1, tokens, dtype=torch.bool), None).critical[0])
    contextual = kept - dominant
    heads = signals.cls_attention.shape[1]
    attn = torch.rand(1, heads, tokens + 1, tokens + 1, generator=generator)  # (1, H, N + 1, N + 1)
    attn[:, :, 0, 1:] = signals.cls_attention
    hidden = torch.cat([torch.randn(1, 1, width, generator=generator), signals.visual], 1)  # (1, N + 1, D)
    cls_key = torch.randn(1, 1, *signals.visual_keys.shape[2:], generator=generator)
    keys = torch.cat([cls_key, signals.visual_keys], 1).permute(0, 2, 1, 3).contiguous()  # (1, Hk, N + 1, dk)

    def check(result, selection) -> None:
        saved, all_indices = result
        dominant_patches = (all_indices[0, 1:] - 1).tolist()
        rest = [p for p in range(tokens) if p not in set(dominant_patches)]
        step = max(1, len(rest) // contextual)
        centres = [rest[i] for i in range(0, len(rest), step)[:contextual]]
        _same("visionzip", dominant_patches + centres, _kept(selection))
        slots = {p: i for i, p in enumerate(_kept(selection))}
        merged = selection.values[0, [slots[p] for p in centres]]  # (c, D)
        if not torch.allclose(merged, saved[0, 1 + dominant :], rtol=1e-5, atol=1e-5):
            raise AssertionError("visionzip: the contextual (merged) token values differ")

    return Case("visionzip", lambda: official.visionzip_official(attn, hidden, keys, dominant, contextual), run_vtprune, check)


def time_interleaved(case: Case, repeats: int, target_s: float, max_repeats: int) -> dict:
    """Medians over ``n`` interleaved runs (first-runner alternates); ``n`` = ``repeats`` at least, more for fast steps
    (about ``target_s`` seconds in all, at most ``max_repeats``)."""
    case.run_official(), case.run_vtprune()  # warm-up
    pairs = []
    for _ in range(3):  # the fastest of three pairs sets the run count (a preempted pair would make it tiny)
        start = time.perf_counter()
        case.run_official(), case.run_vtprune()
        pairs.append(time.perf_counter() - start)
        if pairs[-1] > target_s / repeats:
            break
    pair = min(pairs)
    n = max(repeats, min(max_repeats, int(target_s / max(pair, 1e-9))))
    samples = {"official": [], "vtprune": []}
    order = [("official", case.run_official), ("vtprune", case.run_vtprune)]
    gc.collect()
    gc.disable()
    try:
        for index in range(n):
            for side, function in order if index % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                function()
                samples[side].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {"runs": n, "official_s": statistics.median(samples["official"]), "vtprune_s": statistics.median(samples["vtprune"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880], help="N image tokens (K = N / 9 kept)")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--clip-width", type=int, default=1024, help="PruMerge's CLIP width (features and keys; CLIP-L 1024)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=7, help="least interleaved runs per side")
    parser.add_argument("--target-seconds", type=float, default=3.0, help="more runs for fast steps, about this long per case")
    parser.add_argument("--max-repeats", type=int, default=4000)
    parser.add_argument("--full-map-max-tokens", type=int, default=576, help="largest N for the 'fastv (full map)' row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-ops", action="store_true", help="also count each side's dispatched ops (one call)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    registry = build_registry(autoload=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"float32, B = 1, D = {args.dim}")
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            kept = max(1, tokens // 9)
            signals = selection_signals(1, tokens, args.dim, seed=args.seed)
            for case in build_cases(signals, kept, args.methods, registry, args.full_map_max_tokens, args.clip_width):
                case.check(case.run_official(), case.run_vtprune())  # raises when the kept tokens differ
                row = {"method": case.method, "N": tokens, "K": kept, "D": args.dim, "same_selection": True}
                row.update(time_interleaved(case, args.repeats, args.target_seconds, args.max_repeats))
                row["official_over_vtprune"] = row["official_s"] / row["vtprune_s"]
                counted = ""
                if args.count_ops:  # dispatched ATen ops of one call per side (benchmarks/_opcount.py)
                    row["official_ops"] = count_ops(case.run_official)[1].total
                    row["vtprune_ops"] = count_ops(case.run_vtprune)[1].total
                    counted = f"  ops {row['official_ops']} / {row['vtprune_ops']}"
                rows.append(row)
                print(f"N={tokens:>5} K={kept:>4} {case.method:<19} official {row['official_s'] * 1e3:9.3f} ms  "
                      f"vtprune {row['vtprune_s'] * 1e3:9.3f} ms  official/vtprune {row['official_over_vtprune']:5.2f}  "
                      f"same selection  ({row['runs']} runs each){counted}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
