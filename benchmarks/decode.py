"""Decode benchmark: time per output token with and without pruning (the shorter KV cache).

    python benchmarks/decode.py                          # CPU: 2-layer LLaVA-1.5-7B slice, budgets 576/64
    python benchmarks/decode.py --device cuda --dtype bfloat16 --layers 4 --batch 1 8

Time per token = (time of generate with N new tokens - time of generate with 1 new token) / (N - 1),
so the prefill is excluded; measured in one run for every budget, with the ratio to unpruned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import PROFILES, batch_inputs, build_slice, describe_device, time_call  # noqa: E402

from vtprune import framework  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="llava-1.5-7b", choices=sorted(PROFILES), help="model shape (benchmarks/_harness.py)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[576, 64])
    parser.add_argument("--recipe", default="zspaprune")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device(args.device)
    slice_ = build_slice(args.profile, args.layers, args.vision_layers, args.device, getattr(torch, args.dtype))
    model = slice_.model
    print(f"{args.profile} slice, {args.layers} decoder layers, {args.dtype} on {describe_device(device)}")
    rows = []
    for batch in args.batch:
        inputs = batch_inputs(slice_, batch)
        baseline = None
        for budget in args.budgets:
            def generate(count: int):
                with torch.no_grad():
                    return model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)

            with framework.prune(model, args.recipe, budget=budget):
                long = time_call(lambda: generate(args.new_tokens), device, args.repeats)
                short = time_call(lambda: generate(1), device, args.repeats)
            per_token = (long - short) / (args.new_tokens - 1)
            baseline = per_token if baseline is None else baseline
            rows.append({"batch": batch, "budget": budget, "seconds_per_token": per_token, "ratio_to_first": per_token / baseline})
            print(f"B={batch} budget={budget:<4} {per_token * 1e3:8.1f} ms/token  ({per_token / baseline:.3f}x the first budget)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": describe_device(device), "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
