"""The prompts' imaging domain follows --domain, else the data's dataset.json, else the preset."""

from __future__ import annotations

import json

import pytest

from adcore.errors import FlagError
from adcore.models import create
from adcore.training import TrainConfig
from adcore.training.loop import domain_overrides


def _data(tmp_path, domain):
    (tmp_path / "dataset.json").write_text(json.dumps({"domain": domain}))
    return str(tmp_path)


def test_domain_from_manifest_flag_and_overrides(tmp_path):
    data = _data(tmp_path, "chest_xray")
    overrides = domain_overrides(TrainConfig(preset="fusion-small", tiny=True), data)
    assert overrides == {"text": {"domain": "chest_xray"}}
    assert create("fusion-small", tiny=True, **overrides).cfg.text.domain == "chest_xray"
    assert domain_overrides(TrainConfig(preset="fusion-small", domain="skin"), data) == {"text": {"domain": "skin"}}
    explicit = {"text": {"domain": "liver_ct"}, "alpha": 0.3}
    assert domain_overrides(TrainConfig(preset="fusion-small", overrides=explicit), data) == explicit
    assert domain_overrides(TrainConfig(preset="patchcore"), data) == {}  # no prompts: nothing to set


def test_without_manifest_the_preset_decides(tmp_path):
    assert domain_overrides(TrainConfig(preset="fusion-small"), str(tmp_path)) == {}


def test_unknown_domain_is_one_line_error(tmp_path):
    with pytest.raises(FlagError, match="known: .*brain_mri"):
        domain_overrides(TrainConfig(preset="fusion-small"), _data(tmp_path, "knee_xray"))
    with pytest.raises(FlagError, match="--domain"):
        domain_overrides(TrainConfig(preset="fusion-small", domain="knee"), str(tmp_path))


def test_sdmad_sign_bank_follows_the_data(tmp_path):
    data = _data(tmp_path, "chest_xray")
    overrides = domain_overrides(TrainConfig(preset="sdmad", tiny=True), data)
    assert overrides == {"text": {"domain": "chest_xray"}}
    model = create("sdmad", tiny=True, **overrides)
    assert model.cfg.text.domain == "chest_xray" and model.bank.domain == "chest_xray"
