"""Typed configs: YAML files and `key.sub=value` overrides into dataclasses, strictly.

Each job has a dataclass tree (sections are nested dataclasses). `load_config` rejects
unknown keys (with a did-you-mean), wrong scalar types and missing required keys, naming
the file and the dotted key, then runs every section's `validate()`. Nothing is executed:
YAML is read with the safe loader and override values are parsed as YAML scalars.

Every loaded section remembers where its keys came from, so an error found later (a rule
across sections, the world size, the tokenizer's vocabulary) still names the place to fix:
`located(cfg)` gives a ConfigError without a file the file the key was set in, or the
command-line override that set it (`origin(section, key)` answers for one key).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from pipeline.errors import ConfigError
from pipeline.io import atomic_write

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (may be None for all defaults), apply overrides, build and validate `cls`."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    sources = Sources(str(path) if path is not None else None, raw)
    raw = copy.deepcopy(raw)  # the overrides change this copy; `sources` keeps the file's data
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.msg, f"command line '{item}'") from None
        sources.cli[item.partition("=")[0].strip().lstrip("-")] = item
    try:
        cfg = _build(cls, raw, "")
        _attach(cfg, sources, "")
        _validate_tree(cfg)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.msg, exc.file or sources.where(exc.key)) from None
    return cfg


_INDEX = re.compile(r"\[(\d+)\]")


def _parts(key: str) -> list[str | int]:
    """'data.blend[1].weight' -> ['data', 'blend', 1, 'weight']."""
    out: list[str | int] = []
    for part in key.split(".") if key else []:
        name, *indices = _INDEX.split(part)
        out += [name] if name else []
        out += [int(i) for i in indices if i]
    return out


@dataclasses.dataclass
class Sources:
    """Where a loaded config's keys came from: its YAML file, or command-line overrides."""

    file: str | None
    raw: dict
    """The file's data, before overrides."""
    cli: dict[str, str] = dataclasses.field(default_factory=dict)
    """Overridden dotted key -> the `key=value` argument that set it."""

    def where(self, key: str) -> str | None:
        """The override that set `key` (or a section above it, or made a section the file lacks),
        else the file (also for a key left at its default: the file is where to set it); None for
        defaults without a file."""
        parts = _parts(key)
        for cli_key, item in reversed(self.cli.items()):
            cli_parts = _parts(cli_key)
            if parts[: len(cli_parts)] == cli_parts:
                return f"command line '{item}'"
            if parts and cli_parts[: len(parts)] == parts and not self._in_file(parts):
                return f"command line '{item}'"
        return self.file

    def _in_file(self, parts: list[str | int]) -> bool:
        node: Any = self.raw
        for part in parts:
            listed = isinstance(part, int) and isinstance(node, list) and part < len(node)
            if not (listed or (isinstance(node, dict) and part in node)):
                return False
            node = node[part]
        return True


def _attach(cfg: Any, sources: Sources, prefix: str) -> None:
    """Give every section of a loaded tree its Sources and its dotted path (see `origin`)."""
    object.__setattr__(cfg, "_sources", (sources, prefix))
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            _attach(child, sources, _join(prefix, f.name))
        elif isinstance(child, (list, tuple)):
            for i, item in enumerate(child):
                if dataclasses.is_dataclass(item):
                    _attach(item, sources, f"{_join(prefix, f.name)}[{i}]")


def origin(section: Any, key: str) -> str | None:
    """Where `key` (relative to `section`, a section of a loaded config) was set: the file, or
    "command line 'key=value'"; None when the section was not made by load_config."""
    sources, prefix = getattr(section, "_sources", (None, ""))
    return sources.where(_join(prefix, key)) if sources else None


@contextlib.contextmanager
def located(cfg: Any) -> Iterator[None]:
    """Around code that uses a loaded config: a ConfigError raised without a file (a rule across
    sections, the world size, the vocabulary) gets the place its key was set."""
    try:
        yield
    except ConfigError as exc:
        if exc.file is not None or not _is_key(cfg, exc.key):
            raise  # it knows its file, or names no key of this config (an environment variable)
        raise ConfigError(exc.key, exc.msg, origin(cfg, exc.key)) from None


def _is_key(cfg: Any, key: str) -> bool:
    """Whether the dotted `key` names a field (or an item under one) of the config tree `cfg`."""
    node = cfg
    for part in _parts(key):
        if dataclasses.is_dataclass(node) and isinstance(part, str) and part in node.__dataclass_fields__:
            node = getattr(node, part)
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return isinstance(node, dict)  # any key under a mapping field; a scalar has no sub-keys
    return bool(key)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"top level must be a mapping, got {type(data).__name__}", str(path))
    return data


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as a YAML scalar/list."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(item, "override must look like key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section (override '{item}')")
        node = nxt
    node[parts[-1]] = value


def _build(tp: Any, value: Any, key: str) -> Any:
    """Convert YAML data `value` into type `tp`, raising ConfigError at dotted `key`."""
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _build(a, value, key)
            except ConfigError as exc:
                errors.append(exc.msg)
        raise ConfigError(key, " / ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        item_t = args[0] if args else Any
        out = [_build(item_t, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        val_t = args[1] if len(args) == 2 else Any
        return {str(k): _build(val_t, v, f"{key}.{k}") for k, v in value.items()}
    return _build_scalar(tp, value, key)


def _build_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    raise ConfigError(key, f"must be {tp.__name__}, got {type(value).__name__} {value!r}")


def _build_dataclass(cls: Any, value: Any, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a section (mapping), got {type(value).__name__} {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{_join(key, close[0])}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(_join(key, str(name)), f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in value:
            given = value[name]
            if _is_section_table(hints[name]) and f.default_factory is not _MISSING:
                given = _merge_table(to_dict(f.default_factory()), given)
            kwargs[name] = _build(hints[name], given, sub)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(sub, "is required")
    return cls(**kwargs)


def _is_section_table(tp: Any) -> bool:
    """dict[str, <a config section>]: a table of named sections, e.g. per-language rule settings."""
    args = get_args(tp)
    return get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1])


def _merge_table(defaults: dict, given: Any) -> Any:
    """A YAML table merged into its default table: a given entry overrides the default entry of the
    same name field by field (so `languages.zh.min_words=30` keeps zh's other settings), a new name
    adds an entry, and `name: null` removes one. Anything but a mapping is left for _build to reject."""
    if not isinstance(given, dict):
        return given
    out = dict(defaults)
    for name, entry in given.items():
        name = str(name)
        if entry is None:
            out.pop(name, None)
        elif isinstance(entry, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **entry}
        else:
            out[name] = entry
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate_tree(cfg: Any, key: str = "") -> None:
    """Call validate() on every section, children first; prefix relative keys with the section path."""
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child, _join(key, f.name))
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(_join(key, exc.key), exc.msg) from None


def to_dict(cfg: Any) -> Any:
    """A plain-data (YAML/JSON-safe) copy of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the (resolved) config as YAML next to a job's outputs, atomically."""
    with atomic_write(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False, allow_unicode=True)


def config_hash(cfg: Any) -> str:
    """Short stable hash of a config tree (for completion markers and lineage)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def add_config_args(parser) -> None:
    """Add the `--config PATH` and trailing `key.sub=value` overrides every entry point takes."""
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
