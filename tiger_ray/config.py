"""One config system for the `tiger` command, the Ray jobs and the Python API.

Every stage keeps its settings in a dataclass. ``add_config_args`` turns the dataclass into
argparse flags (help text from ``field(metadata={"help": ...})``), and ``build_config`` applies,
in order: dataclass defaults, a named preset, then only the flags the user actually gave.
Configs are saved beside what they produced, so a run records what it was made with.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field; defaults are None so presets are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif typing.get_origin(tp) in (tuple, list):
            (inner, *_rest) = typing.get_args(tp) or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = inner
        else:
            kwargs["type"] = tp
        parser.add_argument(_flag(f.name), **kwargs)


def build_config(cls: type[C], args: argparse.Namespace | Mapping[str, Any] | None = None,
                 preset: Mapping[str, Any] | None = None) -> C:
    """Defaults <- preset <- explicitly given flags (those not None)."""
    values: dict[str, Any] = dict(preset or {})
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown preset fields {sorted(unknown)}")
    for name in names:
        if given.get(name) is not None:
            values[name] = given[name]
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[name])) is tuple:
            values[name] = tuple(value)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a saved config, ignoring fields a newer version dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return build_config(cls, {k: v for k, v in data.items() if k in names})


def stage_parser(subparsers, name: str, *, config_cls: type, presets: Mapping[str, Any], help: str,
                 description: str, preset_help: str, func, run_help: str = "run directory",
                 run_flags: tuple[str, ...] = ("--run",), default_preset: str | None = "cpu",
                 skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The `tiger <stage>` subcommand every stage shares: ``--run RUN_DIR`` (required),
    ``--preset`` (one of ``presets``), one flag per ``config_cls`` field (except ``skip``), and
    ``func`` as the handler. Returned so the stage can add flags of its own."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument(*run_flags, dest="run", required=True, metavar="RUN_DIR", help=run_help)
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset, help=preset_help)
    add_config_args(parser, config_cls, skip=skip)
    parser.set_defaults(func=func)
    return parser
