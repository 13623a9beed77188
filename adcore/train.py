"""Train a model without Ray: ``python -m adcore.train --data DIR --preset NAME --output ARTIFACT``."""

from __future__ import annotations

from dataclasses import dataclass

from adcore.cli import parse_configs
from adcore.training import TrainConfig, train


@dataclass
class TrainPaths:
    """Where the data comes from and the artifact goes."""

    data: str  # BMAD-layout folder (train/, valid/ [, test/])
    output: str  # artifact directory or s3:// prefix


def main(argv: list[str] | None = None) -> None:
    paths, cfg = parse_configs((TrainPaths, TrainConfig), argv, __doc__, prog="python -m adcore.train")
    scorer = train(paths.data, cfg, output=paths.output)
    print(f"saved {paths.output} ({scorer.version})")


if __name__ == "__main__":
    main()
