"""`catalog()`: every registered stage and preset with its kind, parameters, signals and description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .compose import compose
from .params import describe_annotation
from .providers import signal_providers
from .registry import Registry, default_registry
from .stages import STAGE_KINDS, stage_params

__all__ = ["CatalogEntry", "catalog", "format_catalog", "signal_providers"]


@dataclass(frozen=True)
class CatalogEntry:
    """One row of the catalog.

    Attributes:
        name: the recipe name.
        kind: a stage kind, or "preset", "adapter", "task", "launcher".
        params: parameter name -> (type, default); for a preset, its expanded recipe under "recipe".
        requires: the signals a stage or preset needs.
        description: one line.
        source: the plugin that registered it.
    """

    name: str
    kind: str
    params: dict[str, tuple[str, Any]]
    requires: tuple[str, ...]
    description: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": {k: {"type": t, "default": d} for k, (t, d) in self.params.items()},
            "requires": list(self.requires),
            "description": self.description,
            "source": self.source,
        }


def catalog(registry: Optional[Registry] = None, kind: Optional[str] = None) -> list[CatalogEntry]:
    """Every registered stage (in kind order), preset, adapter, task and launcher.

    ``kind`` filters to one kind ("relevance", ..., "preset", "adapter", "task", "launcher").
    """
    registry = default_registry(registry)
    entries: list[CatalogEntry] = []
    for stage_kind in STAGE_KINDS:
        for name, item in sorted(registry.stages[stage_kind].items()):
            params = {s.name: (describe_annotation(s.annotation), s.default) for s in stage_params(item.obj)}
            requires = tuple(sorted(item.obj.requires))
            if stage_kind == "placement":
                params["provides"] = ("signals", tuple(sorted(item.obj.provides)))
            entries.append(CatalogEntry(name, stage_kind, params, requires, item.description, item.source))
    for name, item in sorted(registry.presets.items()):
        pipeline = compose(name, registry=registry)
        params = {"recipe": ("str", str(pipeline))}
        entries.append(
            CatalogEntry(name, "preset", params, tuple(sorted(pipeline.requires)), item.description, item.source)
        )
    for table_kind, table in (("adapter", registry.adapters), ("task", registry.tasks), ("launcher", registry.launchers)):
        for name, item in sorted(table.items()):
            params = {}
            if table_kind == "adapter":
                params = {"models": ("classes", tuple(item.obj.model_classes)), "placements": ("names", tuple(sorted(item.obj.placements)))}
                if callable(getattr(item.obj, "accepts", None)):  # fallback for classes no adapter names
                    params["fallback"] = ("probe", "accepts(model)")
            entries.append(CatalogEntry(name, table_kind, params, (), item.description, item.source))
    if kind is not None:
        entries = [entry for entry in entries if entry.kind == kind]
    return entries


def format_catalog(entries: list[CatalogEntry]) -> str:
    """The catalog as aligned text, grouped by kind (what ``vtprune list`` prints)."""
    lines: list[str] = []
    current = None
    for entry in entries:
        if entry.kind != current:
            current = entry.kind
            lines.append("" if lines else "")
            lines.append(f"{current}:")
        lines.append(f"  {entry.name:<18} {entry.description}")
        for key, (type_name, default) in entry.params.items():
            lines.append(f"  {'':<18}   {key}: {type_name} = {default!r}")
        if entry.requires and entry.kind != "preset":
            lines.append(f"  {'':<18}   needs: {', '.join(entry.requires)}")
    return "\n".join(lines).strip("\n")

