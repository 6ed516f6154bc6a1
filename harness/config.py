"""Frozen dataclasses from YAML: the one loader recipes, eval suites and other configs share.

Validation happens at load time so a typo fails in the first second, not after an hour of training:
an unknown key names its dotted path and the nearest valid keys; a wrong type or value names the
key, the value and what is allowed. Supported field types: bool, int, float, str, ``Literal[...]``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses.

A field's ``metadata`` may carry ``{"min": a, "max": b}`` (inclusive bounds) and ``"help"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from harness.errors import ConfigError

T = TypeVar("T")

EXTENDS_KEY = "extends"


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(sorted(options))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, path: str, value: Any, expected: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{where}: key {path!r} = {shown}: expected {expected}")


def _convert(tp: Any, value: Any, path: str, where: str) -> Any:
    """``value`` checked and converted to ``tp``, or a :class:`ConfigError` naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, path, where)
    if origin is Literal:
        return _convert_literal(tp, value, path, where)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, where)
    if origin in (list, tuple):
        return _convert_sequence(tp, value, path, where)
    if origin is dict:
        return _convert_mapping(tp, value, path, where)
    return _convert_scalar(tp, value, path, where)


def _convert_union(tp: Any, value: Any, path: str, where: str) -> Any:
    """``X | Y | None``: None when allowed, else the first member type that accepts ``value``."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, path, where)
        except ConfigError as e:
            errors.append(e)
    raise _fail(where, path, value, _type_name(tp))


def _convert_literal(tp: Any, value: Any, path: str, where: str) -> Any:
    if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
        return value
    raise _fail(where, path, value, _type_name(tp))


def _convert_dataclass(tp: Any, value: Any, path: str, where: str) -> Any:
    if not isinstance(value, dict):
        raise _fail(where, path, value, "a mapping")
    return _build(tp, value, path + ".", where)


def _convert_sequence(tp: Any, value: Any, path: str, where: str) -> tuple:
    """``list[X]`` / ``tuple[X, ...]`` from a YAML list, item by item."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise _fail(where, path, value, _type_name(tp))
    inner = get_args(tp)[0]
    items = [_convert(inner, v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    return tuple(items)  # tuples keep frozen dataclasses hashable and immutable


def _convert_mapping(tp: Any, value: Any, path: str, where: str) -> types.MappingProxyType:
    """``dict[str, X]`` from a YAML mapping, as a read-only mapping with string keys."""
    if not isinstance(value, dict):
        raise _fail(where, path, value, _type_name(tp))
    inner = get_args(tp)[1]
    return types.MappingProxyType({str(k): _convert(inner, v, f"{path}.{k}", where) for k, v in value.items()})


def _convert_scalar(tp: Any, value: Any, path: str, where: str) -> Any:
    """bool, int, float or str; any other field type is a bug in the schema."""
    for kind, convert in ((bool, _to_bool), (int, _to_int), (float, _to_float), (str, _to_str)):
        if tp is kind:
            return convert(value, path, where)
    raise TypeError(f"config field type {tp!r} at {path} is not supported")  # a bug in the schema


def _to_bool(value: Any, path: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _fail(where, path, value, "true or false")


def _to_int(value: Any, path: str, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _fail(where, path, value, "an integer")


def _to_float(value: Any, path: str, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise _fail(where, path, value, "a finite number")
        return float(value)
    if isinstance(value, str):  # YAML reads 1e-4 as a string (YAML 1.1 wants 1.0e-4)
        try:
            f = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(f):
                return f
    raise _fail(where, path, value, "a number")


def _to_str(value: Any, path: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _fail(where, path, value, "a string")


def _check_bounds(field: dataclasses.Field, value: Any, path: str, where: str) -> None:
    lo, hi = field.metadata.get("min"), field.metadata.get("max")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise _fail(where, path, value, f"a value {rng}")


def _build(cls: type[T], data: dict, prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {prefix + str(key)!r}; {_nearest(str(key), list(fields))}")
    kwargs = {}
    for name, field in fields.items():
        path = prefix + name
        if name in data:
            value = _convert(hints[name], data[name], path, where)
            _check_bounds(field, value, path, where)
            kwargs[name] = value
        elif field.default_factory is not dataclasses.MISSING:
            # Normalise factory defaults (list -> tuple) so a dumped-and-reloaded config compares equal.
            kwargs[name] = _convert(hints[name], to_dict(field.default_factory()), path, where)
        elif field.default is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {path!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as e:  # __post_init__ cross-field checks
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from e


def from_dict(cls: type[T], data: dict, where: str = "<config>") -> T:
    """Build ``cls`` from a plain mapping, validating every key, type and bound."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(cls, data, "", where)


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, following ``extends:`` (a path relative to the file) recursively."""
    return _read_yaml(Path(path), ())


MAX_CONFIG_BYTES = 1 << 20  # a recipe or suite is a few KB
MAX_YAML_NODES = 100_000  # after expanding aliases; a 1 KB file of nested aliases expands to billions


def _expanded_nodes(root) -> int:
    """Nodes of a composed YAML document with every alias expanded (aliases share node objects, so
    a memo by identity counts the expansion without doing it)."""
    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


def safe_yaml(text: str, where: str):
    """``yaml.safe_load`` that refuses documents whose aliases expand past :data:`MAX_YAML_NODES`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node)
        if n > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to {n:,} values through aliases (at most {MAX_YAML_NODES:,}); "
                              "refusing to build it")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' forms a cycle ({chain})")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; not a recipe or suite")
    try:
        data = safe_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # ReaderError's text spans lines
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: key '{EXTENDS_KEY}' = {parent!r}: expected a path to another YAML file")
    base = _read_yaml((path.parent / parent), (*seen, resolved))
    return deep_merge(base, data)


def deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key; anything else in ``over`` replaces the value in ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str], where: str = "command line") -> dict:
    """``["train.lr=1e-5", "lora.rank=8"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: override {item!r}: expected key=value (dotted keys for nested values)")
        try:
            value = safe_yaml(raw, f"{where}: override {key!r}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{where}: override {item!r} conflicts with an earlier override of '{part}'")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read ``path`` (following ``extends:``), apply ``key=value`` overrides and validate as ``cls``."""
    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data, where=str(path))


def dump_yaml(obj: Any) -> str:
    data = to_dict(obj)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    # PyYAML emits NEL/LS/PS raw with allow_unicode, and reads them back as line breaks; escape then.
    if yaml.safe_load(text) != data:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
    return text
