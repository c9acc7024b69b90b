"""SparseVLM ``select`` before / after issue 14's distance change, interleaved in one process.

The recycled tokens' pairwise distances (``functional.sparsevlm.pairwise_distances``) come from ``torch.pdist``
(after) instead of ``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")`` (before); both are the
official ``(x1 - x2).norm`` arithmetic (differences, no matrix-product expansion). Prints each one's median
``select`` time at N visual tokens (D = 4096 by default, K = N / 9, SparseVLM's 64-token pair scale 0.8 / bias 0, as
``benchmarks/selection.py``) as a share of the unpruned prefill of the 2-layer LLaVA-1.5-7B-shaped slice measured
in the same run, and whether both select the same tokens:

    python benchmarks/sparsevlm_distances.py --tokens 576 --repeats 7 --threads 1
    python benchmarks/sparsevlm_distances.py --tokens 2880 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from vtprune.framework import build_registry, compose
from vtprune.strategies.functional import sparsevlm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _opcount import selection_signals  # noqa: E402
from selection import LLAVA_PROFILES, RECIPE_OPTIONS, prefill_seconds  # noqa: E402


def cdist_exact(x: torch.Tensor) -> torch.Tensor:
    """(M, M): the distances as before issue 14 (cdist's exact mode)."""
    return torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0]


@contextmanager
def distances(function: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """``functional.sparsevlm.pairwise_distances`` replaced by ``function`` inside the block (restored after)."""
    original = sparsevlm.pairwise_distances
    sparsevlm.pairwise_distances = function
    try:
        yield
    finally:
        sparsevlm.pairwise_distances = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=4096, help="width D of the random signals")
    parser.add_argument("--prefill-layers", type=int, default=2, help="decoder layers of the prefill slice")
    parser.add_argument("--prefill-profile", default="llava-1.5-7b", choices=LLAVA_PROFILES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"before (cdist exact)": cdist_exact, "after (pdist)": sparsevlm.pairwise_distances}
    pipeline = compose("sparsevlm", registry=build_registry(autoload=False), **RECIPE_OPTIONS["sparsevlm"])
    for tokens in args.tokens:
        signals, kept = selection_signals(1, tokens, args.dim), tokens // 9
        prefill = prefill_seconds(tokens, 1, args.prefill_layers, "cpu", args.prefill_profile)["seconds"]
        print(f"N={tokens} unpruned prefill of the {args.prefill_layers}-layer slice: {prefill:.2f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        picks = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, function in variants.items():
                with distances(function):
                    start = time.perf_counter()
                    picks[name] = pipeline.select(signals, kept)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"N={tokens} {name:<22} {median * 1e3:9.1f} ms = {100 * median / prefill:5.2f}% of prefill "
                  f"(median of {len(samples)})")
        before, after = picks.values()
        same = torch.equal(before.indices, after.indices) and torch.equal(before.mask, after.mask)
        print(f"N={tokens} same selection: {same}; merged values differ by at most "
              f"{float((before.values - after.values).abs().max()):.2e}", flush=True)


if __name__ == "__main__":
    main()
