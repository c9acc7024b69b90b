"""The registry's tables: `Registry` (stages, presets, adapters, tasks, launchers), `Preset`, `Registered`.

Plugins fill a `Registry` through its ``add_*`` methods (called from the hooks of
`vtprune.framework.hookspecs`); `vtprune.framework.registry.build_registry` builds and freezes one.
This module imports neither of those, so the hook specifications can name `Registry` directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import RegistrationError, UnknownNameError
from .stages import STAGE_KINDS, LayerPlacement, Stage, stage_params

__all__ = ["Preset", "Registered", "Registry"]

_NAME_RULE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Preset:
    """A named composition.

    Attributes:
        name: the recipe name.
        recipe: stage terms only (no preset); unnamed stages take the framework defaults.
        description: one line for the catalog.
        paper: citation (title, arXiv id) or "".
        code: official repository (and the commit read) or "".
    """

    name: str
    recipe: str
    description: str
    paper: str = ""
    code: str = ""


@dataclass(frozen=True)
class Registered:
    """A registered object and the plugin that registered it."""

    name: str
    obj: Any
    source: str
    description: str = ""


@dataclass
class Registry:
    """Everything the installed plugins provide. Filled by `build_registry`, then frozen."""

    stages: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in STAGE_KINDS})
    presets: dict[str, Registered] = field(default_factory=dict)
    adapters: dict[str, Registered] = field(default_factory=dict)
    tasks: dict[str, Registered] = field(default_factory=dict)
    launchers: dict[str, Registered] = field(default_factory=dict)
    _source: str = "<direct>"
    _frozen: bool = False

    # -- registration ------------------------------------------------------------------------

    def _claim(self, table: dict[str, Registered], what: str, name: str, obj: Any, description: str) -> None:
        if self._frozen:
            raise RegistrationError(f"the registry is frozen; register {what} {name!r} from a plugin hook")
        if not isinstance(name, str) or not _NAME_RULE.fullmatch(name):
            raise RegistrationError(
                f"{what} name {name!r} from plugin {self._source!r} must be lower_snake_case"
            )
        if name in table:
            raise RegistrationError(
                f"{what} {name!r} is registered twice: by plugin {table[name].source!r} and by plugin "
                f"{self._source!r}; rename one of them"
            )
        table[name] = Registered(name, obj, self._source, description)

    def add_stage(self, cls: type[Stage]) -> None:
        """Register a stage class under ``cls.kind`` / ``cls.name`` (validated here)."""
        if not (isinstance(cls, type) and issubclass(cls, Stage)) or cls.kind not in STAGE_KINDS:
            raise RegistrationError(
                f"plugin {self._source!r} registered {cls!r}, which does not subclass one of the stage "
                f"bases ({', '.join(STAGE_KINDS)}) in vtprune.framework.stages"
            )
        if not cls.description:
            raise RegistrationError(f"stage {cls.__name__} from plugin {self._source!r} needs a description")
        try:
            stage_params(cls)
        except TypeError as error:
            raise RegistrationError(f"{error} (plugin {self._source!r})") from None
        if cls.kind == "placement" and not issubclass(cls, LayerPlacement):
            raise RegistrationError(f"placement {cls.name!r} must subclass LayerPlacement")
        self._claim(self.stages[cls.kind], f"{cls.kind} stage", cls.name, cls, cls.description)

    def add_preset(self, name: str, recipe: str, description: str, paper: str = "", code: str = "") -> None:
        """Register a preset (a named recipe)."""
        if not description:
            raise RegistrationError(f"preset {name!r} from plugin {self._source!r} needs a description")
        preset = Preset(name, recipe, description, paper, code)
        self._claim(self.presets, "preset", name, preset, description)

    def add_adapter(self, cls: type) -> None:
        """Register a model adapter class (see ``vtprune_register_adapters``)."""
        for attribute in ("name", "model_classes", "provides", "runtime", "plan_factory"):
            if not hasattr(cls, attribute):
                raise RegistrationError(f"adapter {cls!r} from plugin {self._source!r} lacks {attribute!r}")
        if not hasattr(cls, "drop_kinds") and not hasattr(cls, "placements"):
            raise RegistrationError(f"adapter {cls!r} from plugin {self._source!r} declares neither 'drop_kinds' nor 'placements'")
        self._claim(self.adapters, "adapter", cls.name, cls, getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0])

    def add_task(self, name: str, factory: Callable[..., Any], description: str) -> None:
        """Register an evaluation task factory."""
        self._claim(self.tasks, "task", name, factory, description)

    def add_launcher(self, name: str, factory: Callable[..., Any], description: str) -> None:
        """Register a grid launcher factory."""
        self._claim(self.launchers, "launcher", name, factory, description)

    # -- lookup --------------------------------------------------------------------------------

    def stage(self, kind: str, name: str) -> type[Stage]:
        """The stage class registered as ``name`` under ``kind``; unknown -> `UnknownNameError`."""
        if kind not in self.stages:
            raise UnknownNameError("stage kind", kind, STAGE_KINDS)
        if name not in self.stages[kind]:
            raise UnknownNameError(f"{kind} stage", name, self.stages[kind])
        return self.stages[kind][name].obj

    def kinds_of(self, name: str) -> list[str]:
        """The stage kinds that have a stage called ``name``, in canonical order."""
        return [kind for kind in STAGE_KINDS if name in self.stages[kind]]

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise UnknownNameError("preset", name, self.presets)
        return self.presets[name].obj

    def task(self, name: str) -> Callable[..., Any]:
        if name not in self.tasks:
            raise UnknownNameError("task", name, self.tasks)
        return self.tasks[name].obj

    def launcher(self, name: str) -> Callable[..., Any]:
        if name not in self.launchers:
            raise UnknownNameError("launcher", name, self.launchers)
        return self.launchers[name].obj

    def adapter_for(self, model: Any) -> type:
        """The adapter class for ``model`` (an instance, or a model class): the one whose ``model_classes`` names
        the model's class or a base (nearest first); failing that, the first adapter, in registration order,
        whose optional capability probe ``accepts(model)`` is true (the generic adapter)."""
        mro = model.__mro__ if isinstance(model, type) else type(model).__mro__
        for klass in mro:
            for entry in self.adapters.values():
                if klass.__name__ in entry.obj.model_classes:
                    return entry.obj
        for entry in self.adapters.values():
            accepts = getattr(entry.obj, "accepts", None)
            if callable(accepts) and accepts(model):
                return entry.obj
        supported = sorted(c for e in self.adapters.values() for c in e.obj.model_classes)
        raise RegistrationError(
            f"no vtprune adapter supports {mro[0].__name__}; supported model classes: "
            f"{', '.join(supported) or 'none'} (write one: docs/adapters.md)"
        )

    def all_stage_names(self) -> list[str]:
        return sorted({name for table in self.stages.values() for name in table})

    def scoped(self, source: str) -> "Registry":
        """A view that records ``source`` as the registering plugin (shares the tables)."""
        view = Registry(self.stages, self.presets, self.adapters, self.tasks, self.launchers)
        view._source = source
        return view
