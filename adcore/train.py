"""Train a model without Ray: ``python -m adcore.train --data DIR --model NAME --output ARTIFACT``."""

from __future__ import annotations

import argparse

from adcore.cli import add_dataclass_flags, dataclass_from_args, parse_weights, setup_logging
from adcore.training import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adcore.train", description=__doc__)
    p.add_argument("--data", required=True, help="BMAD-layout folder (train/, valid/ [, test/])")
    p.add_argument("--output", required=True, help="artifact directory or s3:// prefix")
    p.add_argument("--weights", action="append", metavar="TOWER=PATH", help="pretrained weights folder per tower")
    add_dataclass_flags(p, TrainConfig, skip=("weights", "overrides"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    cfg = dataclass_from_args(TrainConfig, args, weights=parse_weights(args.weights))
    scorer = train(args.data, cfg, output=args.output)
    print(f"saved {args.output} ({scorer.version})")


if __name__ == "__main__":
    main()
