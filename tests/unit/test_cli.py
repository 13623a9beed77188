"""One flag mechanism: every entry point's flags come from its config dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from adcore.cli import build_parser, parse_configs
from adcore.data.demo import DemoConfig as DemoDataConfig
from adcore.data.demo import DemoOutput
from adcore.evaluate import EvaluateConfig
from adcore.train import TrainPaths
from adcore.training import TrainConfig
from jobs.demo import DemoConfig
from jobs.export import ExportConfig
from jobs.report import ReportConfig
from jobs.score import ScoreConfig
from jobs.train import JobConfig

ENTRY_POINTS = {
    "jobs/score.py": (ScoreConfig,),
    "jobs/export.py": (ExportConfig,),
    "jobs/report.py": (ReportConfig,),
    "jobs/train.py": (JobConfig, TrainConfig),
    "jobs/demo.py": (DemoConfig,),
    "adcore.train": (TrainPaths, TrainConfig),
    "adcore.evaluate": (EvaluateConfig,),
    "adcore.data.demo": (DemoOutput, DemoDataConfig),
}


@dataclass
class Example:
    name: str  # what it is called
    count: int = 3  # how many
    ratio: float | None = None
    on: bool = False
    tags: list[str] = field(default_factory=list)  # repeat the flag
    weights: dict[str, str] = field(default_factory=dict)  # TOWER=PATH
    overrides: dict[str, Any] = field(default_factory=dict)  # JSON


def test_fields_become_typed_flags():
    (cfg,) = parse_configs(
        (Example,),
        [
            "--name",
            "x",
            "--count",
            "5",
            "--ratio",
            "0.5",
            "--on",
            "--tags",
            "a",
            "--tags",
            "b",
            "--weights",
            "vision=/w/clip",
            "--weights",
            "domain=s3://b/beit",
            "--overrides",
            '{"alpha": 0.4}',
        ],
        "",
    )
    assert cfg == Example("x", 5, 0.5, True, ["a", "b"], {"vision": "/w/clip", "domain": "s3://b/beit"}, {"alpha": 0.4})
    (defaults,) = parse_configs((Example,), ["--name", "y"], "")
    assert defaults == Example("y")


def test_missing_required_and_malformed_values_are_clear_errors(capsys):
    for argv in ([], ["--name", "x", "--weights", "no-equals"], ["--name", "x", "--overrides", "[1]"]):
        with pytest.raises(SystemExit):
            parse_configs((Example,), argv, "")
    err = capsys.readouterr().err
    assert "--name" in err and "KEY=VALUE" in err and "JSON object" in err


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_help_lists_every_flag_with_its_default(entry):
    classes = ENTRY_POINTS[entry]
    text = " ".join(build_parser(classes, prog=entry).format_help().split("options:", 1)[1].split())
    for cls in classes:
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, f"{entry}: {flag} missing from --help"
            after = text.split(flag, 1)[1][:400]
            assert "(default:" in after or "(required)" in after, f"{entry}: {flag} shows no default"


def test_model_is_an_artifact_and_preset_a_registered_name_everywhere():
    for entry, classes in ENTRY_POINTS.items():
        names = {f.name for cls in classes for f in dataclasses.fields(cls)}
        if "preset" in names:
            assert "model" not in names, f"{entry}: --model and --preset side by side"
    assert "preset" in {f.name for f in dataclasses.fields(TrainConfig)}
