"""Typed dataclass configs <-> YAML recipes, with ``key=value`` command-line overrides.

A config is a (possibly nested) :func:`dataclasses.dataclass`. Values come from up to
three layers, applied in order, each validated against the dataclass field annotations:

1. ``base`` - a plain mapping (or a config instance) supplied by the caller,
2. a YAML recipe file (nested mappings and/or dotted keys),
3. command-line overrides such as ``optim.lr=1e-4`` or ``sizes=[256,512]``.

Override values are parsed with :func:`yaml.safe_load` and then coerced to the declared
type (``int``, ``float`` including ``"1e-4"`` strings, ``bool``, ``str``, ``Optional[X]``,
``list[X]``, ``tuple[X, ...]``, ``Literal[...]``, ``Enum``, ``Path``, nested dataclasses and
``dict``). Unknown keys at any depth raise :class:`~fastgen.errors.ConfigError` with a
"did you mean" suggestion.

Example::

    @dataclass
    class Optim:
        learning_rate: float = 1e-4

    @dataclass
    class Recipe:
        steps: int = 1000
        optim: Optim = field(default_factory=Optim)

    cfg = load_config(Recipe, "recipe.yaml", ["optim.learning_rate=3e-5", "steps=10"],
                      ignore_keys=("method",))
    save_config(cfg, "run/config.yaml", header={"method": "lcd"})
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from fastgen.errors import ConfigError
from fastgen.io import atomic_write_text

__all__ = [
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "parse_overrides",
    "config_keys",
    "read_recipe",
]

T = TypeVar("T")

_NoneType = type(None)
_MISSING = dataclasses.MISSING
_NULL_STRINGS = frozenset({"none", "null", "~"})


# --------------------------------------------------------------------------- helpers


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of the init fields of dataclass ``cls``."""
    if cls not in _HINTS_CACHE:
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # pragma: no cover - broken annotations are a programming bug
            raise ConfigError(
                f"cannot resolve the type annotations of config class {cls.__name__}: {exc}; "
                "make sure every annotation names an importable type"
            ) from exc
        _HINTS_CACHE[cls] = {
            f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init
        }
    return _HINTS_CACHE[cls]


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    """Members of a ``Union``/``X | Y`` annotation, or None when ``tp`` is not a union."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """Return ``(inner, allows_none)`` for ``Optional[inner]``; other types unchanged."""
    args = _union_args(tp)
    if args is None:
        return tp, tp is _NoneType
    non_none = tuple(a for a in args if a is not _NoneType)
    allows_none = len(non_none) != len(args)
    if len(non_none) == 1:
        return non_none[0], allows_none
    return Union[non_none], allows_none  # type: ignore[return-value]


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass type behind ``tp`` (also through ``Optional``), else None."""
    inner, _ = _strip_optional(tp)
    return inner if _is_dataclass_type(inner) else None


def _is_mapping_type(tp: Any) -> bool:
    inner, _ = _strip_optional(tp)
    origin = typing.get_origin(inner) or inner
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation, used in error messages."""
    if tp is Any:
        return "any value"
    if tp is _NoneType:
        return "null"
    args = _union_args(tp)
    if args is not None:
        return " or ".join(_type_name(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, typing.get_origin(typing.List)):
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(item)}]"
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return f"tuple[{_type_name(targs[0])}, ...]"
        return "tuple[" + ", ".join(_type_name(a) for a in targs) + "]"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        targs = typing.get_args(tp)
        if targs:
            return f"dict[{_type_name(targs[0])}, {_type_name(targs[1])}]"
        return "dict"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if _is_dataclass_type(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fmt_key(key: str) -> str:
    return key if key else "<root>"


class _Override:
    """An override's right-hand side: its raw text plus the YAML-parsed value."""

    __slots__ = ("text", "value")

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self.value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            # Not valid YAML (e.g. "a: b: c"); treat it as a plain string.
            self.value = text


# --------------------------------------------------------------------------- coercion


def _type_error(key: str, tp: Any, value: Any, source: str, hint: str = "") -> ConfigError:
    name = _type_name(tp)
    msg = (
        f"config key '{_fmt_key(key)}' (in {source}) expects {name}, got {value!r}"
        f" ({type(value).__name__})"
    )
    if hint:
        msg += f"; {hint}"
    if source.startswith("override"):
        msg += f"; write it as {_fmt_key(key)}=<{name}>"
    else:
        msg += f"; fix the value in the {source.split(' ')[0]} or override it with {_fmt_key(key)}=<{name}>"
    return ConfigError(msg)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Validate ``value`` against annotation ``tp`` and convert it where unambiguous.

    Raises:
        ConfigError: naming ``key``, the expected type and the value.
    """
    raw_text: str | None = None
    original = value
    if isinstance(value, _Override):
        raw_text, value = value.text, value.value

    if tp is Any or tp is object:
        return value

    inner, allows_none = _strip_optional(tp)
    if value is None:
        if allows_none:
            return None
        raise _type_error(key, tp, value, source)
    if allows_none and isinstance(value, str) and value.strip().lower() in _NULL_STRINGS:
        if inner is not str or raw_text is not None:
            return None

    members = _union_args(inner)
    if members is not None:
        # Prefer an exact type match, then the first member that accepts the value.
        for member in members:
            if isinstance(member, type) and type(value) is member:
                return value
        for member in members:
            try:
                return _coerce(original, member, key, source)
            except ConfigError:
                continue
        raise _type_error(key, tp, value, source)

    tp = inner
    origin = typing.get_origin(tp)

    if origin is Literal:
        options = typing.get_args(tp)
        for option in options:
            if type(option) is type(value) and option == value:
                return option
        if raw_text is not None and raw_text.strip() in options:
            return raw_text.strip()
        for option in options:
            if isinstance(option, str) and isinstance(value, (int, float)) and str(value) == option:
                return option
        raise _type_error(key, tp, value, source)

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        raise _type_error(key, tp, value, source, "use true or false")

    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, tp, value, source)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text.replace("_", ""))
            except ValueError:
                pass
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise _type_error(key, tp, value, source)

    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, tp, value, source)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise _type_error(key, tp, value, source)

    if tp is str:
        if raw_text is not None and not isinstance(value, str):
            # "name=0.10" or "flag=no" for a str field: keep what the user typed.
            return raw_text.strip()
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, tp, value, source, "quote the value to make it a string")

    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _type_error(key, tp, value, source)

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or (isinstance(value, str) and value == member.name):
                return member
        raise _type_error(key, tp, value, source)

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key, source)
        raise _type_error(key, tp, value, source, "give a mapping of its fields")

    if origin in (list, typing.get_origin(typing.Sequence)) or tp in (list, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        raise _type_error(key, tp, value, source, "write a YAML list, e.g. [1, 2]")

    if origin is tuple or tp is tuple:
        targs = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, source, "write a YAML list, e.g. [1, 2]")
        if not targs:
            return tuple(value)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(_coerce(v, targs[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(targs):
            raise _type_error(
                key, tp, value, source, f"it needs exactly {len(targs)} items, got {len(value)}"
            )
        return tuple(_coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, targs)))

    if (origin is not None and isinstance(origin, type) and issubclass(origin, Mapping)) or (
        isinstance(tp, type) and issubclass(tp, Mapping)
    ):
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value, source, "write a YAML mapping, e.g. {a: 1}")
        targs = typing.get_args(tp)
        key_tp, val_tp = targs if targs else (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.{k}", source): _coerce(v, val_tp, f"{key}.{k}", source)
            for k, v in value.items()
        }

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value, source)
    return value  # unknown typing construct: accept as-is


# --------------------------------------------------------------------------- schema walking


def config_keys(cls: type) -> list[str]:
    """All valid dotted keys of dataclass ``cls`` (nested dataclass prefixes included)."""
    keys: list[str] = []

    def walk(c: type, prefix: str, seen: tuple[type, ...]) -> None:
        for name, tp in _field_types(c).items():
            full = f"{prefix}{name}"
            keys.append(full)
            sub = _dataclass_of(tp)
            if sub is not None and sub not in seen:
                walk(sub, full + ".", seen + (sub,))

    walk(cls, "", (cls,))
    return keys


def _unknown_key(cls: type, prefix: str, parts: Sequence[str], source: str) -> ConfigError:
    """Error for an unknown key; suggestions come from the keys of ``cls`` (under ``prefix``).

    Matching is done on the part of the key below ``prefix`` so that a long shared prefix
    does not make unrelated keys look similar.
    """
    full_key = prefix + ".".join(parts)
    relative = ".".join(parts)
    valid = config_keys(cls)
    match = difflib.get_close_matches(relative, valid, n=1, cutoff=0.6)
    if not match:
        # Fall back to the first component against the field names at this level.
        names = list(_field_types(cls))
        first = difflib.get_close_matches(parts[0], names, n=1, cutoff=0.6)
        if first:
            match = [".".join([first[0], *parts[1:]])]
    msg = f"unknown config key '{full_key}' (in {source}); "
    if match:
        msg += f"did you mean '{prefix}{match[0]}'?"
    else:
        msg += "remove it or use one of the valid keys: " + ", ".join(prefix + k for k in valid)
    return ConfigError(msg)


def _default_value(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _instance_to_acc(obj: Any) -> dict[str, Any]:
    """Shallow-convert a dataclass instance into an accumulator dict (nested configs as dicts)."""
    acc: dict[str, Any] = {}
    types_ = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and _dataclass_of(types_[f.name]):
            acc[f.name] = _instance_to_acc(value)
        else:
            acc[f.name] = copy.deepcopy(value)
    return acc


def _defaults_acc(cls: type) -> dict[str, Any]:
    """Accumulator holding every default of ``cls`` (fields without one are absent)."""
    acc: dict[str, Any] = {}
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _default_value(f)
        if default is _MISSING:
            sub = _dataclass_of(types_[f.name])
            if sub is not None and _dataclass_of(types_[f.name]) is types_[f.name]:
                # Required nested config: start from its own defaults so partial keys work.
                acc[f.name] = _defaults_acc(sub)
            continue
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            acc[f.name] = _instance_to_acc(default)
        else:
            acc[f.name] = default
    return acc


def _assign(
    cls: type,
    acc: dict[str, Any],
    parts: list[str],
    value: Any,
    source: str,
    prefix: str,
) -> None:
    """Set ``parts`` (a dotted key split into components) to ``value`` inside ``acc``.

    ``cls`` is the dataclass that ``acc`` describes; nested dataclasses are descended into,
    mappings given for a nested dataclass update it key by key.
    """
    name, rest = parts[0], parts[1:]
    full = f"{prefix}{name}"
    types_ = _field_types(cls)
    if name not in types_:
        raise _unknown_key(cls, prefix, parts, source)
    tp = types_[name]
    sub = _dataclass_of(tp)

    if sub is not None:
        raw = value.value if isinstance(value, _Override) else value
        if rest or isinstance(raw, Mapping):
            current = acc.get(name)
            if not isinstance(current, dict):
                if dataclasses.is_dataclass(current) and not isinstance(current, type):
                    current = _instance_to_acc(current)
                else:  # None (an unset Optional config) or absent
                    current = _defaults_acc(sub)
                acc[name] = current
            if rest:
                _assign(sub, current, rest, value, source, full + ".")
            else:
                for k, v in raw.items():
                    if not isinstance(k, str) or not k:
                        raise ConfigError(
                            f"config key '{full}' (in {source}) has a non-string sub-key {k!r}; "
                            "use field names as keys"
                        )
                    _assign(sub, current, k.split("."), v, source, full + ".")
            return
        acc[name] = _coerce(value, tp, full, source)
        return

    if rest:
        if _is_mapping_type(tp):
            current = acc.get(name)
            if not isinstance(current, dict):
                current = {}
                acc[name] = current
            inner, _ = _strip_optional(tp)
            targs = typing.get_args(inner)
            val_tp = targs[1] if targs else Any
            val_dc = _dataclass_of(val_tp)
            if val_dc is not None and len(rest) >= 2:  # e.g. train.optimizers.student.fused=true
                entry = current.get(rest[0])
                if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
                    entry = _instance_to_acc(entry)
                elif not isinstance(entry, dict):
                    entry = _defaults_acc(val_dc)
                where = f"{full}.{rest[0]}."
                _assign(val_dc, entry, rest[1:], value, source, where)
                current[rest[0]] = _instantiate(val_dc, entry, where, source)
                return
            node = current
            for i, part in enumerate(rest[:-1]):
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    node[part] = nxt
                node = nxt
            leaf_tp = val_tp if len(rest) == 1 else Any
            node[rest[-1]] = _coerce(value, leaf_tp, ".".join([full, *rest]), source)
            return
        raise ConfigError(
            f"config key '{full}' (in {source}) is of type {_type_name(tp)} and has no sub-key "
            f"'{rest[0]}'; set it directly, e.g. {full}=<{_type_name(tp)}>"
        )

    acc[name] = _coerce(value, tp, full, source)


def _instantiate(cls: type[T], acc: Mapping[str, Any], prefix: str, source: str) -> T:
    """Build ``cls`` from an accumulator (values already coerced)."""
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        full = f"{prefix}{f.name}"
        if f.name in acc:
            value = acc[f.name]
            sub = _dataclass_of(types_[f.name])
            if sub is not None and isinstance(value, dict):
                value = _instantiate(sub, value, full + ".", source)
            kwargs[f.name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ConfigError(
                f"missing required config key '{full}' (in {source}); set it in the recipe "
                f"or pass {full}=<{_type_name(types_[f.name])}> on the command line"
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(
            f"invalid config for '{where}' (in {source}): {exc}; fix the offending values"
        ) from exc


def _build(cls: type[T], mapping: Mapping[str, Any], prefix: str, source: str) -> T:
    """Build dataclass ``cls`` from a nested mapping on top of its defaults."""
    acc = _defaults_acc(cls)
    _apply_mapping(cls, acc, mapping, source, prefix + "." if prefix else "")
    return _instantiate(cls, acc, prefix + "." if prefix else "", source)


def _apply_mapping(
    cls: type,
    acc: dict[str, Any],
    mapping: Mapping[str, Any],
    source: str,
    prefix: str = "",
) -> None:
    for key, value in mapping.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"invalid config key {key!r} (in {source}); keys must be non-empty field names, "
                "optionally dotted like optim.lr"
            )
        _assign(cls, acc, key.split("."), value, source, prefix)


# --------------------------------------------------------------------------- public API


def _split_override(item: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(
            f"override {item!r} has no '='; write overrides as key=value, "
            "e.g. optim.lr=1e-4 or steps=1000"
        )
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(
            f"override {item!r} has an empty key; write overrides as key=value, e.g. optim.lr=1e-4"
        )
    return key, text


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "steps=10"]`` into ``{"optim": {"lr": 1e-4}, "steps": 10}``.

    Values are parsed with :func:`yaml.safe_load` (no type coercion: no schema is known
    here). Later overrides win over earlier ones.

    Raises:
        ConfigError: for an item without ``=``, or when a key is both a value and a section
            (``a=1`` together with ``a.b=2``).
    """
    result: dict[str, Any] = {}
    for item in overrides:
        key, text = _split_override(item)
        value = _Override(text).value
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r} sets a sub-key of '{'.'.join(parts[: i + 1])}', which an "
                    "earlier override set to a plain value; keep only one of the two overrides"
                )
            node = nxt
        node[parts[-1]] = value
    return result


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML recipe file into a mapping (empty file -> ``{}``).

    Raises:
        ConfigError: when the file is missing, is not valid YAML or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"recipe file '{p}' does not exist; check the path (or pass no recipe to use defaults)"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file '{p}' is not valid YAML: {exc}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe file '{p}' must contain a mapping of keys to values at the top level, "
            f"found a {type(data).__name__}; write it as 'key: value' lines"
        )
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | Any | None = None,
    *,
    ignore_keys: Sequence[str] = (),
) -> T:
    """Build a ``cls`` config from defaults, ``base``, a YAML recipe and overrides.

    Args:
        cls: the dataclass type to build.
        path: optional YAML recipe; nested mappings or dotted keys address nested fields.
        overrides: ``key=value`` strings applied last (``optim.lr=1e-4``).
        base: optional mapping (or ``cls`` instance) applied before the recipe.
        ignore_keys: top-level recipe/base keys to skip, e.g. ``("method",)``.

    Raises:
        ConfigError: unknown keys (with a suggestion), values of the wrong type, malformed
            overrides, missing required keys or an unreadable recipe.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if not _is_dataclass_type(cls):
        raise ConfigError(f"load_config needs a dataclass type, got {cls!r}; decorate it with @dataclass")
    ignored = set(ignore_keys)
    acc = _defaults_acc(cls)

    if base is not None:
        if dataclasses.is_dataclass(base) and not isinstance(base, type):
            base_map: Mapping[str, Any] = _instance_to_acc(base)
            # Values of an instance are already typed; still validated below.
        elif isinstance(base, Mapping):
            base_map = base
        else:
            raise ConfigError(
                f"base config must be a mapping or a {cls.__name__} instance, got "
                f"{type(base).__name__}; pass a dict"
            )
        _apply_mapping(cls, acc, {k: v for k, v in base_map.items() if k not in ignored}, "base config")

    if path is not None:
        data = read_recipe(path)
        _apply_mapping(cls, acc, {k: v for k, v in data.items() if k not in ignored}, f"recipe '{path}'")

    for item in overrides:
        key, text = _split_override(item)
        _assign(cls, acc, key.split("."), _Override(text), f"override '{item}'", "")

    source = f"recipe '{path}'" if path is not None else "config"
    return _instantiate(cls, acc, "", source)


def config_from_dict(cls: type[T], d: Mapping[str, Any], *, ignore_keys: Sequence[str] = ()) -> T:
    """Build a ``cls`` config from a (nested) mapping, validating keys and types."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config_from_dict needs a mapping, got {type(d).__name__}; pass a dict")
    if not _is_dataclass_type(cls):
        raise ConfigError(f"config_from_dict needs a dataclass type, got {cls!r}; decorate it with @dataclass")
    acc = _defaults_acc(cls)
    ignored = set(ignore_keys)
    _apply_mapping(cls, acc, {k: v for k, v in d.items() if k not in ignored}, "dict")
    return _instantiate(cls, acc, "", "dict")


def _to_plain(value: Any) -> Any:
    """Convert a config value into YAML-safe builtins (tuples -> lists, Path -> str...)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
        }
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) else str(k)): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _to_plain(value.item())
        except Exception:
            pass
    return str(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return ``cfg`` (a dataclass instance) as nested plain YAML-safe builtins."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise ConfigError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def save_config(
    cfg: Any, path: str | os.PathLike[str], *, header: Mapping[str, Any] | None = None
) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (:func:`fastgen.io.atomic_write_text`).

    Args:
        cfg: dataclass instance.
        path: destination file; parent folders are created.
        header: extra top-level keys written first, e.g. ``{"method": "lcd"}`` (read them
            back with ``load_config(..., ignore_keys=("method",))``).
    """
    data: dict[str, Any] = dict(_to_plain(dict(header))) if header else {}
    body = config_to_dict(cfg)
    clash = set(data) & set(body)
    if clash:
        raise ConfigError(
            f"save_config header keys {sorted(clash)} clash with config fields; rename the header keys"
        )
    data.update(body)
    dest = Path(path)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write_text(dest, text)
    return dest
