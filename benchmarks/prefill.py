"""Prefill benchmark: what pruning costs and saves, against the ideal, measured in one run.

For a 7B-shaped model slice (``--profile llava-1.5-7b`` or ``qwen2.5-vl-7b``: the published
dimensions, a few decoder layers, random weights) and each budget x placement x batch size it
measures:

- prefill wall time of the unpruned model, of the pruned model (vtprune hooks), and of the ideal:
  the same vision tower + projector, then the same decoder layers fed only the tokens each layer
  keeps (k layers at full length and the rest at the kept length for layer(k)), with no selection;
- peak memory, KV-cache bytes after prefill (measured from the cache) and analytic prefill FLOPs;
- the ratios pruned / ideal (targets: time and KV <= 1.15) and the selection overhead (time of
  ``Pipeline.select`` on the same tensors) as a fraction of the unpruned prefill.

    python benchmarks/prefill.py                                   # CPU defaults: 2 layers, batch 1
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --layers 4 --batch 1 8
    python benchmarks/prefill.py --json results/prefill.json --png results/prefill.png
    python benchmarks/prefill.py --profile qwen2.5-vl-7b --budgets 576 64     # 672 px -> 576 merged tokens
    python benchmarks/prefill.py --torch-profile 15 --budgets 64 --placements pre_llm   # where the time goes

With weights and a GPU, ``--full`` uses all 32 layers (same script; the slice only cuts layers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    PROFILES,
    batch_inputs,
    build_slice,
    cache_bytes,
    describe_device,
    output_cache,
    peak_memory,
    synchronize,
    time_call,
)

from vtprune import framework  # noqa: E402
from vtprune.experiments.cost import kv_cache_bytes, prefill_flops  # noqa: E402
from vtprune.framework import Signals  # noqa: E402


def placement_recipe(placement: str, layers: int) -> str:
    """ZSPAPrune at the given placement, derived from the layer count (no fixed layer numbers)."""
    if placement == "pre_llm":
        return "zspaprune"
    if placement == "layer":
        return f"zspaprune+layer(k={max(1, min(2, layers - 1))})"
    if placement == "schedule":
        points = sorted({max(1, round(layers * f)) for f in (0.25, 0.5, 0.75)} - {layers})
        return f"zspaprune+schedule(layers={points},ratio=0.5)"
    raise ValueError(placement)


def ideal_prefill(model, inputs: dict, per_layer_lengths: list[int], image_span: tuple[int, int]) -> torch.Tensor:
    """The ideal: vision tower + projector, then each decoder layer on the tokens it keeps; returns the last
    token's logits (B, 1, V) (with every token kept: the model's own)."""
    if "image_grid_thw" in inputs:
        return ideal_prefill_qwen(model, inputs, per_layer_lengths, image_span)
    core = model.model
    features = model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    language = core.language_model
    embeds = language.embed_tokens(inputs["input_ids"])  # (B, L, D)
    start, end = image_span
    image = features if not isinstance(features, (list, tuple)) else torch.stack(list(features))
    image = image.reshape(embeds.shape[0], -1, embeds.shape[-1])  # (B, N, D)
    hidden = torch.cat([embeds[:, :start], image, embeds[:, end:]], dim=1)
    current = hidden.shape[1]
    for layer, length in zip(language.layers, per_layer_lengths):
        if length != current:  # drop the last (current - length) image tokens: same gather cost as a real drop
            keep = torch.arange(length, device=hidden.device)
            hidden = hidden.index_select(1, keep)
            current = length
        positions = torch.arange(current, device=hidden.device).unsqueeze(0)
        embeddings = language.rotary_emb(hidden, position_ids=positions)
        hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
    hidden = language.norm(hidden[:, -1:])
    return model.lm_head(hidden)  # (B, 1, V)


def ideal_prefill_qwen(model, inputs: dict, per_layer_lengths: list[int], image_span: tuple[int, int]) -> torch.Tensor:
    """The Qwen2.5-VL ideal: tower + merger, the model's own M-RoPE ids, then each decoder layer on the
    tokens it keeps (kept tokens keep their position ids; the dropped ones are cut like a real drop)."""
    core = model.model
    features = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    language = core.language_model
    embeds = language.embed_tokens(inputs["input_ids"])  # (B, L, D)
    start, end = image_span
    image = torch.cat(list(features)).reshape(embeds.shape[0], -1, embeds.shape[-1])  # (B, N, D)
    hidden = torch.cat([embeds[:, :start], image, embeds[:, end:]], dim=1)
    positions, _ = core.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, B, L)
    text = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)  # (B, L)
    current = hidden.shape[1]
    for layer, length in zip(language.layers, per_layer_lengths):
        if length != current:
            keep = torch.arange(length, device=hidden.device)
            hidden, positions, text = hidden.index_select(1, keep), positions.index_select(2, keep), text.index_select(1, keep)
            current = length
        embeddings = language.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=text)
    hidden = language.norm(hidden[:, -1:])
    return model.lm_head(hidden)  # (B, 1, V)


def per_layer_lengths(pipeline, budget, sequence: int, image_tokens: int, layers: int) -> list[int]:
    """Sequence length seen by each decoder layer under the pipeline's drops."""
    lengths, present = [], image_tokens
    drops = {d.layer if d.where == "layer" else 0: d.budget for d in pipeline.placement.drops(budget)}
    text = sequence - image_tokens
    for index in range(layers):
        if index in drops:
            present = int(pipeline.budget.resolve(drops[index], torch.tensor([present]))[0])
        lengths.append(text + present)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="llava-1.5-7b", choices=sorted(PROFILES), help="model shape (benchmarks/_harness.py)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the slice")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None, help="override the tower's image size (756 -> 2916 tokens)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[576, 192, 128, 64, 32])
    parser.add_argument("--placements", nargs="+", default=["pre_llm", "layer", "schedule"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--torch-profile", type=int, default=0, metavar="ROWS",
                        help="profile one pruned and one ideal call of every row with torch.profiler and print the top ROWS ops")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    slice_ = build_slice(args.profile, args.layers, args.vision_layers, args.device, dtype, image_size=args.image_size)
    model, layers = slice_.model, args.layers
    print(f"{args.profile} slice: {layers} decoder layers, {args.vision_layers} vision layers, {slice_.image_tokens} image tokens, "
          f"{args.dtype} on {describe_device(device)}")
    rows = []
    for batch in args.batch:
        inputs = batch_inputs(slice_, batch)
        sequence = inputs["input_ids"].shape[1]
        ids = inputs["input_ids"][0]
        image_positions = torch.nonzero(ids == slice_.config.image_token_id).flatten()
        span = (int(image_positions[0]), int(image_positions[-1]) + 1)

        def unpruned():
            with torch.no_grad():
                return model(**inputs, logits_to_keep=1, use_cache=True)

        base_time = time_call(unpruned, device, args.repeats, warmup=2)  # the first calls of a fresh process pay allocator and thread-pool warm-up
        with peak_memory(device) as base_memory:
            base_out = unpruned()
        base_kv = cache_bytes(output_cache(base_out))
        for placement in args.placements:
            recipe = placement_recipe(placement, layers)
            for budget in args.budgets:
                pipeline = framework.compose(recipe)
                lengths = per_layer_lengths(pipeline, budget, sequence, slice_.image_tokens, layers)
                handle = framework.prune(model, pipeline, budget=budget)

                def pruned():
                    with torch.no_grad():
                        return model(**inputs, logits_to_keep=1, use_cache=True)

                pruned_time = time_call(pruned, device, args.repeats)
                with peak_memory(device) as pruned_memory:
                    out = pruned()
                kept = handle.last_selection.counts.tolist()
                handle.remove()
                pruned_kv = cache_bytes(output_cache(out))

                def ideal():
                    with torch.no_grad():
                        ideal_prefill(model, inputs, lengths, span)

                ideal_time = time_call(ideal, device, args.repeats)
                if args.torch_profile:
                    with framework.prune(model, pipeline, budget=budget):
                        print_profile(f"pruned {placement} budget={budget} B={batch}", pruned, device, args.torch_profile)
                    print_profile(f"ideal {placement} budget={budget} B={batch}", ideal, device, args.torch_profile)
                ideal_kv = kv_cache_bytes(slice_.config, lengths, bytes_per_value=torch.finfo(dtype).bits // 8) * batch
                # selection overhead: the pipeline alone on tensors of the scoring point's shape
                generator = torch.Generator().manual_seed(0)
                signals = Signals(
                    visual=torch.randn(batch, slice_.image_tokens, slice_.config.text_config.hidden_size, generator=generator),
                    prompt=torch.randn(batch, 32, slice_.config.text_config.hidden_size, generator=generator),
                )
                selection_time = time_call(lambda: framework.compose("zspaprune").select(signals, budget), torch.device("cpu"), args.repeats)
                flops = prefill_flops(slice_.config, lengths) * batch
                flops_unpruned = prefill_flops(slice_.config, [sequence] * layers) * batch
                row = {
                    "placement": placement, "recipe": recipe, "budget": budget, "batch": batch, "kept": kept[:1],
                    "per_layer_tokens": lengths, "unpruned_s": base_time, "pruned_s": pruned_time, "ideal_s": ideal_time,
                    "time_vs_ideal": pruned_time / ideal_time, "speedup_vs_unpruned": base_time / pruned_time,
                    "kv_bytes": pruned_kv, "ideal_kv_bytes": ideal_kv, "unpruned_kv_bytes": base_kv,
                    "kv_vs_ideal": pruned_kv / ideal_kv, "peak_bytes": pruned_memory["bytes"], "unpruned_peak_bytes": base_memory["bytes"],
                    "flops": flops, "flops_ratio": flops / flops_unpruned,
                    "selection_s": selection_time, "selection_fraction": selection_time / base_time,
                }
                rows.append(row)
                print(f"B={batch} {placement:<9} budget={budget:<4} prefill {pruned_time:7.3f}s (unpruned {base_time:.3f}s, ideal {ideal_time:.3f}s) "
                      f"time/ideal {row['time_vs_ideal']:.3f}  FLOPs {row['flops_ratio']:.3f} of unpruned  KV/ideal {row['kv_vs_ideal']:.3f}  speedup {row['speedup_vs_unpruned']:.2f}x  "
                      f"selection {100 * row['selection_fraction']:.2f}% of prefill")
    synchronize(device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": describe_device(device), "args": vars(args), "rows": rows}, indent=2))
    if args.png:
        plot(rows, args.png)


def print_profile(title: str, function, device: torch.device, rows: int) -> None:
    """torch.profiler table (self CPU / CUDA time) of one call of ``function``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        function()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- torch.profiler: {title}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for placement in sorted({r["placement"] for r in rows}):
        chosen = [r for r in rows if r["placement"] == placement and r["batch"] == rows[0]["batch"]]
        axes[0].plot([r["budget"] for r in chosen], [r["pruned_s"] for r in chosen], "o-", label=f"{placement} (vtprune)")
        axes[0].plot([r["budget"] for r in chosen], [r["ideal_s"] for r in chosen], "x--", label=f"{placement} (ideal)")
        axes[1].plot([r["budget"] for r in chosen], [r["time_vs_ideal"] for r in chosen], "o-", label=placement)
    axes[0].set(xlabel="visual tokens kept", ylabel="prefill seconds", title="prefill time")
    axes[1].axhline(1.15, color="grey", linestyle=":")
    axes[1].set(xlabel="visual tokens kept", ylabel="pruned / ideal", title="overhead against the ideal")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
