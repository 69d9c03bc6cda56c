"""Command-line flags from config dataclasses: one `--field-name` per simple field, help from metadata."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_SIMPLE = (int, float, str, bool)


def _simple_type(annotation: Any) -> type | None:
    """int/float/str/bool, or X | None of one of them; None for anything else (lists, dicts, unions)."""
    if annotation in _SIMPLE:
        return annotation
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _SIMPLE:
            return args[0]
        if str in args:  # e.g. report_to: str | list[str] takes one string on the command line
            return str
    return None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None,
                            exclude: tuple[str, ...] = ()) -> None:
    """Add `--field-name` (and `--field_name`) flags for the simple fields of dataclass `cls` (other fields keep their
    defaults; fields in `exclude` get no flag, e.g. ones the caller sets itself)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        kind = _simple_type(hints[f.name])
        if kind is None or f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:  # TRL / HfArgumentParser spelling too: --output_dir
            flags.append("--" + f.name)
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
