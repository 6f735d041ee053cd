"""Typed configs from YAML with dotted command-line overrides: one loader for training and curation.

    python train/sft.py --config configs/tiny/sft.yaml --optim.lr 1e-4 --data.max_length=512
    python -m data_curation.run --config configs/curation/laion.yaml --sources.0.path /data/laion

A config is a tree of dataclasses (the root is the entry point's: `RunConfig`, `CurationConfig`);
every field is declared with a type and a docstring (the string literal under it), which `help_text`
prints. A YAML file gives the values it sets; `--section.key value` or `--section.key=value` sets
one more (a list item by its index: `sources.0.path`). Values are coerced by the field's type, so
`4e-4` (a string to YAML 1.1) is a float where a float is expected. An unknown key, a bad value or a
bad list index is a `ConfigError` that names the key and where it came from.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be loaded: the message names the key and its source."""


# ----------------------------------------------------------------------------------------------
# Typed dataclass tree from plain data


def _type_name(tp: Any) -> str:
    """A short, readable name of a field type: `int | None`, `list[str]`, `'cosine' | 'constant'`."""
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _number(tp: type, value: Any, key: str, source: str) -> int | float:
    """`value` as an int or a float; strings such as "4e-4" (YAML 1.1 leaves them strings) are read."""
    bad = ConfigError(f"{source}: '{key}' must be {'an integer' if tp is int else 'a number'}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = int(value) if tp is int else float(value)
        except ValueError:
            try:
                value = float(value)  # "1e3" for an int field
            except ValueError:
                raise bad from None
    if not isinstance(value, int | float):
        raise bad
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad
        return int(value)
    return float(value)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """`value` as type `tp` (recursing into dataclasses and containers) or a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: '{key}' may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: bad value for '{key}': {value!r}")
    if value is None:
        raise ConfigError(f"{source}: '{key}' may not be null (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}.{i}", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp in (int, float):
        return _number(tp, value, key, source)
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: unsupported field type {tp} for '{key}'")


def _build(cls: type[T], data: Any, key: str, source: str) -> T:
    """A `cls` dataclass from a mapping; unknown keys are errors."""
    where = f"'{key}'" if key else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in names:
            full = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"{source}: unknown key '{full}' (known keys of {where}: {', '.join(names)})")
    kwargs = {
        name: _coerce(hints[name], value, f"{key}.{name}" if key else name, source)
        for name, value in data.items()
    }
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for "a.b.c"; a list item by its index ("sources.0.path"); missing sections
    are created. The ConfigError names the part of the key that is not a section or not a list index."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"'{'.'.join(parts[: i + 1])}': {part!r} is not an index of the {len(node)}-item list"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(parts[:i])}' is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[tuple[str, Any]] | None = None
) -> T:
    """A `cls` config from a YAML file (or the defaults) plus (dotted key, value) overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        source = str(path)
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    config = _build(cls, tree, "", source)  # validates the file on its own first
    if overrides:
        for key, value in overrides:
            try:
                set_dotted(tree, key, value)
            except ConfigError as e:
                raise ConfigError(f"command line: {e}") from None
        config = _build(cls, tree, "", f"{source} + command line")
    return config


# ----------------------------------------------------------------------------------------------
# Command line


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (numbers, lists, mappings, null, booleans); "" stays ""."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_argv(
    argv: Sequence[str], flags: Collection[str] = ("config",), bare: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """({flag: text}, [(dotted key, value)]) from `--key value`, `--key=value` and `key=value` items.

    Keys named in `flags` (e.g. `config`) come back as text; every other key is an override whose
    value is read by `parse_value`. Dashes in keys are underscores (`--max-steps` = `--max_steps`).
    `bare` maps flags that may stand without a value to the value they then take.
    """
    bare = bare or {}
    named: dict[str, str] = {}
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
        elif "=" in arg and not arg.startswith("-"):  # key=value
            key, eq, text = arg.partition("=")
        else:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = key.replace("-", "_")
        if not eq:
            follows = argv[i + 1] if i + 1 < len(argv) else None
            if key in bare and (follows is None or follows.startswith("--") or "=" in follows):
                text = bare[key]
            elif follows is None or follows.startswith("--"):
                raise ConfigError(f"command line: --{key} needs a value")
            else:
                text = follows
                i += 1
        i += 1
        if key in flags:
            named[key] = text
        else:
            overrides.append((key, parse_value(text)))
    return named, overrides


def config_from_argv(
    cls: type[T], argv: Sequence[str], flags: Collection[str] = (), bare: Mapping[str, str] | None = None
) -> tuple[T, dict[str, str]]:
    """(the `cls` config, {flag: text}) from `--config X.yaml --section.key value ...` and `flags`."""
    named, overrides = parse_argv(argv, ("config", *flags), bare)
    return load_config(cls, named.pop("config", None), overrides), named


# ----------------------------------------------------------------------------------------------
# Output: plain data and help


def config_to_dict(config: Any) -> dict:
    """A plain (YAML/JSON-ready) dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal under the field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text(cls: type, prefix: str = "") -> str:
    """Every setting of `cls` with its type, default and docstring (for --help); the fields of a list's
    dataclass items are listed under `--key.N.field`."""
    lines = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {docs.get(f.name, '')}")
            lines.append(help_text(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, default {default!r}): {docs.get(f.name, '')}")
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):
            lines.append("    each item (N: its index in the list):")
            lines += ["  " + line for line in help_text(item, f"{prefix}{f.name}.N.").splitlines()]
    return "\n".join(lines)
