"""One config system for the `tiger` command, the Ray jobs and the Python API.

Every stage keeps its settings in a dataclass. ``add_config_args`` turns the dataclass into
argparse flags (help text from ``field(metadata={"help": ...})``), and ``build_config`` applies,
in order: dataclass defaults, a named preset, a settings file (``--config FILE``, JSON or YAML),
then only the flags the user actually gave. ``--print-config`` shows the result. Configs are
saved beside what they produced, so a run records what it was made with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
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


def field_names(*classes: type) -> set[str]:
    """The settings the config dataclasses take."""
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A settings file: a JSON or YAML (.yaml/.yml) mapping of field names (``-`` or ``_``) to
    values. Parsed, never executed; a syntax error names the file and line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"--config {path}: {err.strerror}") from None
    try:
        data = (yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values, got "
                         f"{type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def build_config(cls: type[C], args: argparse.Namespace | Mapping[str, Any] | None = None,
                 preset: Mapping[str, Any] | None = None) -> C:
    """Defaults <- preset <- settings file (``args.config_values``, parsed once by the stage's
    handler; keys of the stage's other configs are left to them) <- explicitly given flags
    (those not None)."""
    values: dict[str, Any] = dict(preset or {})
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    names = field_names(cls)
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown preset fields {sorted(unknown)}")
    file_values = given.get("config_values")
    if file_values is None and given.get("config_file"):  # a Namespace not passed through the handler
        file_values = read_config_file(given["config_file"])
    values.update({k: v for k, v in (file_values or {}).items() if k in names})
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
    names = field_names(cls)
    return build_config(cls, {k: v for k, v in data.items() if k in names})


def read_stage_settings(path: str | Path, classes: tuple[type, ...], command: str) -> dict[str, Any]:
    """The settings file of `tiger <command>`: every key must be a field of one of its configs."""
    values = read_config_file(path)
    unknown = sorted(set(values) - field_names(*classes))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} for `tiger {command}` "
                         f"(`tiger {command} --print-config` lists them)")
    return values


def stage_parser(subparsers, name: str, *, config_cls: type, presets: Mapping[str, Any], help: str,
                 description: str, preset_help: str, func, run_help: str = "run directory",
                 run_flags: tuple[str, ...] = ("--run",), default_preset: str | None = "cpu",
                 skip: tuple[str, ...] = (), also: tuple[type, ...] = ()) -> argparse.ArgumentParser:
    """The `tiger <stage>` subcommand every stage shares: ``--run RUN_DIR``, ``--preset`` (one
    of ``presets``), ``--config FILE``, ``--print-config``, one flag per field of ``config_cls``
    (except ``skip``) and of each config in ``also``, and ``func`` as the handler. Returned so
    the stage can add flags of its own."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument(*run_flags, dest="run", default=None, metavar="RUN_DIR",
                        help=run_help + " (required unless --print-config)")
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset, help=preset_help)
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="JSON or YAML file of settings (names as --print-config shows them); "
                             "it overrides the preset, flags given override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (defaults < preset < --config < flags) "
                             "as JSON and exit")
    add_config_args(parser, config_cls, skip=skip)
    for cls in also:
        add_config_args(parser, cls)
    classes = (config_cls, *also)

    def handler(args: argparse.Namespace) -> int:
        # Parsed and checked once here; build_config layers it under the flags for each config.
        args.config_values = (read_stage_settings(args.config_file, classes, name)
                              if args.config_file else {})
        if args.print_config:
            preset = presets[args.preset] if args.preset else None
            resolved = {cls.__name__: to_dict(build_config(cls, args, preset if cls is config_cls else None))
                        for cls in classes}
            print(json.dumps(resolved if also else resolved[config_cls.__name__], indent=2, default=str))
            return 0
        if args.run is None:
            parser.error(f"the following arguments are required: {'/'.join(run_flags)}")
        return func(args)

    parser.set_defaults(func=handler)
    return parser
