"""Typed dataclass configs: TOML sections, dotted `key=value` overrides (or mappings of dotted keys to typed values),
`Literal` choices, help from docstrings.

Each part of the pipeline owns its section, a dataclass whose fields carry a docstring (the string literal after
the field, which becomes its help text) and whose range checks live in its own `validate(self, prefix)` method.
This module knows none of the sections: it parses values by their annotated type (bool, int, float, str or a
`Literal[...]` of strings, a `list[...]` of those, or a `dict[str, str]` table), checks every `Literal` field once for the whole tree (`validate`), and prints every
bad value as one line naming the key, with a did-you-mean hint for misspelt keys and choices.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import json
import logging
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from dwm.errors import UserError

log = logging.getLogger(__name__)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


# ---------------------------------------------------------------- introspection


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal following each annotated field in the class body."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - no source (frozen app)
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in itertools.pairwise(body):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _all_docs(cls: type) -> dict[str, str]:
    """field_docs of cls and its dataclass bases (a composed config inherits its parts' fields)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if is_dataclass(base):
            docs.update(field_docs(base))
    return docs


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(t: Any) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` annotation, else None."""
    return tuple(typing.get_args(t)) if typing.get_origin(t) is Literal else None


def type_name(t: Any) -> str:
    c = choices(t)
    if c:
        return "|".join(map(str, c))
    if typing.get_origin(t) in (list, dict):
        return f"{typing.get_origin(t).__name__}[{', '.join(type_name(a) for a in typing.get_args(t))}]"
    return t.__name__


def iter_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field, in declaration order."""
    out = []
    docs, hs, inst = _all_docs(cls), hints(cls), cls()
    for f in fields(cls):
        t = hs[f.name]
        if is_dataclass(t):
            out += iter_keys(t, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, t, getattr(inst, f.name), docs.get(f.name, "")))
    return out


def help_text(cls: type) -> str:
    """Every key with its type, default and doc (e.g. the text of `dwm train --help-config`)."""
    lines = ["Configuration keys (TOML sections or dotted key=value overrides):", ""]
    for key, t, default, doc in iter_keys(cls):
        lines.append(f"  {key} ({type_name(t)}, default {fmt(default)})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


# ---------------------------------------------------------------- errors


def did_you_mean(value: str, options: list[str] | tuple[str, ...], prefix: str = "",
                 rename: dict[str, str] | None = None) -> str:
    """The hint ' (did you mean PREFIX+NAME?)' for the option closest to a mistyped value ('' when none is close);
    `rename` maps an option to what to suggest instead (a moved key's new name). The one did-you-mean of dwm."""
    close = difflib.get_close_matches(value, list(options), n=1)
    return f" (did you mean {prefix}{(rename or {}).get(close[0], close[0])}?)" if close else ""


def choice_error(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> UserError:
    hint = did_you_mean(str(value), [str(a) for a in allowed])
    return UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key {key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_range(key: str, value: float, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> None:
    """lo <= value <= hi (or < at an open end)."""
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"config key {key}: must be in {interval}, got {value!r}")


# ---------------------------------------------------------------- parsing


def _coerce(key: str, t: Any, value: Any, from_str: bool) -> Any:
    """value as type t, or a UserError naming the key. A list from a string is comma-separated (`seeds=0,1,2`)."""
    if typing.get_origin(t) is list:
        (elem,) = typing.get_args(t)
        if from_str:
            items = [x for x in value.split(",") if x.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", elem, x, from_str) for i, x in enumerate(items)]
    if typing.get_origin(t) is dict:
        if from_str and value.strip().startswith("{"):  # a TOML inline table: selections={random="", dsir=""}
            import tomllib

            try:
                value = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise UserError(f"config key {key}: {value!r} is not a TOML inline table ({e})") from None
        elif from_str or not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a table of name = value (on the command line "
                            f"{key}={{name = \"value\"}}, or {key}.NAME=value for one entry), got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", typing.get_args(t)[1], v, False) for k, v in value.items()}
    allowed = choices(t)
    if allowed is not None:
        v = value.strip() if from_str else value
        if v not in allowed:
            raise choice_error(key, v, allowed)
        return v
    bad = UserError(f"config key {key}: expected {t.__name__}, got {value!r}")
    if from_str:
        s = value.strip()
        if t is bool:
            if s.lower() in ("true", "1", "yes", "on"):
                return True
            if s.lower() in ("false", "0", "no", "off"):
                return False
            raise bad
        if t is str:
            return value
        try:
            v = int(s) if t is int else float(s)
        except ValueError:
            try:  # allow "1e6" for an int when it is whole
                f = float(s)
            except ValueError:
                raise bad from None
            if t is int and f.is_integer():
                return int(f)
            raise bad from None
        if t is float and not math.isfinite(v):
            raise bad
        return v
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover


def _unknown(key: str, cls: type, prefix: str, command: str) -> UserError:
    moved = getattr(cls, "MOVED", {})
    hint = did_you_mean(key, [f.name for f in fields(cls)] + list(moved), prefix, dict(moved))
    return UserError(f"unknown config key {prefix}{key}{hint}; see `{command} --help-config`")


def _moved(obj: Any, key: str, prefix: str) -> str | None:
    """The new dotted name (relative to obj) of a key a section has moved (its class's `MOVED` map), with a
    one-line deprecation warning; None for a key that never existed."""
    new = getattr(type(obj), "MOVED", {}).get(key)
    if new is not None:
        log.warning("config key %s%s is now %s%s (the old name still works; please update)", prefix, key, prefix,
                    new)
    return new


def apply_dict(obj: Any, data: dict[str, Any], prefix: str = "", command: str = "dwm train") -> None:
    """Set obj's fields (recursively, sections as sub-dicts) from parsed TOML; a moved key (the section's
    `MOVED`) is set at its new place, with a warning."""
    hs = hints(type(obj))
    for k, v in data.items():
        if k not in hs and (new := _moved(obj, k, prefix)) is not None:
            *path, name = new.split(".")
            sub = {name: v}
            for part in reversed(path):
                sub = {part: sub}
            apply_dict(obj, sub, prefix, command)
            continue
        if k not in hs:
            raise _unknown(k, type(obj), prefix, command)
        t = hs[k]
        if is_dataclass(t):
            if not isinstance(v, dict):
                raise UserError(f"config key {prefix}{k} is a section, got {v!r}")
            apply_dict(getattr(obj, k), v, f"{prefix}{k}.", command)
        else:
            if isinstance(v, dict) and typing.get_origin(t) is not dict:
                raise UserError(f"config key {prefix}{k} is a value, not a section")
            setattr(obj, k, _coerce(prefix + k, t, v, from_str=False))


def apply_override(cfg: Any, item: str, command: str = "dwm train") -> None:
    """Apply one `dotted.key=value` argument."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    key, value = item.split("=", 1)
    set_key(cfg, key, value, command, from_str=True)


def apply_overrides(cfg: Any, overrides: Any, command: str = "dwm train") -> None:
    """Apply overrides in order: a mapping of dotted keys (or sections as nested mappings) to typed values, a
    `key=value` string, or a sequence of both (`[{"train.max_steps": 100}, "optim.lr=3e-4"]`). A str value is read
    as on the command line (`{"optim.lr": "3e-4"}` works), a path-like one as its path."""
    if isinstance(overrides, (str, Mapping)):
        overrides = [overrides]
    for item in overrides:
        if isinstance(item, str):
            apply_override(cfg, item, command)
        elif isinstance(item, Mapping):
            for key, value in item.items():
                set_key(cfg, str(key), value, command)
        else:
            raise UserError(f"override {item!r} is neither a key=value string nor a mapping of keys to values")


def set_key(cfg: Any, key: str, value: Any, command: str = "dwm train", from_str: bool | None = None) -> None:
    """Set one dotted key; a section takes a mapping of its keys. from_str None: parse value as on the command
    line when it is a str, else check its type."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(value, tuple):
        value = list(value)
    parts = key.strip().split(".")
    obj, prefix = cfg, ""
    for i, p in enumerate(parts[:-1]):
        hs = hints(type(obj))
        if p in hs and typing.get_origin(hs[p]) is dict:  # one entry of a table: KEY.NAME=value
            if i != len(parts) - 2:
                raise UserError(f"config key {prefix}{p} is a table of name = value: set one entry as "
                                f"{prefix}{p}.NAME=value, not {key.strip()}")
            if from_str is None:
                from_str = isinstance(value, str)
            getattr(obj, p)[parts[-1]] = _coerce(key.strip(), typing.get_args(hs[p])[1], value, from_str)
            return
        if p not in hs or not is_dataclass(hs[p]):
            raise _unknown(p, type(obj), prefix, command)
        obj, prefix = getattr(obj, p), f"{prefix}{p}."
    name, hs = parts[-1], hints(type(obj))
    if name not in hs and (moved := _moved(obj, name, prefix)) is not None:
        return apply_override(cfg, f"{'.'.join([*parts[:-1], moved])}={value}", command)
    if name not in hs:
        raise _unknown(name, type(obj), prefix, command)
    if is_dataclass(hs[name]):
        if isinstance(value, Mapping) and not from_str:
            for k, v in value.items():
                set_key(cfg, f"{key.strip()}.{k}", v, command)
            return
        raise UserError(f"config key {key} is a section; set one of its keys, e.g. {key}.<name>=...")
    if from_str is None:
        from_str = isinstance(value, str)
    setattr(obj, name, _coerce(key, hs[name], value, from_str=from_str))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a malformed or unreadable file is a one-line UserError ("cannot parse PATH: ...").
    The one TOML reader of dwm (configs, recipes, run directories)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: Any = (), command: str = "dwm train") -> T:
    """Defaults of cls, then the TOML file (if any), then the overrides in order (`apply_overrides`: key=value
    strings and/or mappings of keys to typed values). Not yet validated."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        data = read_toml(p)
        apply_dict(cfg, data, command=command)
    apply_overrides(cfg, overrides, command)
    return cfg


def validate(obj: Any, prefix: str = "") -> None:
    """Check a config tree: every `Literal` field's value (one place for all choices), then each section's own
    `validate(prefix)` (ranges and cross-field rules), children before parents."""
    hs = hints(type(obj))
    for f in fields(obj):
        value, t = getattr(obj, f.name), hs[f.name]
        if is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
            continue
        allowed = choices(t)
        if allowed is not None and value not in allowed:
            raise choice_error(prefix + f.name, value, allowed)
        if typing.get_origin(t) is list and choices(typing.get_args(t)[0]) is not None:
            allowed = choices(typing.get_args(t)[0])
            for i, v in enumerate(value):
                if v not in allowed:
                    raise choice_error(f"{prefix}{f.name}[{i}]", v, allowed)
    own = getattr(obj, "validate", None)
    if callable(own):
        own(prefix)


# ---------------------------------------------------------------- output


def fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def _to_toml(obj: Any, section: str, out: list[str]) -> None:
    nested = []
    lines = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            nested.append((f.name, v))
        else:
            lines.append(f"{f.name} = {fmt(v)}")
    if section:
        out.append(f"\n[{section}]")
    out.extend(lines)
    for name, v in nested:
        _to_toml(v, f"{section}.{name}" if section else name, out)


def to_toml(cfg: Any, title: str = "resolved dwm train configuration") -> str:
    out = [f"# {title}"]
    _to_toml(cfg, "", out)
    return "\n".join(out) + "\n"


def to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: to_dict(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name)) else getattr(obj, f.name)
            for f in fields(obj)}
