import json

import pytest
import torch

from minefield.basin import VolumeConfig
from minefield.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PoisonConfig,
    TrainConfig,
    load_config,
)
from minefield.directions import DirectionSpec
from minefield.options import (
    DirectionKind,
    Init,
    Optimizer,
    PoisonObjective,
    RadiusMethod,
    StopRule,
)
from minefield.search import SearchConfig


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
    # torch keeps a seed's low 32 bits: 2**32 trained seed 0's model (exit 0)
    ({"train": {"seed": 2**32}}, r"^train.seed must be in \[0, 2\*\*32\), got 4294967296$"),
    ({"train": {"seed": -1}}, r"^train.seed must be in \[0, 2\*\*32\), got -1$"),
    ({"train": 3}, r"expected an object"),
    # a rate float32 cannot hold was "unexpected error ... (this is a bug)"
    ({"train": {"lr": 1e300}}, r"^train.lr x train.gamma\^0 = 1e\+300 after 0 milestone"),
    ({"train": {"lr": 1e-10, "gamma": 1e300, "milestones": [5, 9]}},
     r"train.gamma\^1 = 1e\+290.*overflow float32"),
    # an integer no float holds was "unexpected error OverflowError ... (this is a bug)"
    ({"train": {"l2": 10**400}}, r"^ExperimentConfig.train.l2: 1000.*too large for a number$"),
    # "cuda..." was enough: torch then failed on "cudafoo" / "cuda:x" (RuntimeError, "a bug")
    ({"device": "cudafoo"}, r"device must be auto, cpu or cuda\[:N\], got 'cudafoo'"),
    ({"device": "cuda:x"}, r"got 'cuda:x'"),
    ({"device": "cuda0"}, r"got 'cuda0'"),
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


def test_load_config_refuses_a_key_given_twice(tmp_path):
    """json keeps the last of a repeated key, silently: this file trained at lr 0.001."""
    (tmp_path / "dup.json").write_text('{"train": {"lr": 0.5, "steps": 3, "lr": 0.001}}')
    with pytest.raises(ConfigError, match=r"^a JSON object gives the key\(s\) lr twice"):
        load_config(tmp_path / "dup.json")
    (tmp_path / "ok.json").write_text('{"train": {"lr": 0.5}, "model": {"name": "mlp"}}')
    assert load_config(tmp_path / "ok.json").train.lr == 0.5  # a name in two objects is fine


def test_devices_the_config_accepts():
    for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert ExperimentConfig(device=d).device == d


def test_beta_none_allowed_and_stage_defaults():
    assert PoisonConfig(beta=None).beta is None
    assert DataConfig().seed is None
    with pytest.raises(ConfigError, match="log_every must be >= 1"):
        TrainConfig(log_every=0)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        TrainConfig(steps=-1)


# --- enum fields: a string and its member are one value -------------------------------------


@pytest.mark.parametrize("cls, field, member", [
    (TrainConfig, "optimizer", Optimizer.SGD),
    (TrainConfig, "optimizer", Optimizer.RMSPROP),
    (PoisonConfig, "objective", PoisonObjective.FLIP),
    (ModelConfig, "init", Init.HE_NORMAL),
    (SearchConfig, "stopping", StopRule.FIXED),
    (SearchConfig, "objective", PoisonObjective.COMPLEMENT),
    (VolumeConfig, "method", RadiusMethod.GRID),
    (DirectionSpec, "kind", DirectionKind.GAUSSIAN),
])
def test_strings_are_coerced_to_their_enum(cls, field, member):
    from_str = cls(**{field: member.value})
    assert getattr(from_str, field) is member
    assert from_str == cls(**{field: member})


@pytest.mark.parametrize("cls, field, msg", [
    (TrainConfig, "optimizer", r"train.optimizer: 'lbfgs' is not one of sgd, adam, rmsprop"),
    (PoisonConfig, "objective", r"poison.objective: 'lbfgs' is not one of complement, flip"),
    (SearchConfig, "stopping", r"search.stopping: 'lbfgs' is not one of fixed, target"),
    (VolumeConfig, "cutoff_kind", r"volume.cutoff_kind: 'lbfgs' is not one of abs, relative"),
])
def test_unknown_option_names_field_and_choices(cls, field, msg):
    with pytest.raises(ConfigError, match=msg):
        cls(**{field: "lbfgs"})


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_string_and_enum_optimizer_train_bit_identically(name):
    from minefield.data import load_dataset
    from minefield.models import build_model
    from minefield.train import fit, init_stack

    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40))
    model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    params = init_stack(model, "glorot_uniform", [0])
    kw = dict(lr=0.05, steps=20, log_every=20, batch_size=16)
    by_str = fit(model, params, data, TrainConfig(optimizer=name, **kw), 0.0).params
    by_enum = fit(model, params, data, TrainConfig(optimizer=Optimizer(name), **kw), 0.0).params
    others = [fit(model, params, data, TrainConfig(optimizer=o, **kw), 0.0).params
              for o in Optimizer if o.value != name]
    for k in params:
        assert torch.equal(by_str[k], by_enum[k])
    # the regression: "sgd" and "adam" used to fall through to RMSprop
    assert all(not torch.equal(by_str["0.weight"], o["0.weight"]) for o in others)
