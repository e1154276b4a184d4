"""Settings files: `relicv2 pretrain --config FILE` and the config.json a run records for `rerun`.

A settings file is a mapping of setting names to values, as JSON (`.json`) or YAML (`.yaml`/`.yml`,
read with PyYAML's safe loader when PyYAML is installed). Names may use `-` or `_`. Each value is
checked against the type of the config dataclass's field of that name.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from relicv2_cli.errors import RelicError

SUFFIXES = (".json", ".yaml", ".yml")


def read_settings(path: Path, what: str = "--config") -> dict:
    """The mapping in a JSON or YAML file, names normalised to `_`; one-line errors naming `what`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise RelicError(f"{what} {path}: expected a .json, .yaml or .yml file")
    try:
        text = path.read_text()
    except OSError as e:
        raise RelicError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RelicError(f"{what} {path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise RelicError(f"{what} {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                             "settings as a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RelicError(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise RelicError(f"{what} {path}: expected a mapping of setting names to values, "
                         f"got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def check_settings(cls, settings: dict, what: str) -> dict:
    """`settings` checked against the fields of dataclass `cls`: every name must be a field and every
    value of the field's type (an int is accepted for a float; a list for a tuple). Returns the
    values converted (floats, tuples)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in settings.items():
        if key not in hints:
            raise RelicError(f"{what}: unknown setting {key!r}; settings are {', '.join(names)}")
        ok, converted = _convert(hints[key], value)
        if not ok:
            raise RelicError(f"{what}: {key} must be {_type_name(hints[key])}, got {value!r}")
        out[key] = converted
    return out


def _convert(hint, value) -> tuple[bool, object]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return False, value
        items = [_convert(a, v) for a, v in zip(args, value, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    return False, value


def _type_name(hint) -> str:
    return str(hint) if typing.get_origin(hint) else hint.__name__
