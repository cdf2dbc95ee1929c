"""``maxq train`` argument handling: bad input fails fast, with a message, before anything is written."""

import pytest

from maxq.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nm", "4:2"], "n must be < m"),
        (["--nm", "2:3x"], "cannot parse N:M"),
        (["--model", "resnet9000"], "unknown model"),
        (["--dataset", "mnist-ultra"], "unknown dataset"),
        (["--ramp", "30", "10"], "ramp end"),
        (["--schedule", "quadratic"], "invalid choice"),
        (["--epochs", "0"], "--epochs"),
        (["--tau", "-1"], "--tau"),
    ],
)
def test_invalid_flags_fail_fast(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = main(["train", "--out", str(out), "--dataset", "synthetic", *flags])
    except SystemExit as exc:  # argparse's own checks exit with 2
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_dataset_says_where_it_looked(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "apt-get install dataset-fashion-mnist" in err
    assert not out.exists()
    code = main(["train", "--out", str(out), "--dataset", "cifar10"])
    assert code == 2 and "--data-dir" in capsys.readouterr().err


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: synthetic\nepochs: 1\nbatch-size: 64\nnm: '1:4'\nmethod: srste\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(out), "--nm", "2:4", "--no-progress"]) == 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["nm"] == "2:4" and resolved["method"] == "srste" and resolved["batch_size"] == 64


def test_bad_yaml(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: [1\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    recipe.write_text("epochz: 3\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert "unknown training option" in capsys.readouterr().err
