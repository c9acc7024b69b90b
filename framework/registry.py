"""The registry of stages, presets, adapters, tasks and launchers, filled through pluggy hooks.

`build_registry` makes a fresh plugin manager, registers the built-in plugins and (unless
``autoload=False``) every entry point of the ``vtprune`` group, then asks each plugin to register
what it provides. The tables themselves (`Registry`, `Preset`, `Registered`) live in `vtprune.framework.tables`
and are re-exported here. There is no module-level manager: `default_registry` caches one registry per set
of installed entry points, so installing a plugin package is picked up by the next call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any, Iterable, Optional

import pluggy

from . import hookspecs
from .tables import Preset, Registered, Registry

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "Preset",
    "Registered",
    "Registry",
    "build_registry",
    "default_registry",
]

ENTRY_POINT_GROUP = "vtprune"
#: Modules loaded as plugins before any entry point (pytest's ``default_plugins`` habit).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "vtprune.strategies.plugin",
    "vtprune.adapters.plugin",
    "vtprune.experiments.plugin",
)


def _plugin_manager(autoload: bool, plugins: Iterable[Any]) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)
    for plugin in plugins:
        label = getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"
        manager.register(plugin, name=label)
    if autoload:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def _source_name(manager: pluggy.PluginManager, plugin_name: str) -> str:
    for plugin, dist in manager.list_plugin_distinfo():
        if manager.get_name(plugin) == plugin_name:
            return f"{plugin_name} (from {dist.metadata['name']} {dist.version})"
    return plugin_name


def build_registry(autoload: bool = True, plugins: Iterable[Any] = ()) -> Registry:
    """A new, frozen registry with the built-in plugins, ``plugins`` and (if ``autoload``) every
    installed ``vtprune`` entry point."""
    manager = _plugin_manager(autoload, plugins)
    registry = Registry()
    hooks = (
        manager.hook.vtprune_register_stages,
        manager.hook.vtprune_register_presets,
        manager.hook.vtprune_register_adapters,
        manager.hook.vtprune_register_tasks,
        manager.hook.vtprune_register_launchers,
    )
    for hook in hooks:
        # Called one implementation at a time, in registration order (built-ins first), so that
        # each registration knows its plugin.
        for impl in hook.get_hookimpls():
            impl.function(registry=registry.scoped(_source_name(manager, impl.plugin_name)))
    registry._frozen = True
    return registry


def _entry_point_key() -> tuple[tuple[str, str], ...]:
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return tuple(sorted((point.name, point.value) for point in points))


@functools.lru_cache(maxsize=4)
def _cached_registry(key: tuple[tuple[str, str], ...]) -> Registry:
    return build_registry(autoload=True)


def default_registry(registry: Optional[Registry] = None) -> Registry:
    """``registry`` if given, else the registry of the installed plugins (cached per entry-point set)."""
    if registry is not None:
        return registry
    return _cached_registry(_entry_point_key())
