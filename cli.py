"""The ``vtprune`` command line: ``list``, ``demo``, ``run``, ``plan``, ``report``, ``organism``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "budget_arg", "DEMO_GRIDS", "DEMO_TASKS", "DEMO_TASK_ORGANISMS", "INTERRUPTED"]


def _cmd_list(args: argparse.Namespace) -> int:
    from vtprune.framework import build_registry, catalog, format_catalog

    registry = build_registry(autoload=not args.no_plugins)
    if args.model:
        return _print_model_adapter(registry, args.model)
    entries = catalog(registry, kind=args.kind)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in entries], indent=2, default=str))
    else:
        print(format_catalog(entries))
    return 0


def _print_model_adapter(registry, class_name: str) -> int:
    """``vtprune list --model CLASS``: the adapter a transformers model class resolves to, and how."""
    import transformers

    from vtprune.framework.errors import RegistrationError

    klass = getattr(transformers, class_name, None)
    if not isinstance(klass, type):
        print(f"unknown model class {class_name!r}: not a class exported by transformers {transformers.__version__}", file=sys.stderr)
        return 2
    try:
        adapter = registry.adapter_for(klass)
    except RegistrationError as error:
        print(str(error), file=sys.stderr)
        return 1
    names = {k.__name__ for k in klass.__mro__}
    how = "named in its model_classes" if names & set(adapter.model_classes) else "capability probe accepts(model)"
    print(f"{class_name} -> adapter {adapter.name!r} ({how}); placements: {', '.join(sorted(adapter.placements))}")
    return 0


def _cmd_select_example(args: argparse.Namespace) -> int:
    """Run a few built-in pipelines on random tensors and print what each keeps."""
    import torch

    from vtprune.framework import Signals, compose

    generator = torch.Generator().manual_seed(args.seed)
    tokens, dim = args.tokens, 64
    visual = torch.randn(2, tokens, dim, generator=generator)
    prompt = torch.randn(2, 7, dim, generator=generator)
    lengths = torch.tensor([tokens, tokens * 3 // 4])
    signals = Signals(
        visual=visual,
        visual_mask=torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1),
        prompt=prompt,
    )
    for recipe in args.recipes:
        pipeline = compose(recipe)
        selection = pipeline.select(signals, args.budget)
        print(f"{recipe}\n  canonical: {pipeline}")
        for row in range(2):
            kept = selection.row_indices(row).tolist()
            critical = selection.indices[row][selection.critical[row]].tolist()
            print(f"  row {row} ({int(lengths[row])} tokens): kept {len(kept)}: {kept}\n    critical: {critical}")
    return 0


def budget_arg(text: str) -> int | float:
    """A budget from the command line: an integer -> int (tokens kept), otherwise float (fraction);
    validated (`framework.budget.validate_budget`), so a bad value is argparse's one-line error."""
    from vtprune.framework.budget import validate_budget
    from vtprune.framework.errors import VtpruneError

    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a budget is an int (tokens kept) or a float in (0, 1], got {text!r}") from None
    try:
        return validate_budget(value)
    except VtpruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="print every registered stage, preset, adapter, task and launcher")
    listing.add_argument("--kind", help="only this kind (relevance, critical, diversity, budget, placement, preset, adapter, task, launcher)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--no-plugins", action="store_true", help="skip third-party entry points")
    listing.add_argument("--model", metavar="CLASS", help="print the adapter a transformers model class resolves to")
    listing.set_defaults(func=_cmd_list)

    example = commands.add_parser("select-example", help="run pipelines on random tensors and print the selections")
    example.add_argument("recipes", nargs="*", default=["zspaprune", "zspaprune+kmeans", "relevance.none+fps"])
    example.add_argument("--tokens", type=int, default=24)
    example.add_argument("--budget", type=budget_arg, default=0.25)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=_cmd_select_example)
    from vtprune.experiments.cli import add_experiment_commands

    add_experiment_commands(commands)
    demo = commands.add_parser("demo", help="the main job: the demo grid on the embedded organism, then its report")
    demo.add_argument("overrides", nargs="*", help="dotted overrides of experiments/configs/demo.yaml (e.g. seeds=[0])")
    demo.add_argument("--out", default=None, help="results directory (default: the grid's output_dir, results/demo)")
    demo.add_argument("--organism", choices=("llava", "qwen2_vl"), default="llava",
                      help="which shipped organism runs the grid (qwen2_vl: results/demo_qwen2_vl; docs/demo.md)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--rerun-stale", action="store_true", help="run again the finished cells that ran with other versions")
    demo.add_argument("--task", choices=DEMO_TASKS, default="shapes",
                      help="organism task: shapes (default), clutter (llava organism; its own weights, results/demo_clutter), "
                           "crowd (llava organism, the clutter weights, results/demo_crowd) or video (qwen2_vl organism; the video presets, results/demo_video)")
    demo.set_defaults(func=_cmd_demo)

    organism = commands.add_parser("organism", help="the embedded demo model: reproduce its weights")
    organism_commands = organism.add_subparsers(dest="organism_command", required=True)
    # every argument after ``organism train`` (``--out DIR``, ``--help``, ...) goes to the trainer's own parser
    train = organism_commands.add_parser("train", help="train the organism (seeded; see docs/demo.md)", add_help=False)
    train.set_defaults(func=_cmd_organism_train, passes_unknown_args=True)
    return parser


#: ``vtprune demo --task T``: the overrides of the demo grid that run organism task T (docs/demo.md)
DEMO_TASKS: dict[str, tuple[str, ...]] = {
    "shapes": (),
    "clutter": (
        "base.task.options.scenes=clutter",
        "base.model.name=pkg:vtprune.experiments.organism/weights_clutter",
        "base.output_dir=results/demo_clutter",
    ),
    "crowd": (
        "base.task.options.scenes=crowd",
        "base.model.name=pkg:vtprune.experiments.organism/weights_clutter",
        "base.output_dir=results/demo_crowd",
    ),
    "video": (),  # its own grid file, experiments/configs/demo_video.yaml (the video organism and presets)
}
#: ``vtprune demo --task T``: the grid file of task T when it is not demo.yaml
DEMO_GRIDS: dict[str, str] = {"video": "demo_video.yaml"}
#: the organisms that ship weights for each demo task
DEMO_TASK_ORGANISMS: dict[str, tuple[str, ...]] = {
    "shapes": ("llava", "qwen2_vl"), "clutter": ("llava",), "crowd": ("llava",), "video": ("qwen2_vl",),
}


def demo_grid_path(task: str = "shapes") -> "Path":
    """The shipped demo grid of organism task ``task`` (package data; demo.yaml unless `DEMO_GRIDS` names another)."""
    from pathlib import Path

    import vtprune.experiments

    return Path(vtprune.experiments.__file__).resolve().parent / "configs" / DEMO_GRIDS.get(task, "demo.yaml")


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo grid (resumable: a rerun skips finished cells), write and print its report."""
    from pathlib import Path

    from vtprune.experiments.config import load_grid
    from vtprune.experiments.report import write_report
    from vtprune.experiments.runner import run_grid

    from vtprune.experiments.organism.demo_models import demo_overrides

    organism, task = getattr(args, "organism", "llava"), getattr(args, "task", "shapes")
    if organism not in DEMO_TASK_ORGANISMS[task]:
        others = [t for t, names in DEMO_TASK_ORGANISMS.items() if organism in names]
        print(f"vtprune demo: the {task!r} task ships weights for the {' / '.join(DEMO_TASK_ORGANISMS[task])} organism only; "
              f"run --task {task} with --organism {DEMO_TASK_ORGANISMS[task][0]}, or --organism {organism} with --task "
              f"{' / '.join(others)}", file=sys.stderr)
        return 2
    # a task with its own grid file names its model there; demo.yaml's organism comes from the overrides
    overrides = ([] if task in DEMO_GRIDS else demo_overrides(organism)) + list(DEMO_TASKS[task]) + list(args.overrides)
    overrides += [f"output_dir={args.out}"] if args.out else []
    spec = load_grid(demo_grid_path(task), overrides)
    progress = not args.no_progress and sys.stderr.isatty()  # a log file gets one line per cell
    summary = run_grid(spec, progress=progress, rerun_stale=args.rerun_stale)
    print(summary.format(spec))
    written = write_report(summary.root)
    print(Path(written["markdown"]).read_text().split("\n## All metrics")[0].rstrip())  # every metric: report.md / .csv
    print(f"report: {written['markdown']}")
    return 0 if not summary.failed else 1


def _cmd_organism_train(args: argparse.Namespace) -> int:
    argv = list(args.train_args)
    if any(a == "--family" or a.startswith("--family=") for a in argv):  # organism.command picks the family
        from vtprune.experiments.organism.command import main as train_main
    else:  # the LLaVA organism's own trainer (the default)
        from vtprune.experiments.organism.train import main as train_main

    return int(train_main(argv) or 0)


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, the shell's convention)."""

_RESUME_HINT = {
    "run": "; finished cells and samples are kept: run the same command again to resume",
    "demo": "; finished cells and samples are kept: run `vtprune demo` again to resume",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "passes_unknown_args", False):
        args.train_args = unknown
        unknown = []
    elif isinstance(getattr(args, "overrides", None), list):
        # overrides after a flag (``run GRID --no-progress budget=8``): argparse leaves them over
        args.overrides += [item for item in unknown if not item.startswith("-")]
        unknown = [item for item in unknown if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nvtprune: interrupted{_RESUME_HINT.get(args.command, '')}", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # noqa: BLE001 - user-facing errors become one clear line
        from vtprune.framework import VtpruneError

        if isinstance(error, VtpruneError):
            print(f"vtprune: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
