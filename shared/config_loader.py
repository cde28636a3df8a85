"""Typed YAML config loading: one dataclass tree per process, every mistake reported as one line.

A field's metadata may bound it: {"min": n, "max": n} for numbers, {"choices": (...)} for strings.
"""

import dataclasses
import math
import types
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from keysealer.shared.bounded_files import read_bounded_text
from keysealer.shared.errors import ConfigError, FileRefused
from keysealer.shared.log_text import printable
from keysealer.shared.safe_paths import check_file_root_reads

T = TypeVar("T")
# Far above any real config (a few hundred bytes); parsing stays well under a second.
MAX_CONFIG_BYTES = 64 * 1024
# KeySealer's schemas nest three levels; a deeper document is not a config, and its nesting would
# otherwise exhaust Python's recursion limit in the YAML parser.
MAX_CONFIG_DEPTH = 16


def load_config(path: Path, schema: type[T]) -> T:
    # A config names users to become, modules to load and keys to trust: root reads none that anyone else
    # could change.
    check_file_root_reads(path, "config")
    try:
        text = read_bounded_text(path, "config", MAX_CONFIG_BYTES)
    except FileRefused as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.reason}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader that also refuses duplicates
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = f": {exc.problem}" if isinstance(exc, _Refused) else ""
        raise ConfigError(f"{path}: not valid YAML{where}{problem}") from None
    return build(schema, {} if data is None else data, f"{path}: ")


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but is no config: a key given twice, nesting deeper than any schema."""


class _StrictLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a mapping key given twice (YAML would keep the last one silently: a
    second `user: root` would win) and nesting deeper than MAX_CONFIG_DEPTH."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _Refused(problem=f"nested deeper than {MAX_CONFIG_DEPTH} levels",
                               problem_mark=self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise _Refused(problem=f"{_printable(key)} given twice",
                                       problem_mark=key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep)


def build(schema: type[T], data: Any, where: str, prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'top level'}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}{prefix}{_printable(key)}: unknown field")
    hints = get_type_hints(schema)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        label = prefix + name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}{label}: missing required field")
            continue
        values[name] = _convert(hints[name], data[name], where, label)
        _check_bounds(field, values[name], where, label)
    return schema(**values)


def _convert(hint: Any, value: Any, where: str, label: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where, label)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, label + ".")  # type: ignore[arg-type]
    if origin is list:
        (item_type,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}{label}: must be a list")
        return [_convert(item_type, item, where, f"{label}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        key_type, value_type = get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{label}: must be a mapping")
        return {
            _convert(key_type, k, where, f"{label}.{_printable(k)}"):
                _convert(value_type, v, where, f"{label}.{_printable(k)}")
            for k, v in value.items()
        }
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}{label}: must be a path")
        return Path(value)
    if hint is float and type(value) is int:
        value = float(value)
    if hint is float and type(value) is float and not math.isfinite(value):
        # NaN compares false with every bound, so it would pass min/max checks unnoticed.
        raise ConfigError(f"{where}{label}: must be a finite number")
    if type(value) is not hint:
        octal = hint is str and type(value) is int and label.endswith("mode")
        hint_text = " (quote it: YAML reads 0660 as a number)" if octal else ""
        raise ConfigError(f"{where}{label}: must be {_type_name(hint)}, not {_type_name(type(value))}{hint_text}")
    return value


def _check_bounds(field: "dataclasses.Field[Any]", value: Any, where: str, label: str) -> None:
    meta = field.metadata
    if value is None:
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}{label}: must be at least {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}{label}: must be at most {meta['max']}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}{label}: must be one of {', '.join(meta['choices'])}")


def _printable(key: object) -> str:
    """A key as it can appear in a one-line message: bounded, control characters shown escaped."""
    return printable(str(key))


def _type_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a mapping", type(None): "empty"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def bounded(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A dataclass field with a default and bounds checked at load time."""
    meta: dict[str, Any] = {}
    if low is not None:
        meta["min"] = low
    if high is not None:
        meta["max"] = high
    return dataclasses.field(default=default, metadata=meta)
