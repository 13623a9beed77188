"""The one flag mechanism of every entry point: flags generated from config dataclasses.

Each field of a config ``@dataclass`` becomes ``--field-name``; its type says how the
flag parses, its default is the flag's default (a field without one is a required
flag), and the comment after the field is its ``--help`` text::

    @dataclass
    class ScoreConfig:
        input: str  # local folder or s3:// prefix
        batch_size: int = 64  # frames per model+head call
        engine: Literal["auto", "torch", "onnx"] = "auto"  # a flag with choices

Supported field types: ``bool`` (``--x/--no-x``), ``int``, ``float``, ``str`` and their
``| None`` forms, ``Literal[...]`` (choices), ``list[str]`` (repeat the flag),
``dict[str, str]`` (repeat ``--x KEY=VALUE``) and ``dict[str, Any]`` (a JSON object).
Field helpers say more: :func:`one_of` (choices known at run time, e.g. the registered
presets), :func:`required_unless` (required unless another flag is set, e.g. ``--smoke-test``)
and :func:`hidden` (accepted, left out of ``--help``: flags for tests and benchmarks).

Every command line also takes ``--config FILE`` (YAML or JSON: flag names as keys, with ``-``
or ``_``; flags given on the command line win), ``-v/--verbose`` and ``--version``.
Errors a user can fix (:class:`adcore.errors.UserError`) are one line on stderr
(:func:`run_command`); ``-v`` shows their traceback.
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
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from adcore.errors import UnknownNameError, UserError, suggest

_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")
_HIDDEN, _CHOICES, _REQUIRED_UNLESS = "adcore.cli.hidden", "adcore.cli.choices", "adcore.cli.required_unless"
_OWN_FLAGS = ("config", "verbose")  # flags of every command line, not of a config class
_verbose = False  # set by setup_logging: run_command shows tracebacks
T = TypeVar("T")


# ----------------------------------------------------------------------------- field helpers
def hidden(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A field whose flag is accepted but not shown in ``--help`` (tests, benchmarks)."""
    return dataclasses.field(default=default, metadata={_HIDDEN: True}, **kwargs)


def one_of(names: Callable[[], Iterable[str]], what: str, default: Any = dataclasses.MISSING) -> Any:
    """A field whose value is one of ``names()`` (read when the parser is built); a mistyped value
    is refused with the closest names."""
    return dataclasses.field(default=default, metadata={_CHOICES: (names, what)})


def required_unless(flag: str, default: Any = None) -> Any:
    """A field whose flag is required unless the boolean field ``flag`` is set (e.g. ``smoke_test``)."""
    return dataclasses.field(default=default, metadata={_REQUIRED_UNLESS: flag})


# ----------------------------------------------------------------------------- flags
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


def _named(names: list[str], what: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(str(UnknownNameError(what, text, names)))
        return text

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _literal_values(hint) -> tuple | None:
    """The values of ``Literal[...]`` or ``Literal[...] | None``, else None."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is Literal:
            return typing.get_args(h)
    return None


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
        unless = f.metadata.get(_REQUIRED_UNLESS)
        if required:
            shown = "required"
        elif unless:
            shown = f"required unless --{unless.replace('_', '-')}"
        else:
            shown = f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{comments.get(f.name, '')} ({shown})".strip()}
        if f.metadata.get(_HIDDEN):
            kwargs["help"] = argparse.SUPPRESS
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        args = typing.get_args(hint)
        scalar = next((t for t in (bool, int, float, str) if hint is t or hint == t | None), None)
        literal = _literal_values(hint)
        if _CHOICES in f.metadata:
            names_fn, what = f.metadata[_CHOICES]
            names = sorted(names_fn())
            group.add_argument(flag, type=_named(names, what), choices=names, **kwargs)
        elif literal is not None:
            group.add_argument(flag, type=type(literal[0]), choices=literal, **kwargs)
        elif scalar is bool:
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block above them)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser(
    classes: tuple[type, ...], description: str = "", prog: str | None = None, add_help: bool = True
) -> argparse.ArgumentParser:
    """The parser of a command line made of these configs' flags, plus ``--config``, ``-v`` and ``--version``."""
    from adcore import __version__

    parser = _Parser(prog=prog, description=description, add_help=add_help)
    for cls in classes:
        add_dataclass_flags(parser, cls)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of flags (command-line flags win)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"adcore {__version__}")
    return parser


# ----------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class Parsed:
    """A parsed command line: its configs, and which flags were given (on the command line or in --config)."""

    configs: tuple
    given: frozenset[str]


def _given_parser(classes: tuple[type, ...], prog: str | None) -> argparse.ArgumentParser:
    """The parser of these configs that leaves out what was not given (no defaults, nothing required)."""
    quiet = build_parser(classes, prog=prog, add_help=False)
    for action in quiet._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return quiet


def _config_tokens(path: str, parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    """``--flag=value`` tokens for the settings in config file ``path`` (those of ``skip`` left out)."""
    import yaml

    from adcore import storage

    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    try:  # JSON is YAML too; a .json file is read as JSON for JSON's own error messages
        settings = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        parser.error(
            f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {' '.join(str(e).split())}"
        )
    if settings is None:
        return []
    if not isinstance(settings, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")}
    tokens = []
    for key, value in settings.items():
        if isinstance(key, bool):  # YAML reads an unquoted on/off/yes/no key as a boolean
            parser.error(f"--config {path}: a key reads as {key} (YAML's on/off/yes/no): quote it")
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            flags = [a.dest.replace("_", "-") for a in actions.values()]
            parser.error(f"--config {path}: unknown flag {key!r}; {suggest(str(key).replace('_', '-'), flags)}")
        if dest in skip or value is None:  # given on the command line, or null: the default
            continue
        tokens += _tokens(actions[dest], value)
    return tokens


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    """Command-line tokens that set ``action``'s flag to ``value`` (a value read from a config file)."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):
        items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
        return [f"{flag}={item}" for item in ([items] if isinstance(items, str) else items)]
    if isinstance(value, dict):
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={str(value).lower() if isinstance(value, bool) else value}"]


def parse_command(
    classes: tuple[type, ...], argv: list[str] | None, description: str, prog: str | None = None
) -> Parsed:
    """A command line made of several configs' flags (names must not clash), with ``--config FILE``
    merged in; sets up logging."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, quiet = build_parser(classes, description, prog), _given_parser(classes, prog)
    on_command_line = vars(quiet.parse_known_args(argv)[0])
    tokens = argv
    if on_command_line.get("config"):
        tokens = _config_tokens(on_command_line["config"], parser, set(on_command_line)) + argv
    args = parser.parse_args(tokens)
    given = frozenset(vars(quiet.parse_known_args(tokens)[0])) - {"config"}
    for cls in classes:
        for f in dataclasses.fields(cls):
            unless = f.metadata.get(_REQUIRED_UNLESS)
            if unless and getattr(args, f.name) in (None, "") and not getattr(args, unless):
                flag, other = "--" + f.name.replace("_", "-"), "--" + unless.replace("_", "-")
                parser.error(f"the following arguments are required: {flag} (or {other})")
    setup_logging(args.verbose)
    return Parsed(tuple(dataclass_from_args(cls, args) for cls in classes), given)


def parse_configs(classes: tuple[type, ...], argv: list[str] | None, description: str, prog: str | None = None):
    """The configs of :func:`parse_command`."""
    return parse_command(classes, argv, description, prog).configs


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """A job's command line: one flag per field of ``cls`` plus the common flags; sets up logging."""
    return parse_configs((cls,), argv, description, prog)[0]


# ----------------------------------------------------------------------------- running
def run_command(entry: Callable[[], T], prog: str) -> T:
    """``entry()``, with a :class:`UserError` (or a job's ``SystemExit("message")``) printed as one
    line on stderr, exit status 1. Only these are caught; with ``-v`` they keep their traceback."""
    try:
        return entry()
    except UserError as e:
        if _verbose:
            raise
        message = str(e)
    except SystemExit as e:  # the jobs' own refusals, SystemExit("--flag ...: why")
        if not isinstance(e.code, str) or _verbose:
            raise
        message = e.code
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    raise SystemExit(1)


def setup_logging(verbose: bool = False) -> None:
    """The explicit logging setup of every entry point (the library itself never configures logging)."""
    from adcore.logs import quiet_third_party_loggers

    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    quiet_third_party_loggers()
