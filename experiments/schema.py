"""The structured config of a run and of a grid (dataclasses read by OmegaConf in struct mode).

A *run* (one grid cell) is a `RunConfig`; a *grid file* is a `GridConfig`: ``base`` (a run) plus
``grid`` axes, ``exclude`` / ``include`` lists, ``seeds`` and the ``launcher``. Every field has a
type hint; `vtprune.experiments.config` checks a YAML file against these hints (collecting every
problem with its key path) before OmegaConf builds the typed object.

Fields whose type is ``dict[str, Any]`` (``method.params``, ``task.options``, ``model.options``,
``launcher.options``) are free-form here and validated by their owner: stage parameters by
``framework.compose``, task options by the task factory's signature, launcher options by the
launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

__all__ = [
    "ModelConfig",
    "TaskConfig",
    "MethodConfig",
    "GenerationConfig",
    "TrackingConfig",
    "RunConfig",
    "LauncherConfig",
    "GridConfig",
    "METRIC_GROUPS",
    "NOT_HASHED",
]

#: Metric groups a run can compute (``metrics:``).
METRIC_GROUPS: tuple[str, ...] = ("accuracy", "fidelity", "tokens", "cost", "latency")
#: Run keys that never change results: left out of the cell hash.
NOT_HASHED: tuple[str, ...] = ("tracking", "output_dir")

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Metric = Literal["accuracy", "fidelity", "tokens", "cost", "latency"]


@dataclass
class ModelConfig:
    """The model to load.

    Attributes:
        name: a Hugging Face hub id, a local directory, ``pkg:<package>/<relative dir>`` (a directory
            inside an installed Python package, e.g. ``pkg:vtprune.experiments.organism/weights``), or
            ``dummy`` (a fast fake model for dry runs and tests). Required: a grid without it is
            rejected (never silently the fake model).
        dtype: weights and activations dtype ("auto" = float16 on GPU, float32 on CPU).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
        attn_implementation: passed to ``from_pretrained`` ("eager", "sdpa", ...); None = default.
        revision: hub revision (commit, tag or branch).
        adapter: the vtprune adapter name; None = the adapter registered for the model's class.
        prompt_template: the prompt text with ``{question}`` and one ``<image>``-style placeholder per
            image written literally; None = the processor's chat template.
        prompt_stop: text that ends the user turn (e.g. ``" ASSISTANT:"``); its token ids become the
            adapters' ``prompt_stop``.
        options: backend options (for ``dummy``: ``num_tokens``, ``fail_budgets``; for hub models:
            ``local_files_only``, ``low_cpu_mem_usage``).
    """

    name: Optional[str] = None
    dtype: Dtype = "auto"
    device: str = "auto"
    attn_implementation: Optional[str] = None
    revision: Optional[str] = None
    adapter: Optional[str] = None
    prompt_template: Optional[str] = None
    prompt_stop: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """The evaluation task: a registered task name, its factory's keyword options, a sample limit."""

    name: str = "jsonl"
    options: dict[str, Any] = field(default_factory=dict)
    limit: Optional[int] = None


@dataclass
class MethodConfig:
    """The pruning method.

    Attributes:
        recipe: the compose grammar (``"zspaprune+kmeans"``) or its dict form
            (``{preset: zspaprune, diversity: kmeans}``).
        params: stage parameters routed by ``compose`` (``critical: 0.3`` or ``budget__critical: 0.3``).
        label: the name of the method in reports; None = derived from the recipe, params and placement.
    """

    recipe: Any = "zspaprune"
    params: dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None


@dataclass
class GenerationConfig:
    """Greedy decoding settings."""

    max_new_tokens: int = 16
    batch_size: int = 1


@dataclass
class TrackingConfig:
    """Weights & Biases tracking (one wandb run per cell, grouped by grid).

    ``mode``: "offline" (default, never touches the network; sync later with ``wandb sync``),
    "online" or "disabled". ``WANDB_MODE``/``WANDB_DIR``/``WANDB_PROJECT``... still apply where this
    config leaves a value unset (``dir: null``, ``entity: null``).
    """

    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "vtprune"
    entity: Optional[str] = None
    dir: Optional[str] = None
    log_images: int = 4
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """One run (one grid cell).

    Attributes:
        model, task, generation, tracking: see their classes.
        method: the pruning method; null = the unpruned model.
        budget: visual tokens kept per image (int) or fraction kept (float in (0, 1]).
        placement: a placement stage that replaces the recipe's (``"pre_llm"``, ``"layer(k=2)"``,
            ``"schedule(layers=[2,8],ratio=0.5)"``); null = the recipe's placement.
        positions: "keep" (kept tokens keep their position ids) or "compact".
        seed: seeds torch/numpy/random and every stage parameter named ``seed`` not set in
            ``method.params``.
        metrics: the metric groups to compute.
        output_dir: where results go (``<output_dir>/cells/<hash>/...``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: Optional[MethodConfig] = field(default_factory=MethodConfig)
    budget: Union[int, float] = 64
    placement: Optional[str] = None
    positions: Literal["keep", "compact"] = "keep"
    seed: int = 0
    metrics: list[Metric] = field(default_factory=lambda: list(METRIC_GROUPS))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "results/grid"


@dataclass
class LauncherConfig:
    """How cells run: a registered launcher (``local``, ``slurm``) and its options."""

    name: str = "local"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridConfig:
    """A grid file.

    Attributes:
        name: the grid's name (wandb group, report title); default: the file name.
        description: one line.
        base: the run every cell starts from.
        grid: axes, ``dotted.key: [values]`` relative to ``base``; cells are their cartesian product.
        exclude: partial assignments (``{budget: 16, placement: pre_llm}``); a cell matching every key
            of one entry is dropped.
        include: extra cells, each a set of ``dotted.key: value`` overrides of ``base``.
        seeds: cells are run once per seed (sets ``seed``); null = ``base.seed`` only.
        seeds_for: "stochastic" (default): only cells whose method draws random numbers (a stage
            with ``stochastic = True`` or a ``seed`` parameter) repeat per seed, the others run once
            with the first seed; "all": every cell runs once per seed.
        baseline: also run the unpruned model once per (model, task) (needed for fidelity).
        launcher: see `LauncherConfig`.
    """

    name: str = ""
    description: str = ""
    base: RunConfig = field(default_factory=RunConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    include: list[dict[str, Any]] = field(default_factory=list)
    seeds: Optional[list[int]] = None
    seeds_for: Literal["stochastic", "all"] = "stochastic"
    baseline: bool = True
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
