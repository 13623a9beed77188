"""Small helpers shared by the command-line entry points: flags from dataclasses, logging."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per scalar field of a config dataclass, with its default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif hint in (int, float, str):
            parser.add_argument(flag, type=hint, default=default)
        elif hint in (int | None, float | None, str | None):
            parser.add_argument(flag, type=typing.get_args(hint)[0], default=default)


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return cls(**(values | extra))


def parse_config(cls, argv: list[str] | None, description: str):
    """A job's command line: one flag per field of ``cls`` plus ``--verbose``; sets up logging."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_flags(parser, cls)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return dataclass_from_args(cls, args)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def parse_weights(items: list[str] | None) -> dict[str, str]:
    """``["vision=/w/clip", "domain=s3://b/beit"]`` -> dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--weights expects TOWER=PATH (e.g. vision=/models/clip), got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out
