"""Train a model without Ray: ``python -m adcore.train --data DIR --preset NAME --output ARTIFACT``."""

from __future__ import annotations

from dataclasses import dataclass

from adcore import storage
from adcore.cli import parse_command, run_command
from adcore.errors import DataNotFoundError
from adcore.training import TrainConfig, refuse_unused_flags, train

PROG = "python -m adcore.train"


@dataclass
class TrainPaths:
    """Where the data comes from and the artifact goes."""

    data: str  # BMAD-layout folder (train/, valid/ [, test/])
    output: str  # artifact directory or s3:// prefix


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    parsed = parse_command((TrainPaths, TrainConfig), argv, __doc__, prog=prog)
    paths, cfg = parsed.configs
    refuse_unused_flags(cfg, parsed.given)
    if not storage.exists(paths.data):
        raise DataNotFoundError(f"--data {paths.data}: no such folder or prefix")
    scorer = train(paths.data, cfg, output=paths.output)
    print(f"saved {paths.output} ({scorer.version})")


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: :func:`main` with errors a user can fix in one line."""
    run_command(lambda: main(argv, prog), prog)


if __name__ == "__main__":
    cli()
