"""Typed dataclass configs: YAML job files + dotted command-line overrides; unknown keys raise.

Each component owns a dataclass; a job file is a nested mapping whose sections are those dataclasses.
`from_dict(Cls, mapping)` builds the dataclass strictly (unknown key -> error naming the key and the valid ones;
wrong type -> error naming the field), recursing into nested dataclass fields.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A job file or override that does not fit its dataclass (unknown key, wrong type, missing file)."""


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 5e-3 (no dot) as a string; accept what Python reads as a number
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}{' at ' + where if where else ''}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-4' -> (['optim', 'lr'], 0.0001); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (new keys are allowed here; from_dict rejects unknown ones)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing file, e.g. configs/<model>/<job>.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


# ---- describing a config class: `fastpost <command> --help` and `fastpost config show` ---------------------------
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its `# comment` in cls's source: the trailing comment of the field's line(s) plus aligned
    continuation lines (`#   more`) below it; without one, the comment block right above the field."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built dynamically, or no source shipped
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, the line holds only the comment)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = (tok.string[1:], not lines[line - 1][: tok.start[1]].strip())
    out: dict[str, str] = {}
    used: set[int] = set()  # comment lines already taken as some field's continuation
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[ln][0].strip() for ln in range(node.lineno, node.end_lineno + 1)
                 if ln in comments and not comments[ln][1]]
        if parts:
            ln = node.end_lineno + 1
            while ln in comments and comments[ln][1] and comments[ln][0].startswith("  "):
                parts.append(comments[ln][0].strip())
                used.add(ln)
                ln += 1
        else:
            ln, above = node.lineno - 1, []
            while ln in comments and comments[ln][1] and ln not in used:
                above.insert(0, comments[ln][0].strip())
                ln -= 1
            parts = above
        if parts:
            out[node.target.id] = " ".join(p for p in parts if p)
    return out


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(tp, "__name__", str(tp))


def plain(value: Any) -> Any:
    """Dataclasses, tuples and paths -> dicts, lists and strings (what YAML/JSON can hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    import json

    return json.dumps(plain(value)).replace("NaN", "nan")


_REQUIRED = object()


def describe(cls: type, instance: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) for every leaf field of dataclass `cls`, nested sections flattened.

    `instance` supplies the defaults of a nested section whose parent builds it with a factory (e.g.
    `data: LoaderConfig = field(default_factory=lambda: LoaderConfig(path=""))`)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _REQUIRED
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], None if default is _REQUIRED else default, key + ".")
            continue
        shown = "(required)" if default is _REQUIRED else _fmt(default)
        rows.append((key, type_name(hints[f.name]), shown, comments.get(f.name, "")))
    return rows


def render_keys(cls: type, title: str, instance: Any = None, prefix: str = "") -> str:
    """A help section listing cls's job-file keys: dotted name, type, default and the source comment."""
    rows = describe(cls, instance, prefix)
    w_key = max(len(r[0]) for r in rows)
    w_type = min(max(len(r[1]) for r in rows), 28)
    w_def = min(max(len(r[2]) for r in rows), 24)
    lines = [title]
    for key, tp, default, comment in rows:
        line = f"  {key:<{w_key}}  {tp:<{w_type}}  {default:<{w_def}}"
        lines.append((line + "  # " + comment if comment else line).rstrip())
    return "\n".join(lines)
