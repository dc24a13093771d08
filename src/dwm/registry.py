"""Name -> component registries: how a config's `mode` string becomes a weighter or selector class.

A registry entry is a class (or factory) or a lazy "module:attribute" string, so that naming a built-in costs no
import until it is used. Packages outside dwm can add entries with `register`, or through the entry-point group
`dwm.<kind>s` (e.g. `[project.entry-points."dwm.weighters"] mine = "mypkg.weighting:MyWeighter"`), looked up when a
name is not registered in-process. Unknown names are one-line errors with a did-you-mean hint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from dwm.config import did_you_mean
from dwm.errors import UserError


class Registry:
    def __init__(self, kind: str, config_key: str):
        self.kind, self.config_key = kind, config_key
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """register(name, cls_or_"module:attr"), or as a class decorator: @REGISTRY.register(name)."""
        if obj is None:
            def deco(o: Any) -> Any:
                self._items[name] = o
                return o
            return deco
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _entry_points(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=f"dwm.{self.kind}s")}

    def names(self) -> list[str]:
        return sorted({*self._items, *self._entry_points()})

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._entry_points()

    def get(self, name: str) -> Callable[..., Any]:
        """The class/factory registered as `name` (imported now if it was lazy)."""
        obj = self._items.get(name)
        if obj is None:
            ep = self._entry_points().get(name)
            if ep is None:
                hint = did_you_mean(name, self.names())
                raise UserError(f"config key {self.config_key}: no {self.kind} named {name!r}{hint}; "
                                f"known: {', '.join(self.names())}")
            obj = ep.load()
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
        self._items[name] = obj
        return obj
