"""Selection-time benchmark: every built-in pipeline, and fps against a naive per-sample loop.

Prints, from one run, the time of ``Pipeline.select`` for each recipe at N visual tokens
(D-dimensional, K = N / 9 kept, batch B), and for ``fps`` the ratio to a naive DivPrune-style
reference (one sample at a time, full N x N similarity matrix, a Python loop over picks).

    python benchmarks/selection.py                       # N in {576, 2880, 11520}, D 4096, B in {1, 8}
    python benchmarks/selection.py --tokens 576 2880 --batch 1 --dim 1024 --json out.json

``tome`` and ``flowcut`` also get an "in tower" row: the per-layer work their hooks add inside the CLIP tower.

The naive reference is O(N^2 D) in time and O(N^2) in memory, so it only runs up to
``--naive-max-tokens`` (default 2880).

With ``--prefill`` it also times the unpruned prefill of the LLaVA-1.5-7B-shaped slice of
``benchmarks/prefill.py`` (``--prefill-layers`` decoder layers, the CLIP tower's input resized so
that it yields the square number of patches nearest to N) at each N and batch, and prints every
pipeline's selection time as a fraction of it (the overhead targets of docs/performance.md):

    python benchmarks/selection.py --prefill --batch 1 --threads 2

With ``--count-ops`` it also counts the torch ops one ``select`` dispatches (``benchmarks/_opcount.py``;
each is a kernel launch on a GPU) and estimates the GPU time from them (``benchmarks/_gpu_estimate.py``:
launches x 5 us + bytes / 3.35 TB/s on an H100) as a share of the 7B model's FLOPs-ideal H100 prefill:

    python benchmarks/selection.py --count-ops --tokens 576 --batch 1 --repeats 1

With ``--compiled`` it also times ``Pipeline.compile()`` (torch.compile, inductor; the first call,
which compiles, is the warm-up) and prints eager / compiled:

    python benchmarks/selection.py --compiled --tokens 576 --batch 1 --threads 1 --recipes zspaprune divprune fastv

With ``--profile video`` it times, on video `Signals` of ``--frames`` x ``--frame-side``^2 tokens (default 32 x 196,
plus LLaVA-OneVision's one video newline; D = 3584; ``benchmarks/_video_profile.py``), every registered preset the
LLaVA-OneVision adapter supports (``--recipes`` narrows them; ``--video-only``: only presets reading ``frames``), at
``--keep-ratio`` (default 0.25) of the tokens, and prints each one's time as a share of the measured CPU prefill of
the unpruned sequence through ``--prefill-layers`` Qwen2-7B-shaped decoder layers (LLaVA-OneVision-7B's LLM):

    python benchmarks/selection.py --profile video --batch 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Optional

import sys
from pathlib import Path

import torch

from vtprune.framework import Signals, build_registry, compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_estimate import H100, ideal_prefill_seconds, selection_seconds  # noqa: E402
from _harness import PROFILES, build_llava_slice, llava_batch  # noqa: E402
from _harness import time_call as time_device  # noqa: E402
from _opcount import count_ops, selection_signals  # noqa: E402
from _video_profile import VIDEO_ADAPTER, VIDEO_PREFILL_PROFILES, text_prefill_seconds, video_presets, video_signals  # noqa: E402

#: Profiles whose prefill slice is a LLaVA (image tokens = (image size / patch)^2, used by --prefill).
LLAVA_PROFILES = sorted(name for name, spec in PROFILES.items() if spec.get("family", "llava") == "llava")
from vtprune.strategies.functional.farthest_point import farthest_point_select

DEFAULT_RECIPES = (
    "zspaprune", "zspaprune_max", "zspaprune_dynamic", "zspaprune_grid", "zspaprune_kmeans",
    "divprune", "random", "pooling", "fastv", "cdpruner", "fastervlm", "tome", "mustdrop", "sparsevlm",
)
#: Recipe parameters the benchmark needs at K = N / 9: SparseVLM's official scale / bias exist for K = 192 / 128 / 64
#: only, so every K uses the pair of 64 (= 576 / 9, TextVQA). Adaptive recipes (MustDrop, SparseVLM) keep a count
#: of their own: the printed row gives the mean kept count next to K.
RECIPE_OPTIONS = {"sparsevlm": {"scale": 0.8, "bias": 0.0}}
#: Recipes too slow for the largest sizes (scikit-learn k-means with N/9 clusters; CDPruner's N x N
#: kernel and N/9 greedy steps), with their largest N.
MAX_TOKENS = {"zspaprune_kmeans": 2880, "cdpruner": 2880}


def naive_fps_reference(visual: torch.Tensor, selected: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The usual per-sample implementation: full similarity matrix, Python loop over picks."""
    picked = torch.zeros_like(selected)
    for row in range(visual.shape[0]):
        unit = torch.nn.functional.normalize(visual[row].float(), dim=-1)  # (N, D)
        similarity = unit @ unit.T  # (N, N)
        chosen = torch.nonzero(selected[row]).flatten().tolist()
        for _ in range(int(counts[row])):
            closest = similarity[:, chosen].max(dim=1).values  # (N,)
            closest[chosen] = float("inf")
            pick = int(closest.argmin())
            chosen.append(pick)
            picked[row, pick] = True
    return picked


def time_call(function: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Median wall time of ``function`` in seconds over ``repeats`` runs (after one warm-up),
    synchronising a CUDA device around each run."""

    def run() -> None:
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)



def _tower_row(label: str, tower: dict, tokens: int, kept: int, batch: int, prefill: Optional[dict], detail: str) -> dict:
    """The result row of an in-tower method's timing (and its share of the prefill when measured), printed."""
    row = {"recipe": label, "N": tokens, "K": kept, "B": batch, **tower}
    share = ""
    if prefill is not None:
        row.update(prefill_s=prefill["seconds"], fraction_of_prefill=tower["seconds"] / prefill["seconds"])
        share = f"  {100 * tower['seconds'] / prefill['seconds']:6.2f}% of prefill"
    print(f"N={tokens:>6} K={kept:>5} B={batch} {label:<24} {tower['seconds'] * 1e3:10.2f} ms{share}  ({detail})")
    return row

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880, 11520])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dim", type=int, default=None, help="default 4096 (video profile: 3584, Qwen2-7B)")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_RECIPES)} "
                        "(video profile: every supported preset)")
    parser.add_argument("--profile", choices=("image", "video"), default="image",
                        help="image: N tokens per --tokens; video: --frames x --frame-side^2 tokens (see above)")
    parser.add_argument("--frames", type=int, default=32, help="video profile: frames per row")
    parser.add_argument("--frame-side", type=int, default=14, help="video profile: tokens per frame side")
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="video profile: kept fraction of the tokens")
    parser.add_argument("--video-only", action="store_true", help="video profile: only presets that read frames")
    parser.add_argument("--video-prefill-profile", default="qwen2.5-vl-7b", choices=VIDEO_PREFILL_PROFILES,
                        help="video profile: text shape of the prefill (benchmarks/_harness.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-tokens", type=int, default=2880)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    parser.add_argument("--prefill", action="store_true", help="also time the slice's unpruned prefill at each N, B")
    parser.add_argument("--prefill-layers", type=int, default=2, help="decoder layers of the prefill slice")
    parser.add_argument("--prefill-profile", default="llava-1.5-7b", choices=LLAVA_PROFILES,
                        help="model shape of the prefill slice (benchmarks/_harness.py)")
    parser.add_argument("--prefill-max-tokens", type=int, nargs=2, default=[11520, 2880], metavar=("B1", "BMORE"),
                        help="largest N whose prefill is timed at batch 1 / at larger batches (CPU time)")
    parser.add_argument("--count-ops", action="store_true",
                        help="count dispatched ops per select and estimate the H100 time as a share of the 7B ideal prefill")
    parser.add_argument("--compiled", action="store_true", help="also time Pipeline.compile() (torch.compile, inductor)")
    args = parser.parse_args()

    registry = build_registry(autoload=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.profile == "video":
        rows = video_profile(args, registry)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=2)
        return
    args.dim = args.dim or 4096
    args.recipes = args.recipes or list(DEFAULT_RECIPES)
    rows = []
    for tokens in args.tokens:
        kept = max(1, tokens // 9)
        for batch in args.batch:
            signals = selection_signals(batch, tokens, args.dim, device=args.device)
            prefill = None
            if args.prefill and tokens <= args.prefill_max_tokens[0 if batch == 1 else 1]:
                prefill = prefill_seconds(tokens, batch, args.prefill_layers, args.device, args.prefill_profile)
                print(f"N={tokens:>6} B={batch} unpruned prefill of the {args.prefill_layers}-layer slice "
                      f"({prefill['image_tokens']} image tokens): {prefill['seconds']:.2f} s")
            for recipe in args.recipes:
                if tokens > MAX_TOKENS.get(recipe, tokens):
                    continue
                pipeline = compose(recipe, registry=registry, **RECIPE_OPTIONS.get(recipe, {}))
                seconds = time_call(lambda: pipeline.select(signals, kept), args.repeats, args.device)
                row = {"recipe": recipe, "N": tokens, "K": kept, "B": batch, "D": args.dim, "seconds": seconds}
                extra = ""
                if pipeline.budget.adaptive_counts:
                    row["kept_mean"] = float(pipeline.select(signals, kept).counts.float().mean())
                    extra += f"  (adaptive: kept {row['kept_mean']:.1f} on average)"
                if args.count_ops:
                    row.update(op_counts(pipeline, signals, kept, tokens, batch))
                    extra += (f"  {row['ops']:6d} ops ({row['launches']} launches, {row['bytes'] / 2**20:.1f} MiB)"
                              f"  ~{row['gpu_estimate_s'] * 1e3:.2f} ms on {H100.name} = "
                              f"{100 * row['gpu_fraction_of_ideal_prefill']:.1f}% of the 7B ideal prefill")
                if args.compiled:
                    row.update(compiled_seconds(pipeline, signals, kept, args.repeats, args.device))
                    extra += (f"  compiled {row['compiled_seconds'] * 1e3:.2f} ms (eager/compiled "
                              f"{seconds / row['compiled_seconds']:.2f}x, compile {row['compile_s']:.0f} s)"
                              if "compiled_seconds" in row else f"  compiled: {row['compile_error']}")
                share = ""
                if prefill is not None:
                    row.update(prefill_s=prefill["seconds"], prefill_image_tokens=prefill["image_tokens"],
                               fraction_of_prefill=seconds / prefill["seconds"])
                    share = f"  {100 * seconds / prefill['seconds']:6.2f}% of prefill"
                rows.append(row)
                print(f"N={tokens:>6} K={kept:>5} B={batch} {recipe:<24} {seconds * 1e3:10.2f} ms{share}{extra}")
                if recipe == "tome":  # what the preset really runs: the per-layer matching + merging inside the tower
                    tower = tower_tome_seconds(tokens, batch, kept, args.repeats, args.device)
                    rows.append(_tower_row("tome in tower", tower, tokens, kept, batch, prefill,
                                           f"{tower['crops']} x {tower['tokens']} tokens per image, {tower['layers']} "
                                           f"merging layers, r per layer {tower['schedule'][0]}..{tower['schedule'][-1]}"))
                if recipe == "flowcut" and tokens == clip_patches():  # FlowCut's in-tower work (LLaVA-1.5: one crop)
                    tower = tower_flowcut_seconds(tokens, batch, kept, args.repeats, args.device)
                    rows.append(_tower_row("flowcut in tower", tower, tokens, kept, batch, prefill,
                                           f"{tower['tokens']} tokens per image, {tower['layers']} scoring layers, "
                                           f"patches kept per pruning layer {tower['kept_per_step']}"))
                if recipe == "fastv":  # the framework's overhead around FastV's own three ops
                    attention = signals.attention
                    bare = time_call(lambda: attention.mean(dim=1).topk(kept, dim=-1).indices.sort(dim=-1), args.repeats, args.device)
                    rows.append({"recipe": "fastv bare ops", "N": tokens, "K": kept, "B": batch, "D": args.dim,
                                 "seconds": bare, "select_over_bare": seconds / bare})
                    print(f"N={tokens:>6} K={kept:>5} B={batch} {'fastv bare ops':<24} {bare * 1e3:10.2f} ms  "
                          f"(mean over heads, topk, sort: FastV's own ops; select / bare = {seconds / bare:.2f})")
            if tokens <= args.naive_max_tokens:
                seed = _first(signals.visual)  # both start from token 0 so their picks are comparable
                counts = torch.full((batch,), kept - 1, device=args.device)
                valid = torch.ones(batch, tokens, dtype=torch.bool, device=args.device)
                ours = time_call(lambda: farthest_point_select(signals.visual, seed, counts, valid), args.repeats, args.device)
                naive = time_call(lambda: naive_fps_reference(signals.visual, seed, counts), 1, args.device)
                same = torch.equal(
                    farthest_point_select(signals.visual, seed, counts, valid),
                    naive_fps_reference(signals.visual, seed, counts),
                )
                rows.append({"recipe": "fps vs naive loop", "N": tokens, "K": kept, "B": batch, "D": args.dim,
                             "seconds": ours, "naive_seconds": naive, "speedup": naive / ours, "same_selection": same})
                print(f"N={tokens:>6} K={kept:>5} B={batch} fps {ours * 1e3:.1f} ms vs naive loop {naive * 1e3:.1f} ms: "
                      f"{naive / ours:.1f}x faster (same picks from the same seed: {same})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


def video_profile(args, registry) -> list[dict]:
    """The ``--profile video`` run: every supported preset's select on video rows, as a share of the prefill."""
    spec = PROFILES[args.video_prefill_profile]["text"]
    dim = args.dim or int(spec["hidden_size"])
    heads, key_heads = int(spec["num_attention_heads"]), int(spec["num_key_value_heads"])
    presets = video_presets(registry)
    if args.recipes:
        unknown = sorted(set(args.recipes) - {name for name, _ in presets})
        if unknown:
            raise SystemExit(f"not run on the video profile (unknown or unsupported by {VIDEO_ADAPTER.name}): {unknown}; "
                             f"supported: {[name for name, _ in presets]}")
        presets = [(name, video) for name, video in presets if name in args.recipes]
    if args.video_only:
        presets = [(name, video) for name, video in presets if video]
    rows = []
    for batch in args.batch:
        signals = video_signals(batch, args.frames, args.frame_side, dim, heads, key_heads, device=args.device)
        tokens = signals.num_tokens
        kept = max(1, round(args.keep_ratio * tokens))
        prefill = text_prefill_seconds(tokens, batch, args.prefill_layers, args.video_prefill_profile, args.device)
        print(f"video B={batch}: {args.frames} frames x {args.frame_side}x{args.frame_side} + 1 newline = {tokens} tokens, "
              f"D={dim}, K={kept}; unpruned prefill of {prefill['layers']} {args.video_prefill_profile}-shaped decoder "
              f"layers over {prefill['sequence']} tokens: {prefill['seconds']:.2f} s")
        for name, video in presets:
            if tokens > MAX_TOKENS.get(name, tokens):
                print(f"video N={tokens:>6} B={batch} {name:<24} skipped (too slow above N={MAX_TOKENS[name]})")
                continue
            pipeline = compose(name, registry=registry)
            seconds = time_call(lambda: pipeline.select(signals, kept), args.repeats, args.device)
            share = seconds / prefill["seconds"]
            rows.append({"recipe": name, "profile": "video", "reads_frames": video, "N": tokens, "K": kept, "B": batch,
                         "D": dim, "frames": args.frames, "seconds": seconds, "prefill_s": prefill["seconds"],
                         "prefill_layers": prefill["layers"], "fraction_of_prefill": share})
            print(f"video N={tokens:>6} K={kept:>5} B={batch} {name:<24}{' [frames]' if video else '':<10}"
                  f"{seconds * 1e3:10.2f} ms  {100 * share:6.2f}% of prefill")
    return rows


def op_counts(pipeline, signals: Signals, kept: int, tokens: int, batch: int) -> dict:
    """Dispatched ops, launches and bytes of one select, and the H100 estimate (benchmarks/_gpu_estimate.py)
    as a fraction of the LLaVA-1.5-7B FLOPs-ideal prefill at ``tokens`` image tokens."""
    _, counter = count_ops(lambda: pipeline.select(signals, kept))
    estimate = selection_seconds(counter.launches, counter.bytes)
    ideal = ideal_prefill_seconds(PROFILES["llava-1.5-7b"]["text"], tokens, batch)
    return {"ops": counter.total, "launches": counter.launches, "bytes": counter.bytes, "gpu_estimate_s": estimate,
            "gpu_ideal_prefill_s": ideal, "gpu_fraction_of_ideal_prefill": estimate / ideal}


def compiled_seconds(pipeline, signals: Signals, kept: int, repeats: int, device: str) -> dict:
    """Median time of ``pipeline.compile()``'s select (the first call compiles and is timed apart), and
    whether it picks what the eager select picks; a pipeline that cannot compile reports why."""
    from vtprune.framework.compiled import SelectCompileError

    try:
        compiled = pipeline.compile()
        start = time.perf_counter()
        first = compiled(signals, kept)
        compile_s = time.perf_counter() - start
    except SelectCompileError as error:
        return {"compile_error": str(error).split(";")[0]}
    eager = pipeline.select(signals, kept)
    same = all(torch.equal(getattr(first, f), getattr(eager, f)) for f in ("indices", "mask", "critical"))
    seconds = time_call(lambda: compiled(signals, kept), repeats, device)
    return {"compiled_seconds": seconds, "compile_s": compile_s, "compiled_same_selection": same}


def prefill_seconds(tokens: int, batch: int, layers: int, device: str, profile: str = "llava-1.5-7b") -> dict:
    """Median-of-1 (after two warm-ups) unpruned prefill time of the ``profile``-shaped slice (LLaVA-1.5-7B
    by default) whose tower yields the square patch count nearest to ``tokens``."""
    patch = PROFILES[profile]["vision"]["patch_size"]
    side = max(1, round(tokens**0.5))
    slice_ = build_llava_slice(profile, layers, 2, device, torch.float32, image_size=side * patch)
    inputs = llava_batch(slice_, batch)

    def run() -> None:
        with torch.no_grad():
            slice_.model(**inputs, logits_to_keep=1, use_cache=True)

    seconds = time_device(run, torch.device(device), repeats=1, warmup=2)
    return {"seconds": seconds, "image_tokens": slice_.image_tokens}


#: CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336, LLaVA-1.5 / LLaVA-NeXT's tower): encoder layers; LLaVA reads
#: the output of layer -2, so ToMe merges in the layers up to it.
CLIP_LAYERS, CLIP_FEATURE_LAYER = 24, -2


def tower_tome_seconds(tokens: int, batch: int, kept: int, repeats: int, device: str, profile: str = "llava-1.5-7b") -> dict:
    """Median time of the `tome` preset's in-tower work (``tower_merge_step`` of every merging layer, as the hooks of
    ``adapters/tower_merge.py`` run it) on the ``profile`` tower's shapes: an image of ``tokens`` patches is
    ``tokens / patches-per-crop`` crops of ``patches + 1`` tokens (CLS first), all crops of the batch merged as one
    tower batch, down to ``kept / crops`` patches per crop (schedule derived from the budget, r = 0). Keys and hidden
    states are random (drawn once, outside the timing)."""
    from vtprune.adapters.tower_merge import merge_schedule
    from vtprune.strategies.functional.tome import tower_merge_step

    vision = PROFILES[profile]["vision"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    crops = max(1, round(tokens / patches))
    layers = CLIP_LAYERS + CLIP_FEATURE_LAYER + 1
    schedule = merge_schedule(patches + 1, max(1, kept // crops), layers)
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch * crops, patches + 1, width, generator=generator).to(device)  # (B * crops, T0, D)
    keys = torch.randn(batch * crops, patches + 1, width, generator=generator).to(device)  # (B * crops, T0, H * dh)

    def run() -> None:
        x, size, slots = hidden, None, None
        for r in schedule:
            if r:
                x, size, slots, _ = tower_merge_step(x, keys[:, : x.shape[1]], heads, r, size, slots)

    seconds = time_call(run, repeats, device)
    return {"seconds": seconds, "crops": crops, "tokens": patches + 1, "layers": layers, "schedule": schedule}


def clip_patches(profile: str = "llava-1.5-7b") -> int:
    """Patches of one image in the ``profile`` tower (576 for CLIP ViT-L/14-336)."""
    vision = PROFILES[profile]["vision"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def tower_flowcut_seconds(tokens: int, batch: int, kept: int, repeats: int, device: str, profile: str = "llava-1.5-7b") -> dict:
    """Median time of the `flowcut` preset's in-tower work (``flowcut_layer_step`` after every layer before the
    feature layer, as the hooks of ``adapters/tower_flowcut.py`` run it) on the ``profile`` tower's shapes: ``batch``
    images of ``patches + 1`` tokens (CLS first; one crop per image, FlowCut's LLaVA-1.5 path), down to ``kept``
    patches. Projections and hidden states are random (drawn once, outside the timing; each layer reads the first
    present tokens' rows), so the adaptive counts are those of random attention."""
    from vtprune.strategies.functional.flowcut import flowcut_layer_step, flowcut_remaining

    vision = PROFILES[profile]["vision"]
    patches = clip_patches(profile)
    feature = CLIP_LAYERS + CLIP_FEATURE_LAYER
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    scale = (width // heads) ** -0.5
    generator = torch.Generator().manual_seed(0)
    hidden, q, k, v = (torch.randn(batch, patches + 1, width, generator=generator).to(device) for _ in range(4))  # (B, T0, D)
    counts: list = []

    def run() -> None:
        x, running, present = hidden, None, None
        positions = torch.arange(patches, device=device).expand(batch, -1)  # (B, n)
        counts.clear()
        for layer in range(feature):
            if x.shape[1] <= kept + 1:
                break
            t = x.shape[1]
            x, running, positions, present, step = flowcut_layer_step(
                x, q[:, :t], k[:, :t], v[:, :t], heads, scale, running, positions, present,
                flowcut_remaining(feature, layer), kept + 1,
            )
            if step is not None:
                counts.append(int(step.max()))

    seconds = time_call(run, repeats, device)
    return {"seconds": seconds, "tokens": patches + 1, "layers": feature, "kept_per_step": list(counts)}


def _first(visual: torch.Tensor) -> torch.Tensor:
    """(B, N) bool with token 0 selected: a common seed so both implementations are comparable."""
    seed = torch.zeros(visual.shape[:2], dtype=torch.bool, device=visual.device)
    seed[:, 0] = True
    return seed


if __name__ == "__main__":
    main()
