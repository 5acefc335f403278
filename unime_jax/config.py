"""Typed configuration, generically: YAML files → nested dataclasses, with ``--set a.b=value`` overrides.

Any dataclass tree loads with :func:`from_dict`: the run config (``unime_jax.runs.schema.Config``,
whose sections live with the code they configure), model architecture configs stored beside
checkpoints, data sections. This module knows none of them.

Pipeline used by :func:`load_config`::

    load_yaml_tree(path)          # YAML + ``extends:`` inheritance → plain dict
    apply_overrides(tree, [...])  # ``a.b.c=value`` strings → plain dict
    from_dict(cls, tree)          # type-checked dataclass tree

Errors are :class:`ConfigError` and say which dotted key, which file (or ``--set``) and what
was expected, because config typos are the most common way a long run dies at startup.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import io
import operator
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "FieldError",
    "add_config_args",
    "apply_overrides",
    "check_range",
    "config_from_args",
    "describe",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml_tree",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match the config dataclasses."""

    exit_code = 2  # a usage error for the command lines (unime_jax.cli_errors)


class FieldError(ValueError):
    """A dataclass's own check (``__post_init__``) rejects one of its fields: :func:`from_dict`
    reports it at that field's dotted key, with the file or ``--set`` it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def check_range(
    obj: Any,
    name: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> None:
    """Raise :class:`FieldError` unless ``obj.name`` lies in the range (None passes: "not set")."""
    value = getattr(obj, name)
    bounds = [
        (at_least, operator.ge, "at least"),
        (above, operator.gt, "above"),
        (at_most, operator.le, "at most"),
        (below, operator.lt, "below"),
    ]
    bounds = [(bound, holds, words) for bound, holds, words in bounds if bound is not None]
    if value is not None and not all(holds(value, bound) for bound, holds, _ in bounds):  # NaN fails too
        wanted = " and ".join(f"{words} {bound}" for bound, _, words in bounds)
        raise FieldError(name, f"must be {wanted}, got {value!r}")


# --------------------------------------------------------------------------------------------
# YAML reading: PyYAML implements YAML 1.1, where `1e-4` and `1.5e3` are *strings* (a float
# needs a dot and a signed exponent). Learning rates are written exactly like that, so our
# loader also resolves exponent notation as float. Quoted scalars ('1e-4') stay strings.
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4`, `5e3`, `1.5e3` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader subclass: no arbitrary objects


# --------------------------------------------------------------------------------------------
# Provenance: dotted key path → where it was set ("configs/x.yaml" or "--set a.b=1"), so an
# error deep inside a merged tree can name the file the offending key came from. The empty path
# "" is the top-level file.
# --------------------------------------------------------------------------------------------

Sources = dict[str, str]
_LAST_SEGMENT = re.compile(r"(?:\.[^.\[]*|\[\d+\])$")


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _parent_path(path: str) -> str:
    trimmed = _LAST_SEGMENT.sub("", path)
    return "" if trimmed == path else trimmed


def _lookup_source(source: str | Mapping[str, str] | None, where: str) -> str | None:
    """The origin of `where`: the longest recorded prefix of the dotted path."""
    if source is None or isinstance(source, str):
        return source
    path = where
    while True:
        if path in source:
            return source[path]
        if not path:
            return None
        path = _parent_path(path)


def _is_below(path: str, ancestor: str) -> bool:
    if not ancestor:
        return bool(path)
    return path.startswith(f"{ancestor}.") or path.startswith(f"{ancestor}[")


def _forget_subpaths(sources: Sources, path: str) -> None:
    """Drop provenance below `path`: it is being replaced wholesale."""
    stale = [p for p in sources if _is_below(p, path)]
    for p in stale:
        del sources[p]


def _record(sources: Sources, tree: Mapping[str, Any], origin: str, where: str = "") -> None:
    for key, value in tree.items():
        path = _join(where, key)
        sources[path] = origin
        if isinstance(value, Mapping):
            _record(sources, value, origin, path)


# --------------------------------------------------------------------------------------------
# YAML files with `extends:` inheritance
# --------------------------------------------------------------------------------------------


def _read_yaml_mapping(path: Path, included_from: Path | None) -> dict[str, Any]:
    via = f" (extended from {included_from})" if included_from else ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}{via}: {e.strerror or e}") from e
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in config file {path}{via}: {e}") from e
    if data is None:  # an empty file is an empty config, not an error
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}{via} must contain a mapping at top level, got {type(data).__name__}"
        )
    return data


def _extends_list(value: Any, path: Path) -> list[Path]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"'extends' in {path} must be a file name or a list of file names, got {value!r}")
    # Relative to the including file, so a config tree can be moved or used from any cwd.
    return [path.parent / name for name in names]


def _merge(
    dst: dict[str, Any], src: Mapping[str, Any], sources: Sources, src_sources: Sources, where: str = ""
) -> None:
    """Deep-merge `src` into `dst` in place (dicts merge, anything else replaces), provenance too."""
    if where in src_sources:
        sources[where] = src_sources[where]
    for key, value in src.items():
        path = _join(where, key)
        if isinstance(dst.get(key), dict) and isinstance(value, Mapping):
            _merge(dst[key], value, sources, src_sources, path)
            continue
        dst[key] = copy.deepcopy(value)
        # The old value is gone wholesale, so is any provenance recorded below it.
        _forget_subpaths(sources, path)
        sources.update({p: o for p, o in src_sources.items() if p == path or _is_below(p, path)})


def _load_tree(
    path: Path, chain: tuple[Path, ...] = (), included_from: Path | None = None
) -> tuple[dict[str, Any], Sources]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"'extends' cycle: {cycle}")
    own = _read_yaml_mapping(path, included_from)
    bases = _extends_list(own.pop("extends", None), path)

    tree: dict[str, Any] = {}
    sources: Sources = {}
    for base in bases:  # later bases override earlier ones, the file itself overrides all
        base_tree, base_sources = _load_tree(base, (*chain, resolved), path)
        _merge(tree, base_tree, sources, base_sources)
    own_sources: Sources = {"": str(path)}
    _record(own_sources, own, str(path))
    _merge(tree, own, sources, own_sources)
    return tree, sources


def load_yaml_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config, resolving `extends:` (a file or list of files, relative to this one).

    Bases load first (recursively) and are deep-merged in order, then this file on top: dicts
    merge key by key, lists and scalars replace.
    """
    return _load_tree(Path(path))[0]


# --------------------------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------------------------


def _parse_override(override: str) -> tuple[list[str], Any]:
    key, sep, text = override.partition("=")
    keys = [k.strip() for k in key.split(".")]
    if not sep or not all(keys):
        raise ConfigError(
            f"malformed override {override!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=1e-4"
        )
    try:
        value = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {override!r} as YAML: {e}") from e
    return keys, value


def _set_path(tree: dict[str, Any], keys: list[str], value: Any, override: str) -> list[str]:
    """Set `tree[k0][k1]...= value`; returns the dotted paths of the sections it had to create."""
    node, created = tree, []
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        child = node.get(key)
        if child is None:  # also fills a section that a file set to null
            child = node[key] = {}
            created.append(where)
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: '{where}' holds {type(child).__name__} {_short_repr(child)}, "
                "not a section with keys"
            )
        node = child
    node[keys[-1]] = value
    return created


def _apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str], sources: Sources) -> dict[str, Any]:
    result = copy.deepcopy(dict(tree))
    for override in overrides:
        keys, value = _parse_override(override)
        origin = f"--set {override}"
        for created in _set_path(result, keys, value, override):
            sources[created] = origin  # an unknown section name is this override's fault
        path = ".".join(keys)
        _forget_subpaths(sources, path)
        sources[path] = origin
        if isinstance(value, Mapping):
            _record(sources, value, origin, path)
    return result


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `tree` with each ``a.b.c=value`` override applied (value parsed as YAML).

    Missing intermediate sections are created; the value replaces whatever was there.
    """
    return _apply_overrides(tree, overrides, {})


# --------------------------------------------------------------------------------------------
# from_dict: plain data → typed dataclass tree
# --------------------------------------------------------------------------------------------


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward reference: a bug in the dataclass, not the config
        raise TypeError(f"cannot resolve the type hints of {cls.__qualname__}: {e}") from e


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{_type_name(args[0])}, ...]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suffix(source: str | Mapping[str, str] | None, where: str) -> str:
    origin = _lookup_source(source, where)
    return f" (in {origin})" if origin else ""


def _mismatch(where: str, expected: str, value: Any, source: str | Mapping[str, str] | None) -> ConfigError:
    return ConfigError(
        f"{where or '<top level>'}: expected {expected}, got {type(value).__name__} {_short_repr(value)}"
        + _suffix(source, where)
    )


def _shape_matches(tp: Any, value: Any) -> bool:
    """Whether `value` has the container shape of `tp` (so a deeper error is the relevant one)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, list | tuple)
    return False


def _convert_union(tp: Any, value: Any, where: str, source: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors: list[tuple[Any, ConfigError]] = []
    for arm in args:
        if arm is type(None):
            continue
        try:
            return _convert(arm, value, where, source)
        except ConfigError as e:
            errors.append((arm, e))
    # If exactly one arm is the right kind of container, its detailed error is the useful one
    # (e.g. an unknown key inside an Optional section); otherwise report the whole union.
    shaped = [e for arm, e in errors if _shape_matches(arm, value)]
    if len(shaped) == 1:
        raise shaped[0]
    raise _mismatch(where, _type_name(tp), value, source)


def _convert_sequence(tp: Any, value: Any, where: str, source: Any) -> list[Any] | tuple[Any, ...]:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise _mismatch(where, _type_name(tp), value, source)
    if origin is list:
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{where}[{i}]", source) for i, v in enumerate(value))
    if args == ((),):  # tuple[()]: the empty tuple
        args = ()
    if len(value) != len(args):
        raise ConfigError(
            f"{where}: expected {_type_name(tp)} with {len(args)} items, got {len(value)}: "
            f"{_short_repr(value)}{_suffix(source, where)}"
        )
    return tuple(
        _convert(a, v, f"{where}[{i}]", source) for i, (a, v) in enumerate(zip(args, value, strict=True))
    )


def _convert_dict(tp: Any, value: Any, where: str, source: Any) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _mismatch(where, _type_name(tp), value, source)
    key_tp, value_tp = typing.get_args(tp) or (Any, Any)
    return {
        _convert(key_tp, k, f"{_join(where, k)} (key)", source): _convert(
            value_tp, v, _join(where, k), source
        )
        for k, v in value.items()
    }


def _convert_scalar(tp: Any, value: Any, where: str, source: Any) -> Any:
    # bool is a subclass of int: rule it out explicitly so `true` is not a valid int and
    # 0/1 are not valid bools.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # `lr: 1` in YAML means 1.0
        ok = isinstance(value, float)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is type(None):
        ok = value is None
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        raise TypeError(f"{where}: unsupported config field type {tp!r}")
    if not ok:
        raise _mismatch(where, _type_name(tp), value, source)
    return value


def _convert(tp: Any, value: Any, where: str, source: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where, source=source)
    if _is_union(tp):
        return _convert_union(tp, value, where, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # Compare types too: True == 1, and Literal[1] must not accept `true`.
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(
                f"{where}: expected one of {', '.join(repr(a) for a in allowed)}, "
                f"got {type(value).__name__} {_short_repr(value)}{_suffix(source, where)}"
            )
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(tp, value, where, source)
    if origin is dict or tp is dict:
        return _convert_dict(tp, value, where, source)
    return _convert_scalar(tp, value, where, source)


def _unknown_key_error(cls: type, key: str, where: str, source: Any) -> ConfigError:
    valid = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(key, valid, n=3)
    path = _join(where, key)
    origin = _lookup_source(source, path)
    message = f"unknown key '{path}'" + (f" in {origin}" if origin else "") + ": "
    if close:
        message += "did you mean " + " or ".join(f"'{c}'" for c in close) + "? "
    level = f"in '{where}'" if where else "at top level"
    ordered = close + [v for v in valid if v not in close]
    message += f"valid keys {level} ({cls.__name__}): {', '.join(ordered)}"
    return ConfigError(message)


def from_dict(
    cls: type[T],
    data: Mapping[str, Any] | T,
    where: str = "",
    *,
    source: str | Mapping[str, str] | None = None,
) -> T:
    """Build a `cls` dataclass instance from plain data, checking every value against the type hints.

    Args:
      cls: a dataclass type; nested dataclass fields are built recursively.
      data: a mapping of field name → value (an instance of `cls` is returned unchanged).
      where: dotted path of `data` inside a larger tree, used in error messages.
      source: where the data came from, for error messages: a file name, or a mapping from
        dotted key paths to origins (the longest matching prefix wins).

    Missing fields take their dataclass default. Raises ConfigError for unknown keys, missing
    required fields and values of the wrong type.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _mismatch(where, f"a mapping of {cls.__name__} fields", data, source)
    hints = _type_hints(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(cls, str(key), where, source)

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = _join(where, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required field '{path}'{_suffix(source, where)}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        path = _join(where, e.field)
        raise ConfigError(f"{path} {e.message}{_suffix(source, path)}") from e
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        # A __post_init__ check failed: say which section it was.
        raise ConfigError(
            f"{where or '<top level>'}: invalid {cls.__name__}: {e}{_suffix(source, where)}"
        ) from e


# --------------------------------------------------------------------------------------------
# to_dict / dump_yaml
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, YAML-safe nested dict of a dataclass instance (tuples become lists)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def dump_yaml(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write `to_dict(obj)` as YAML (field order kept), creating parent directories."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str], cls: type[T]) -> T:
    """Load `path` (with `extends`), apply ``a.b=value`` overrides, build and check `cls`.

    With `path` None the dataclass defaults are the starting point.
    """
    tree, sources = ({}, {}) if path is None else _load_tree(Path(path))
    tree = _apply_overrides(tree, overrides, sources)
    return from_dict(cls, tree, source=sources)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and repeatable ``--set KEY=VALUE`` to `parser`."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML config file; may start with 'extends: base.yaml' (path relative to the file). "
        "Without it the built-in defaults are used.",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=None,  # not []: argparse would append into a shared default list
        help="override one config value by dotted key, e.g. --set model.dtype=float32 --set mesh.fsdp=8; "
        "VALUE is parsed as YAML (1e-4 → float, [1,2] → list, null → None). Repeatable; applied after --config.",
    )


def config_from_args(args: argparse.Namespace, cls: type[T]) -> T:
    """Build the config from the arguments added by :func:`add_config_args`."""
    return load_config(args.config, args.overrides or (), cls)


# --------------------------------------------------------------------------------------------
# describe: human-readable listing for --help epilogs
# --------------------------------------------------------------------------------------------


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field, inherited fields included (best effort)."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(base):
            comments.update(_own_field_comments(base))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field in the class's own source ({} if unavailable)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        class_def = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError):
        return {}
    if not isinstance(class_def, ast.ClassDef):
        return {}
    return {
        node.target.id: comments[node.end_lineno or node.lineno]
        for node in class_def.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and (node.end_lineno or node.lineno) in comments
    }


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a field type (`X` or `X | None`), or None for a plain field."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return _section_type(arms[0])
    return None


def _default_repr(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _short_repr(_plain(f.default_factory()))
    return "(required)"


def _describe_lines(cls: type, where: str) -> list[str]:
    hints, comments = _type_hints(cls), _field_comments(cls)
    lines: list[str] = []
    sections: list[tuple[str, type, bool]] = []  # (field, section class, optional)
    for f in _init_fields(cls):
        section = _section_type(hints[f.name])
        # Sections (always present, or optional with null = absent) are listed under their own header.
        if section is not None and (f.default_factory is section or f.default is None):
            sections.append((f.name, section, f.default is None))
            continue
        line = f"  {f.name}: {_type_name(hints[f.name])} = {_default_repr(f)}"
        if f.name in comments:
            line += f"  # {comments[f.name]}"
        lines.append(line)
    for name, section, optional in sections:
        path = _join(where, name)
        note = " (optional section; absent = null)" if optional else ""
        lines.append(f"[{path}]" + (f"  # {comments[name]}{note}" if name in comments else note))
        lines.extend(_describe_lines(section, path))
    return lines


def describe(cls: type) -> str:
    """List the fields of a config dataclass tree: ``name: type = default  # comment`` per section."""
    lines = _describe_lines(cls, "")
    # Top-level plain fields come first, without a header; give them one if there are any.
    if lines and lines[0].startswith("  "):
        lines.insert(0, "[top level]")
    return "\n".join(lines)
