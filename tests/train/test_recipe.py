from pathlib import Path

import pytest

from maxq.train.recipe import TrainConfig, load_yaml

CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml") if not p.stem.startswith("study")
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipes_are_valid(path):
    options = load_yaml(path)
    if options.get("finetune"):  # a fine-tuning recipe needs the model to start from
        options["init"] = "parent/checkpoint.pt"
    cfg = TrainConfig.from_dict(options)
    assert cfg.sparsity_config() is not None or cfg.method == "dense"


def test_paper_recipes_match_the_spec():
    imagenet = TrainConfig.from_dict(load_yaml(CONFIGS[0].parent / "imagenet_resnet50.yaml"))
    assert (imagenet.model, imagenet.epochs, imagenet.lr, imagenet.weight_decay) == ("resnet50", 120, 0.1, 1e-4)
    assert imagenet.no_decay_1d and imagenet.label_smoothing == 0.1 and imagenet.ramp == (0.0, 30.0)
    cifar = TrainConfig.from_dict(load_yaml(CONFIGS[0].parent / "cifar100_resnet18.yaml"))
    assert cifar.nesterov and cifar.weight_decay == 5e-4 and not cifar.no_decay_1d and cifar.label_smoothing == 0


def test_default_ramp_is_a_quarter_of_training():
    assert TrainConfig(epochs=120).resolved_ramp == (0.0, 30.0)
    assert TrainConfig(epochs=8, ramp=(1, 3)).resolved_ramp == (1.0, 3.0)
    with pytest.raises(ValueError, match="ramp end"):
        TrainConfig(ramp=(3, 1))
