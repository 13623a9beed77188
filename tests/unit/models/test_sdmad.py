"""SD-MAD: the evidence formulas by hand, the stage-2 selection, the head, a tiny few-shot run on demo categories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adcore.data.demo import make_demo_dataset
from adcore.evaluate import evaluate
from adcore.models import create
from adcore.models.sdmad.head import SDMADHead
from adcore.models.sdmad.model import evidence
from adcore.models.sdmad.train import fit_alignment
from adcore.scorer import load
from adcore.training import TrainConfig, train
from adcore.training.loop import load_split

KINDS = ["hyperintense_mass", "hypointense_cyst", "diffuse_region", "calcified_foci"]


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


def test_evidence_by_hand_with_and_without_selection():
    # Two patches in 2-d; sign 0 along x, sign 1 along y, the normal appearance along (1, 1).
    patches = _unit([1.0, 0.0], [0.0, 1.0])[None]  # [1, 2, 2]
    signs, normals = _unit([1.0, 0.0], [0.0, 1.0]), _unit([1.0, 1.0])
    weights = torch.tensor([[1.0, 0.5], [0.0, 0.5]])  # category 0: sign 0; category 1 shares both
    c = 2**-0.5  # cosine of each patch with the normal sign
    ev = evidence(patches, signs, normals, weights, torch.tensor(0.25), scale=2.0, k=1)
    rel = 2.0 * (torch.tensor([[1.0, 0.0], [0.0, 1.0]]) - c)  # [patch, sign]
    torch.testing.assert_close(ev["map_logit"][0], torch.logsumexp(rel, -1))
    act = rel.amax(0)  # top-1 patch per sign
    torch.testing.assert_close(ev["act"][0], act)
    z = torch.stack([act[0], 0.5 * act[0] + 0.5 * act[1]])
    torch.testing.assert_close(ev["category_logits"][0], torch.cat([torch.tensor([0.25]), z]))
    torch.testing.assert_close(ev["image_logit"][0], torch.logsumexp(z, 0) - 0.25)
    # Stage 2: sign 1 is below its threshold, so category 1 uses sign 0 alone; a z above both keeps all signs.
    mu, sd = torch.tensor([0.0, act[1].item() + 1.0]), torch.ones(2)
    sel = evidence(patches, signs, normals, weights, torch.tensor(0.25), 2.0, 1, (mu, sd, torch.tensor(0.0)))
    torch.testing.assert_close(sel["category_logits"][0, 1:], torch.stack([act[0], act[0]]))
    none = evidence(patches, signs, normals, weights, torch.tensor(0.25), 2.0, 1, (mu, sd, torch.tensor(9.0)))
    torch.testing.assert_close(none["category_logits"], ev["category_logits"])


def test_set_categories_drops_the_signs_only_other_categories_list():
    model = create("sdmad", tiny=True)
    before = list(model.bank.signs)
    model.set_categories(["hypointense_cyst", "diffuse_region"])
    assert model.categories == ["hypointense_cyst", "diffuse_region"]
    assert model.sign_emb.shape[0] == len(model.bank.signs) == 8 < len(before)
    assert model.sign_weight.shape == (8, 2) and model.association.sum(0).tolist() == [4.0, 4.0]
    rebuilt = type(model).from_config_dict(model.config_dict())
    assert rebuilt.categories == model.categories and rebuilt.sign_emb.shape == model.sign_emb.shape
    with pytest.raises(ValueError, match="glioma"):
        model.set_categories(["glioma", "diffuse_region"])


def test_alignment_keeps_signs_more_active_on_their_own_category():
    model = create("sdmad", tiny=True)
    model.set_categories(["hypointense_cyst", "diffuse_region"])
    s = len(model.bank.signs)
    y = torch.tensor([0, 0, 1, 1, 2, 2])  # two normals, two shots per category
    act = torch.zeros(6, s)
    cyst = model.association[:, 0] > 0
    act[2:4, cyst] = 1.0  # cyst shots light the cyst signs only
    aligned = fit_alignment(model, act, y)
    first_diffuse = int(torch.nonzero(~cyst)[0])
    want = cyst.float()
    want[first_diffuse] = 1.0  # diffuse signs are silent: none beats its rivals, the category keeps its best
    torch.testing.assert_close(aligned, want)
    model.aligned.copy_(aligned)
    weights = model.weights()  # each category averages its aligned signs only
    assert torch.nonzero(weights[:, 1]).flatten().tolist() == [first_diffuse]
    assert torch.allclose(weights.sum(0), torch.ones(2)) and ((weights[:, 0] > 0) == cyst).all()
    act[4:6, ~cyst] = 2.0
    act[0, 0] = 5.0  # a normal lights one sign: it is not aligned any more
    aligned = fit_alignment(model, act, y)
    assert aligned[0] == 0 and aligned.sum() == s - 1


def test_head_scores_categories_like_the_network_and_round_trips():
    torch.manual_seed(0)
    model = create("sdmad", tiny=True).eval()
    x = torch.rand(3, 3, model.input_size, model.input_size)
    with torch.no_grad():
        model.act_mean.normal_()
        model.select_z.fill_(0.5)
        out = model(x)
        logits = model.evidence(out.patch_embeddings)["category_logits"]
    net = {
        "score": out.score.numpy(),
        "anomaly_map": out.anomaly_map.numpy(),
        "patch_embeddings": out.patch_embeddings.numpy(),
    }
    head = SDMADHead.from_model(model)
    assert head.categories == tuple(model.categories)
    want = torch.softmax(logits, 1)[:, 1:].numpy()
    np.testing.assert_allclose(head.category_scores(net), want, atol=1e-5)
    again = SDMADHead.from_saved(head.config(), head.arrays())
    np.testing.assert_allclose(again.category_scores(net), want, atol=1e-5)
    np.testing.assert_allclose(head(net)[0], out.score.numpy())
    assert SDMADHead.from_saved({}, {}).categories == ()  # no signs saved: a plain pass-through head


@pytest.fixture(scope="module")
def cats_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdmad-demo") / "d"
    demo = dict(n_train=8, n_valid=16, n_test=16, size=64, n_train_anomalous=8)
    return str(make_demo_dataset(root, kinds=KINDS, categories=True, **demo))


@pytest.fixture(scope="module")
def one_shot(cats_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdmad-art") / "sdmad"
    cfg = TrainConfig(preset="sdmad", tiny=True, labelled=4, seed=0, overrides={"steps": 10})
    return train(cats_demo, cfg, output=str(out)), str(out)


@pytest.mark.slow
def test_tiny_one_shot_run_on_demo_categories(cats_demo, one_shot):
    scorer, path = one_shot
    summary = json.loads(Path(path, "config.json").read_text())["training"]
    assert summary["shots_per_category"] == {k: 1 for k in sorted(KINDS)} and summary["sdmad_steps"] == 10
    assert summary["select_z"] in scorer.model.cfg.select_z_grid  # fitted on the validation split
    again = load(path)
    assert again.categories == tuple(sorted(KINDS)) and np.isfinite(again.model.select_z.item())
    test = load_split(cats_demo, "test", None)
    a, b = scorer.score_images(test["images"]), again.score_images(test["images"])
    for r, s in zip(a, b):
        assert set(r.category_scores) == set(KINDS) and min(r.category_scores.values()) >= 0
        assert r.category == s.category and r.category_scores == pytest.approx(s.category_scores, abs=1e-5)
        assert (r.category is None) == (r.label == 0)  # normal frames carry no category
        if r.label:
            assert r.category == max(r.category_scores, key=r.category_scores.get)
    row = evaluate(again, cats_demo, "test")
    for key in ("normal_vs_any_auroc", "category_auroc", "accuracy", "macro_f1"):
        assert 0 <= row[key] <= 1
    assert row["n_categorised"] == 8 and set(row["category_auroc_per"]) == set(KINDS)


def test_sdmad_refuses_data_without_categories(tmp_path):
    plain = make_demo_dataset(
        tmp_path / "p", n_train=6, n_valid=4, n_test=2, size=64, kinds=KINDS[:2], n_train_anomalous=2
    )
    with pytest.raises(ValueError, match="categories.csv"):
        train(str(plain), TrainConfig(preset="sdmad", tiny=True, labelled=2, smoke_test=True))
    with pytest.raises(ValueError, match="labelled anomalies"):
        train(str(plain), TrainConfig(preset="sdmad", tiny=True, smoke_test=True))


def test_strongly_anomalous_images_keep_their_order():
    torch.manual_seed(0)
    model = create("sdmad", tiny=True).eval()
    x = torch.rand(4, 3, model.input_size, model.input_size)
    with torch.no_grad():
        model.normal_bias.fill_(-100.0)  # every image far past the float32 range of a sigmoid
        score = model(x).score
        assert score.min() > 40 and len(set(score.tolist())) == 4
        model.cfg.sigmoid_outputs = True  # the earlier outputs: all tie at 1.0
        assert model(x).score.tolist() == [1.0] * 4
    saved = model.config_dict()
    del saved["sigmoid_outputs"]
    assert type(model).from_config_dict(saved).cfg.sigmoid_outputs  # artifacts saved before: as trained


@pytest.mark.slow
def test_a_sites_own_categories_train_with_signs_file(tmp_path):
    from adcore.data import bmad
    from adcore.errors import FlagError

    demo = dict(n_train=6, n_valid=8, n_test=4, size=64, kinds=KINDS[:2], n_train_anomalous=2, categories=True)
    root = make_demo_dataset(tmp_path / "site", **demo)
    rename = {KINDS[0]: "drusen", KINDS[1]: "cyst"}
    bmad.write_categories(root, {p: rename[c] for p, c in bmad.read_categories(root).items()})
    cfg = TrainConfig(preset="sdmad", tiny=True, labelled=2, smoke_test=True)
    with pytest.raises(FlagError, match=r"not \['cyst', 'drusen'\].*--signs FILE"):
        train(str(root), cfg)
    signs_file = tmp_path / "retina.yaml"
    signs_file.write_text(
        "domain: retina_site\n"
        "normal: [regular retinal layers, a smooth foveal pit]\n"
        "categories:\n"
        "  drusen: [small deposits under the retinal pigment epithelium]\n"
        "  cyst: [a round fluid space within the retina, a dark intraretinal cavity]\n"
    )
    cfg.signs = str(signs_file)
    out = tmp_path / "art"
    train(str(root), cfg, output=str(out))
    again = load(str(out))
    assert set(again.categories) == {"drusen", "cyst"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["config"]["signs"] == str(signs_file)
    signs_file.unlink()  # the artifact carries its bank: it rebuilds without the file
    assert load(str(out)).model.bank.domain == "retina_site"


def test_signs_flag_is_refused_for_a_preset_without_a_sign_bank(tmp_path):
    from adcore.errors import FlagError
    from adcore.training.loop import model_overrides
    from jobs.train import parse

    bank = tmp_path / "b.json"
    bank.write_text(json.dumps({"normal": ["n"], "categories": {"a": ["x"], "b": ["y"]}}))
    _, cfg = parse(["--data", "d", "--output", "o", "--preset", "sdmad", "--labelled", "2", "--signs", str(bank)])
    assert model_overrides(cfg)["text"]["bank"]["categories"] == {"a": ["x"], "b": ["y"]}
    cfg.preset = "patchcore"
    with pytest.raises(FlagError, match="--signs: preset 'patchcore' has no sign bank.*sdmad"):
        model_overrides(cfg)
