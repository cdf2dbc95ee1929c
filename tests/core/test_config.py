import pytest

from maxq.core.config import MaxQConfig, OneShotConfig, SRSTEConfig, make_config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=4, m=2), "n must be < m"),
        (dict(n=0, m=4), ">= 1"),
        (dict(ramp=(30, 10)), "ramp end"),
        (dict(ramp=(0,)), "ramp"),
        (dict(schedule="quadratic"), "unknown schedule"),
        (dict(tau=0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(order="middle"), "block order"),
        (dict(update_every=0), "update_every"),
        (dict(decay_lambda=-1), "decay_lambda"),
    ],
)
def test_maxq_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaxQConfig(**kwargs)


def test_defaults_are_the_paper_defaults():
    cfg = MaxQConfig()
    assert (cfg.n, cfg.m, cfg.tau, cfg.schedule, cfg.ramp, cfg.order) == (2, 4, 0.01, "linear", (0.0, 30.0), "smallest")
    assert cfg.decay == 2e-4 and cfg.soft and cfg.straight_through and not cfg.frozen
    assert SRSTEConfig().decay == 2e-4 and not SRSTEConfig().soft
    one = OneShotConfig()
    assert one.frozen and not one.straight_through and one.decay == 0


def test_make_config():
    assert make_config("maxq", n=1, m=16, ramp=[0, 5]).ramp == (0.0, 5.0)
    with pytest.raises(ValueError, match="unknown method"):
        make_config("lbc")
    with pytest.raises(ValueError, match="no option"):
        make_config("srste", tau=0.1)


def test_to_dict_round_trip():
    cfg = MaxQConfig(n=1, m=8, ramp=(1, 4))
    d = cfg.to_dict()
    assert d["method"] == "maxq"
    assert make_config(d.pop("method"), **d) == cfg


def test_soft_warmup_is_a_maxq_option_that_the_config_answers():
    from maxq.core.config import config_options

    assert "soft_warmup" in config_options("maxq") and "soft_warmup" not in config_options("srste")
    paper, ramp, norm = (MaxQConfig(soft_warmup=s) for s in ("none", "ramp", "normalize"))
    assert [c.soft_strength(0.25) for c in (paper, ramp, norm)] == [1.0, 0.75, 1.0]
    assert [c.normalize_soft for c in (paper, ramp, norm)] == [False, False, True]
    assert SRSTEConfig().soft_strength(0.5) == 1.0 and not SRSTEConfig().normalize_soft
    with pytest.raises(ValueError, match="soft_warmup"):
        MaxQConfig(soft_warmup="fade")


def test_soft_warmup_reaches_the_training_recipe():
    from maxq.train.recipe import TrainConfig

    cfg = TrainConfig(method="maxq", soft_warmup="ramp", ramp=(0, 1), per_step=True)
    assert cfg.sparsity_config().soft_warmup == "ramp"
    assert TrainConfig(method="srste", soft_warmup="ramp").sparsity_config().method == "srste"
    with pytest.raises(ValueError, match="soft_warmup"):
        TrainConfig(method="maxq", soft_warmup="fade")
