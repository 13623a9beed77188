"""One flag mechanism: every entry point's flags come from its config dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adcore.cli import build_parser, parse_configs
from adcore.data.demo import DemoConfig as DemoDataConfig
from adcore.data.demo import DemoOutput
from adcore.errors import FlagError
from adcore.evaluate import EvaluateConfig
from adcore.models import list_models
from adcore.train import TrainPaths
from adcore.training import TrainConfig
from jobs.demo import DemoConfig
from jobs.export import ExportConfig
from jobs.report import ReportConfig
from jobs.score import ScoreConfig
from jobs.train import JobConfig

REPO = Path(__file__).resolve().parents[2]
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
            if f.metadata.get("adcore.cli.hidden"):
                assert flag + " " not in text, f"{entry}: test-only {flag} shown in --help"
                continue
            assert flag in text, f"{entry}: {flag} missing from --help"
            after = text.split(flag, 1)[1][:400]
            assert "(default:" in after or "(required" in after, f"{entry}: {flag} shows no default"


def test_model_is_an_artifact_and_preset_a_registered_name_everywhere():
    for entry, classes in ENTRY_POINTS.items():
        names = {f.name for cls in classes for f in dataclasses.fields(cls)}
        if "preset" in names:
            assert "model" not in names, f"{entry}: --model and --preset side by side"
    assert "preset" in {f.name for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------- one vocabulary
OLD_NAMES = {"out", "report", "repository", "json", "address", "version"}


def test_one_flag_vocabulary():
    """--output is what a command writes, --ray-address where it joins Ray; the old names are gone."""
    for entry, classes in ENTRY_POINTS.items():
        names = {f.name for cls in classes for f in dataclasses.fields(cls)}
        assert not names & OLD_NAMES, f"{entry}: {sorted(names & OLD_NAMES)}"
        if entry in ("jobs/score.py", "jobs/train.py"):
            assert "ray_address" in names
    for entry in ("jobs/score.py", "jobs/export.py", "jobs/report.py", "jobs/train.py", "adcore.evaluate"):
        assert "output" in {f.name for cls in ENTRY_POINTS[entry] for f in dataclasses.fields(cls)}, entry


def test_version_prints_adcore_version_and_model_version_sets_the_artifact(capsys):
    import adcore

    with pytest.raises(SystemExit) as exit_:
        parse_configs((TrainPaths, TrainConfig), ["--version"], "")
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"adcore {adcore.__version__}"
    _, cfg = parse_configs((TrainPaths, TrainConfig), ["--data", "d", "--output", "o", "--model-version", "3"], "")
    assert cfg.model_version == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "d", "--model", "m", "--engine", "tourch"], "invalid choice: 'tourch'"),
        (["--data", "d", "--model", "m", "--variant", "int4"], "invalid choice: 'int4'"),
        (["--data", "d", "--model", "m", "--split", "validation"], "invalid choice: 'validation'"),
        (["--data", "d"], "the following arguments are required: --model"),
    ],
)
def test_choices_and_required_flags_are_one_line_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        parse_configs((EvaluateConfig,), argv, "", prog="adcore evaluate")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("adcore evaluate: error:"), err


def test_enum_flags_have_choices():
    def choices(classes, flag):
        parser = build_parser(classes)
        return next(a.choices for a in parser._actions if flag in a.option_strings)

    assert set(choices((EvaluateConfig,), "--engine")) == {"auto", "torch", "onnx"}
    assert set(choices((ScoreConfig,), "--variant")) == {"fp32", "int8", "fp16"}
    assert set(choices((ScoreConfig,), "--device")) == {"auto", "gpu", "cpu"}
    assert set(choices((EvaluateConfig,), "--split")) == {"train", "valid", "test"}
    assert set(choices((TrainPaths, TrainConfig), "--preset")) == set(list_models())


def test_mistyped_preset_names_the_closest_ones(capsys):
    with pytest.raises(SystemExit):
        parse_configs((TrainPaths, TrainConfig), ["--data", "d", "--output", "o", "--preset", "patchcor"], "", "x")
    err = capsys.readouterr().err
    assert "unknown preset 'patchcor'; did you mean patchcore" in err and err.count("\n") == 1


def test_test_only_flags_are_hidden_but_accepted():
    help_text = build_parser((JobConfig, TrainConfig)).format_help()
    assert "--tiny" not in help_text and "--timings" not in help_text
    assert "--simulated-batch-s" not in build_parser((ScoreConfig,)).format_help()
    _, cfg = parse_configs((TrainPaths, TrainConfig), ["--data", "d", "--output", "o", "--tiny"], "")
    assert cfg.tiny
    (score,) = parse_configs((ScoreConfig,), ["--smoke-test", "--simulated-batch-s", "0.5"], "")
    assert score.simulated_batch_s == 0.5


def test_required_unless_smoke_test(capsys):
    (cfg,) = parse_configs((ScoreConfig,), ["--smoke-test"], "")
    assert cfg.smoke_test and not cfg.input
    with pytest.raises(SystemExit):
        parse_configs((ScoreConfig,), ["--model", "m", "--output", "o"], "", prog="adcore score")
    assert "required: --input (or --smoke-test)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --config FILE
def test_config_file_sets_any_flag_and_the_command_line_wins(tmp_path):
    (tmp_path / "nightly.yaml").write_text(
        "# comments are fine\n"
        "name: from-file\n"
        "count: 7\n"
        '"on": true\n'  # quoted: YAML reads a bare on as true
        "tags: [a, b]\n"
        "weights: {vision: /w/clip}\n"
        "overrides: {alpha: 0.4, nested: {k: [1, 2]}}\n"
    )
    (cfg,) = parse_configs((Example,), ["--config", str(tmp_path / "nightly.yaml")], "")
    assert cfg == Example(
        "from-file", 7, None, True, ["a", "b"], {"vision": "/w/clip"}, {"alpha": 0.4, "nested": {"k": [1, 2]}}
    )
    argv = ["--config", str(tmp_path / "nightly.yaml"), "--count", "9", "--tags", "c", "--no-on"]
    (cfg,) = parse_configs((Example,), argv, "")
    assert (cfg.name, cfg.count, cfg.tags, cfg.on) == ("from-file", 9, ["c"], False), "command line wins"
    (tmp_path / "c.json").write_text(json.dumps({"name": "j", "ratio": 0.5, "count": 2}))
    (cfg,) = parse_configs((Example,), ["--config", str(tmp_path / "c.json")], "")
    assert (cfg.name, cfg.ratio, cfg.count) == ("j", 0.5, 2)


def test_config_file_keys_take_dashes_or_underscores_and_satisfy_required_flags(tmp_path):
    (tmp_path / "s.yaml").write_text("input: /in\nmodel: /m\noutput: /o\nbatch-size: 16\nmax_pixels: 100\n")
    (cfg,) = parse_configs((ScoreConfig,), ["--config", str(tmp_path / "s.yaml")], "")
    assert (cfg.input, cfg.model, cfg.output, cfg.batch_size, cfg.max_pixels) == ("/in", "/m", "/o", 16, 100)


@pytest.mark.parametrize(
    "text, message",
    [
        ("nmae: x\n", "unknown flag 'nmae'; did you mean name?"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        ("on: true\n", "a key reads as True"),
        ("name: x\ncount: many\n", "argument --count: invalid int value: 'many'"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit):
        parse_configs((Example,), ["--config", str(tmp_path / "c.yaml")], "", prog="x")
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_example_nightly_config_parses_as_the_score_job():
    from jobs.score import parse_args

    cfg = parse_args(["--config", str(REPO / "cluster" / "jobs" / "nightly-score.yaml")])
    assert cfg.input.startswith("s3://") and cfg.model.startswith("s3://") and cfg.output.startswith("s3://")


# ----------------------------------------------------------------------------- training flags
def test_flags_a_family_does_not_read_are_refused():
    from jobs.train import parse

    base = ["--data", "d", "--output", "o"]
    with pytest.raises(FlagError, match="--epochs, --lr: not used by preset 'dra'.*--overrides"):
        parse([*base, "--preset", "dra", "--labelled", "2", "--epochs", "3", "--lr", "0.1"])
    with pytest.raises(FlagError, match="--minutes: not used by preset 'patchcore'"):
        parse([*base, "--preset", "patchcore", "--minutes", "3"])
    _, cfg = parse([*base, "--preset", "fusion-small", "--epochs", "3", "--lr", "0.01", "--minutes", "2"])
    assert (cfg.epochs, cfg.lr, cfg.minutes) == (3, 0.01, 2.0)
    _, cfg = parse([*base, "--preset", "dra", "--minutes", "2", "--labelled", "1"])  # DRA reads its budget
    assert cfg.minutes == 2.0


def test_refused_flags_count_when_set_in_a_config_file(tmp_path):
    from jobs.train import parse

    (tmp_path / "t.yaml").write_text("data: d\noutput: o\npreset: patchcore\nepochs: 3\n")
    with pytest.raises(FlagError, match="--epochs"):
        parse(["--config", str(tmp_path / "t.yaml")])


# ----------------------------------------------------------------------------- the adcore command
@pytest.mark.parametrize(
    "command, own_flag",
    [
        ("demo", "--score-with"),
        ("train", "--num-workers"),
        ("evaluate", "--split"),
        ("export", "--variants"),
        ("score", "--triton-url"),
        ("report", "--top-k"),
    ],
)
def test_subcommands_dispatch_to_their_entry_points(capsys, command, own_flag):
    from adcore.commands import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: adcore {command} ") and own_flag in out and "--config FILE" in out


def test_unknown_subcommand_is_one_line(capsys):
    from adcore.commands import main

    with pytest.raises(SystemExit) as exit_:
        main(["tarin"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2 and err == "adcore: error: unknown command 'tarin'; did you mean train? (adcore --help)\n"
    )


def _adcore(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "adcore", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_adcore_help_imports_neither_ray_nor_torch():
    code = "import sys, adcore.commands; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "[]"
    done = _adcore("--help")
    assert done.returncode == 0 and all(
        c in done.stdout for c in ("demo", "train", "evaluate", "export", "score", "report")
    )


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """Each error a user can fix: exit status 1 or 2, one line on stderr, no traceback; -v shows it."""
    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "data").mkdir()
    cases = [
        (
            ["train", "--data", str(tmp_path / "data"), "--output", "o", "--preset", "patchcor"],
            "did you mean patchcore",
        ),
        (["train", "--data", str(tmp_path / "missing"), "--output", "o", "--preset", "patchcore"], "no such folder"),
        (["evaluate", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "missing")], "no artifact"),
        (["export", "--model", str(tmp_path / "not-an-artifact"), "--output", str(tmp_path / "r")], "not an artifact"),
        (["score", "--input", "s3:/bucket/x", "--model", "m", "--output", "o"], "is not an S3 URI"),
    ]
    for args, message in cases:
        done = _adcore(*args, cwd=tmp_path)
        assert done.returncode in (1, 2), (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert lines[0].startswith(f"adcore {args[0]}: error: ")
    verbose = _adcore("export", "-v", "--model", str(tmp_path / "not-an-artifact"), "--output", "r", cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "ArtifactError" in verbose.stderr
