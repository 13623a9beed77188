"""The ``adcore`` command: one subcommand per entry point, sharing one flag vocabulary.

    adcore demo | train | evaluate | export | score | report [flags]   (adcore <command> --help)

Each subcommand runs the entry point of the same name (``python jobs/<command>.py`` or
``python -m adcore.evaluate``, which keep working, e.g. for ``ray job submit``) and is imported only
when chosen, so ``adcore --help`` starts neither Ray nor torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from adcore.errors import UnknownNameError


class Command(NamedTuple):
    module: str  # the entry point's module; its cli(argv, prog) runs it
    summary: str


COMMANDS = {
    "demo": Command("jobs.demo", "the whole path on built-in demo data: train, evaluate, export, score, report"),
    "train": Command("jobs.train", "train a preset on a BMAD-layout folder into an artifact (Ray Train)"),
    "evaluate": Command("adcore.evaluate", "metrics of artifacts on a split of a BMAD-layout folder"),
    "export": Command("jobs.export", "write an artifact's network to a Triton model repository"),
    "score": Command("jobs.score", "score an archive (local or s3://) into Parquet (Ray Data)"),
    "report": Command("jobs.report", "HTML report and DuckDB tables over the scores"),
}


def overview() -> str:
    from adcore import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: adcore <command> [flags]  (adcore {__version__})", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "adcore <command> --help lists a command's flags; every command takes --config FILE and -v."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        from adcore import __version__

        print(f"adcore {__version__}")
        return
    name = argv[0]
    if name not in COMMANDS:
        sys.stderr.write(f"adcore: error: {UnknownNameError('command', name, COMMANDS)} (adcore --help)\n")
        raise SystemExit(2)
    importlib.import_module(COMMANDS[name].module).cli(argv[1:], prog=f"adcore {name}")


if __name__ == "__main__":
    main()
