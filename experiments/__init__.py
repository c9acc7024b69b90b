"""vtprune.experiments: ablation grids from YAML, resumable runs, metrics, tracking and reports.

- ``schema``: the structured config; ``config``: ``load_grid`` (the entry point, re-exporting the rest)
  over ``gridfiles`` (files, overrides), ``validation`` (checks), ``cells`` (expansion, keys) and
  ``pipelines`` (``build_pipeline``, composed once per method);
- ``runner``: ``run_grid`` / ``run_cell`` (resumable, failure tolerant, stale cells reported);
  ``locks``: one process per cell; ``launchers``: local and Slurm;
- ``samples``: ``Sample``, the task interface and answer metrics; ``tasks``: the built-in ``jsonl``,
  ``synthetic`` and ``lmms_eval`` tasks;
- ``models``: Hugging Face and dummy backends; ``measure``: prefill/decode latency and memory observer;
- ``cost``: analytic prefill FLOPs and KV-cache bytes; ``metrics``: per-sample rows and cell metrics;
- ``tracking``: wandb; ``report``: tables; ``plots``: the report's plots; ``lmms_eval_model``: the lmms-eval model plugin;
- ``plugin``: registration of the built-in tasks and launchers; ``cli``: ``vtprune run|plan|report``.

See docs/experiments.md.
"""
