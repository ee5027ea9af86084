import json

import pytest

from minefield.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    Optimizer,
    PoisonConfig,
    TrainConfig,
    load_config,
)


def test_roundtrip_through_json():
    cfg = ExperimentConfig(name="x", train=TrainConfig(optimizer=Optimizer.SGD,
                                                       milestones=(10, 20)))
    again = ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_lr_schedule():
    t = TrainConfig(lr=1.0, milestones=(10, 20), gamma=0.1)
    assert [t.lr_at(s) for s in (0, 9, 10, 19, 20, 1000)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("d,msg", [
    ({"train": {"lr": "fast"}}, r"train.lr: expected a number"),
    ({"train": {"steps": 1.5}}, r"train.steps: expected an integer"),
    ({"train": {"optimizer": "lbfgs"}}, r"train.optimizer: 'lbfgs' is not one of"),
    ({"data": {"nme": "swissroll"}}, r"unknown key\(s\) nme"),
    ({"model": {"widths": 5}}, r"model.widths: expected a list"),
    ({"poison": {"beta": 1.0}}, r"beta must be in \[0, 1\)"),
    ({"train": {"lr": -1}}, r"lr must be > 0"),
    ({"train": {"milestones": [5, 2]}}, r"milestones must be increasing"),
    ({"data": {"n_train": -3}}, r"n_train must be >= 0"),
    ({"train": 3}, r"expected an object"),
])
def test_bad_configs_give_one_clear_error(d, msg):
    with pytest.raises(ConfigError, match=msg):
        ExperimentConfig.from_dict(d)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_beta_none_allowed_and_stage_defaults():
    assert PoisonConfig(beta=None).beta is None
    assert DataConfig().seed is None
    with pytest.raises(ConfigError, match="log_every must be >= 1"):
        TrainConfig(log_every=0)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        TrainConfig(steps=-1)
