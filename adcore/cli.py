"""The one flag mechanism of every entry point: flags generated from config dataclasses.

Each field of a config ``@dataclass`` becomes ``--field-name``; its type says how the
flag parses, its default is the flag's default (a field without one is a required
flag), and the comment after the field is its ``--help`` text::

    @dataclass
    class ScoreConfig:
        input: str  # local folder or s3:// prefix
        batch_size: int = 64  # frames per model+head call

Supported field types: ``bool`` (``--x/--no-x``), ``int``, ``float``, ``str`` and their
``| None`` forms, ``list[str]`` (repeat the flag), ``dict[str, str]`` (repeat
``--x KEY=VALUE``) and ``dict[str, Any]`` (a JSON object).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import re
import sys
import typing
from typing import Any

_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


@functools.cache
def _field_comments(cls) -> dict[str, str]:
    """``field -> trailing comment`` read from the dataclass's source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, lines) if m}


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. vision=/models/clip), got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses put there when a class has no docstring
        doc = ""
    group = parser.add_argument_group(cls.__name__, doc.split("\n")[0] or None)
    for f in dataclasses.fields(cls):
        hint, default = hints[f.name], _default(f)
        flag = "--" + f.name.replace("_", "-")
        required = default is dataclasses.MISSING
        shown = "required" if required else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{comments.get(f.name, '')} ({shown})".strip()}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        args = typing.get_args(hint)
        scalar = next((t for t in (bool, int, float, str) if hint is t or hint == t | None), None)
        if scalar is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif scalar is not None:
            group.add_argument(flag, type=scalar, **kwargs)
        elif typing.get_origin(hint) is list and args == (str,):
            group.add_argument(flag, action="append", metavar=f.name.upper(), **kwargs | {"default": None})
        elif typing.get_origin(hint) is dict and args == (str, str):
            group.add_argument(
                flag, action="append", type=_key_value, metavar="KEY=VALUE", **kwargs | {"default": None}
            )
        elif typing.get_origin(hint) is dict:
            group.add_argument(flag, type=_json_object, metavar="JSON", **kwargs)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {hint}")


def dataclass_from_args(cls, args: argparse.Namespace):
    """The config ``cls`` from parsed flags (repeated flags collected; absent ones keep the default)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is None and typing.get_origin(hints[f.name]) in (list, dict):
            continue  # a repeated flag not given: the field's default
        if typing.get_origin(hints[f.name]) is dict and isinstance(value, list):
            value = dict(value)
        values[f.name] = value
    return cls(**values)


def build_parser(classes: tuple[type, ...], description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a command line made of these configs' flags, plus ``--verbose``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for cls in classes:
        add_dataclass_flags(parser, cls)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_configs(classes: tuple[type, ...], argv: list[str] | None, description: str, prog: str | None = None):
    """A command line made of several configs' flags (names must not clash); sets up logging."""
    args = build_parser(classes, description, prog).parse_args(argv)
    setup_logging(args.verbose)
    return tuple(dataclass_from_args(cls, args) for cls in classes)


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """A job's command line: one flag per field of ``cls`` plus ``--verbose``; sets up logging."""
    return parse_configs((cls,), argv, description, prog)[0]


def setup_logging(verbose: bool = False) -> None:
    """The explicit logging setup of every entry point (the library itself never configures logging)."""
    from adcore.logs import quiet_third_party_loggers

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    quiet_third_party_loggers()
