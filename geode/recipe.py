"""Recipes: dataclasses read from and written to TOML, strictly.

`load_recipe(cls, source)` turns a TOML file (or an already-parsed dict) into an instance of
the dataclass `cls`, recursing into nested dataclasses, lists of dataclasses and dicts. It is
strict so that a typo never silently falls back to a default: an unknown key is an error
naming the key and its section, and a value of the wrong type is an error naming the field.
`recipe_to_toml(obj)` / `dump_recipe(obj, path)` write a recipe back so that loading the
output gives an equal object (`None` values are left out, so `None` must be their default).

Supported field types: bool, int, float (an int is accepted), str, pathlib.Path, Literal[...],
X | None, list[X], tuple[X, ...], dict[str | int, X], and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class RecipeError(ValueError):
    """A recipe has an unknown key, a missing required field or a value of the wrong type."""


# ---------------------------------------------------------------------------- reading
def load_recipe(cls: type[T], source: str | Path | Mapping[str, Any]) -> T:
    """Build the dataclass `cls` from a TOML file path or a parsed mapping; strict on keys."""
    if isinstance(source, Mapping):
        return _build_dataclass(cls, source, "")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from e
    try:
        return _build_dataclass(cls, data, "")
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e


def _where(section: str) -> str:
    return f"section [{section}]" if section else "the top level"


def _build_dataclass(cls: type[T], data: Mapping[str, Any], section: str) -> T:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{_where(section)} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise RecipeError(f"unknown key {key!r} in {_where(section)} (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{section}.{name}" if section else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {name!r} in {_where(section)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"invalid values in {_where(section)}: {e}") from e


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, field: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (tables -> dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: None is never written in TOML, so it is X
            return _convert(options[0], value, field)
        for arg in options:
            try:
                return _convert(arg, value, field)
            except RecipeError:
                pass
        want = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise RecipeError(f"field {field!r} must be {want}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise RecipeError(f"field {field!r} must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise RecipeError(f"field {field!r} must be a table, got {value!r}")
        return _build_dataclass(tp, value, field)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"field {field!r} must be an array, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if args and len(args) != len(value):
                raise RecipeError(f"field {field!r} must have {len(args)} items, got {value!r}")
            items = [_convert(a, v, f"{field}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{field}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"field {field!r} must be a table, got {value!r}")
        key_tp, val_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            if key_tp is int:
                try:
                    key: Any = int(k)
                except ValueError:
                    raise RecipeError(f"field {field!r}: key {k!r} must be an integer") from None
            else:
                key = k
            out[key] = _convert(val_tp, v, f"{field}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"field {field!r} must be a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"field {field!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"field {field!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"field {field!r} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise RecipeError(f"field {field!r} must be a path string, got {value!r}")
        return Path(value)
    raise RecipeError(f"field {field!r} has unsupported type {_type_name(tp)}")


# ---------------------------------------------------------------------------- writing
class _Section(dict):
    """A dataclass as a dict: written as a [section] (plain dicts of scalars go inline)."""


def recipe_to_dict(obj: Any) -> Any:
    """A dataclass (recursively) as plain dicts/lists/scalars; `None` values are dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = _Section()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None:
                out[f.name] = recipe_to_dict(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): recipe_to_dict(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [recipe_to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def recipe_to_toml(obj: Any) -> str:
    """TOML text for a recipe dataclass (or a dict of plain values); `load_recipe` reads it back."""
    data = recipe_to_dict(obj)
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a dataclass or a table, got {type(obj).__name__}")
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def dump_recipe(obj: Any, path: str | Path) -> Path:
    """Write `recipe_to_toml(obj)` to `path`; returns the path."""
    path = Path(path)
    path.write_text(recipe_to_toml(obj), encoding="utf-8")
    return path


def _is_table(v: Any) -> bool:
    """A dict written as a [section]: a dataclass, or a dict not all of plain scalars."""
    if isinstance(v, _Section):
        return True
    return isinstance(v, dict) and not all(
        isinstance(x, bool | int | float | str) for x in v.values()
    )


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table
        return "{" + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items()) + "}"
    raise RecipeError(f"cannot write value {v!r} of type {type(v).__name__} to TOML")


def _emit_table(data: dict, path: list[str], lines: list[str]) -> None:
    for k, v in data.items():
        if not _is_table(v) and not _is_table_array(v):
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in data.items():
        if _is_table(v):
            sub = [*path, _key(k)]
            lines += ["", f"[{'.'.join(sub)}]"]
            _emit_table(v, sub, lines)
    for k, v in data.items():
        if _is_table_array(v):
            sub = [*path, _key(k)]
            for item in v:
                lines += ["", f"[[{'.'.join(sub)}]]"]
                _emit_table(item, sub, lines)
