import pytest
import yaml

from lusscore.config import apply_overrides, load_config, packaged_configs, save_config
from lusscore.utils import LusscoreError


def test_packaged_configs_have_reference_hyperparameters():
    assert {"imagenet_s50", "imagenet_s300", "imagenet_s919"} <= set(packaged_configs())
    s50, s919 = load_config("imagenet_s50"), load_config("imagenet_s919")
    assert s50["model"]["arch"] == "resnet18" and s919["model"]["arch"] == "resnet50"
    assert s50["pretrain"]["crops"]["counts"] == [2, 6]
    assert s50["pretrain"]["queue_length"] == 2048 and s919["pretrain"]["queue_length"] == 3840
    assert (s50["label"]["tau"], s919["label"]["tau"]) == (0.41, 0.37)
    assert {k: s919["cluster"][k] for k in ("k", "niter", "nredo")} == {"k": 919, "niter": 20, "nredo": 30}
    assert s50["attention"]["base_lr"] == 6.0 and s919["attention"]["base_lr"] == 0.6


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("imagenet_s50")
    new = apply_overrides(cfg, ["pretrain.epochs=3", "data.root=/data/s50", "label.tau=0.35",
                                "pretrain.crops.counts=[2, 2]", "model.arch=resnet50"])
    assert cfg["pretrain"]["epochs"] == 200, "the input config must not change"
    assert new["pretrain"]["epochs"] == 3 and new["data"]["root"] == "/data/s50"
    assert new["label"]["tau"] == 0.35 and new["pretrain"]["crops"]["counts"] == [2, 2]
    save_config(tmp_path / "cfg.yaml", new)
    assert load_config(tmp_path / "cfg.yaml") == new
    assert yaml.safe_load((tmp_path / "cfg.yaml").read_text()) == new


def test_override_errors(tmp_path):
    cfg = load_config("imagenet_s50")
    with pytest.raises(LusscoreError, match="unknown key 'epoch'"):
        apply_overrides(cfg, ["pretrain.epoch=3"])
    with pytest.raises(LusscoreError, match="key=value"):
        apply_overrides(cfg, ["pretrain.epochs"])
    with pytest.raises(LusscoreError, match="not a section"):
        apply_overrides(cfg, ["seed.x=1"])
    with pytest.raises(LusscoreError, match="no config file or packaged config"):
        load_config("nope")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(LusscoreError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_folder_named_like_a_packaged_config_is_not_read_as_one(tmp_path, monkeypatch):
    """`luss demo --out demo` leaves a folder ./demo; load_config("demo") still means the
    packaged config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_config("demo")["name"] == "demo"


def test_every_config_sits_over_the_defaults(tmp_path):
    from lusscore.config import with_defaults
    assert "defaults" not in packaged_configs()
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\npretrain:\n  epochs: 3\n  loss_weights: {swav: 1.0}\n")
    cfg = load_config(path)
    assert list(cfg)[0] == "name" and list(cfg["pretrain"])[:2] == ["epochs", "loss_weights"]
    assert cfg["pretrain"]["epochs"] == 3 and cfg["pretrain"]["weight_decay"] == 1.0e-6
    assert cfg["pretrain"]["loss_weights"] == {"swav": 1.0}  # a mapping value is never merged into
    assert cfg["attention"]["optimizer"] == "lars" and cfg["seed"] == 0
    assert with_defaults(cfg) == cfg  # a saved run config loads back to itself
    assert apply_overrides(cfg, ["cluster.nredo=4"])["cluster"]["nredo"] == 4  # defaults are settable
