"""``maxq train`` from the command line: bad input fails fast, with a message, before anything is written; a
short run learns; the summary describes the shipped model."""

import json

import pytest

from maxq.cli import main, train_summary


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
        (["--tau", "-1"], "--tau must be a number > 0"),
        (["--tau", "0"], "--tau must be a number > 0"),
        (["--threads", "-1"], "--threads must be a positive integer, got -1"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--label-smoothing", "2"], "--label-smoothing must be a number in [0, 1), got 2.0"),
        (["--label-smoothing", "1"], "--label-smoothing must be a number in [0, 1)"),
        (["--momentum", "1"], "--momentum must be a number in [0, 1)"),
        (["--momentum", "-0.5"], "--momentum must be a number in [0, 1)"),
        (["--lr", "0"], "--lr must be a number > 0, got 0.0"),
        (["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be a number > 0, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
        (["--val-split", "1"], "--val-split must be a number in [0, 1)"),
        (["--warmup-epochs", "5", "--epochs", "2"], "longer than the run"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--subset", "0"], "--subset must be a positive integer"),
        (["--update-every", "0"], "--update-every must be a positive integer"),
        (["--extend"], "needs --resume"),
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


def test_out_must_be_a_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["train", "--out", str(afile), "--dataset", "synthetic"]) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    assert main(["train", "--out", str(afile / "run"), "--dataset", "synthetic"]) == 2
    assert "is a file, so the run folder cannot be created" in capsys.readouterr().err
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("label_smoothing: 2", "--label-smoothing must be a number in [0, 1)"),
        ("threads: -1", "--threads must be a positive integer"),
        ("momentum: 1.5", "--momentum must be a number in [0, 1)"),
        ("lr: 0", "--lr must be a number > 0"),
        ("lr: fast", "lr must be a number, got 'fast'"),
        ("epochs: 2.5", "--epochs must be a positive integer"),
        ("nesterov: maybe", "nesterov must be true or false"),
        ("ramp: [0, x]", "--ramp takes two numbers"),
        ("device: 3", "--device must be a non-empty string"),
    ],
)
def test_yaml_values_are_validated_like_flags(line, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: synthetic\n{line}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    from maxq.train.recipe import TrainConfig, load_yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5e-5\n")  # YAML 1.1 reads these as text
    cfg = TrainConfig.from_dict(load_yaml(recipe))
    assert cfg.lr == 0.001 and cfg.weight_decay == 5e-5


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, capsys, monkeypatch):
    import maxq.train.loop

    def broken(cfg, given=None):
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(maxq.train.loop, "train", broken)
    args = ["train", "--out", str(tmp_path / "run"), "--dataset", "synthetic"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        "maxq train: error: RuntimeError: the disk caught fire second line (run with -v for the traceback)\n"
    )
    assert main(["-v", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and 'raise RuntimeError("the disk caught fire' in err
    assert err.endswith("maxq train: error: RuntimeError: the disk caught fire second line\n")
    assert main([*args, "-v"]) == 1  # -v after the command works too
    assert "Traceback" in capsys.readouterr().err


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


def _run(tmp_path, name, *flags):
    out = tmp_path / name
    code = main(["train", "--dataset", "synthetic", "--out", str(out), "--no-progress", "--threads", "2", *flags])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def test_a_short_run_learns_and_the_summary_describes_the_shipped_model(tmp_path, capsys):
    # 2 epochs of MaxQ 2:4 (dense first epoch, N:M second) on the learnable synthetic set; chance is 10%.
    flags = ["--method", "maxq", "--ramp", "0", "1", "--epochs", "2", "--batch-size", "32", "--lr", "0.1"]
    report = _run(tmp_path, "learn", *flags)
    assert report["top1_folded"] > 90 and report["top1_last"] > 90
    assert report["nm_ok"] is True and report["ramp_finished"] is True
    text = capsys.readouterr().out
    assert f"top-1 {report['top1_folded']:.2f}% (shipped folded model" in text
    assert "layers: 6 of 8 sparsified 2:4" in text
    assert (report["layers_total"], report["layers_sparsified"]) == (8, 6)
    assert "first conv (kept dense by default)" in text and "last classifier (kept dense by default)" in text
    assert "N:M compliant (the 6 sparsified layers): yes" in text


def test_summary_names_layers_a_pattern_skips(tmp_path, capsys):
    # cnn_small's convs take 1, 16, 16, 16, 32, 32, 64 input channels and the classifier 64: 1:32 fits three.
    report = _run(tmp_path, "skip", "--nm", "1:32", "--epochs", "1", "--subset", "64", "--batch-size", "32")
    text = capsys.readouterr().out
    assert "layers: 3 of 8 sparsified 1:32" in text
    skipped = [d for d in report["dense_layers"] if "not divisible by m=32" in d["reason"]]
    assert len(skipped) == 3 and len(report["dense_layers"]) == 5
    for d in report["dense_layers"]:
        assert f"{d['layer']} ({d['reason']})" in text
    # One staircase epoch leaves the ramp unfinished: folding prunes, and the headline is the folded model's.
    assert report["ramp_finished"] is False and "ramp unfinished" in text
    assert f"top-1 {report['top1_folded']:.2f}% (shipped folded model" in text
    before = f"last epoch before folding {report['top1_last']:.2f}%"
    assert (before in text) == (report["top1_folded"] != report["top1_last"])


def test_summary_gives_both_accuracies_when_folding_changed_it():
    report = {
        "method": "maxq", "n": 1, "m": 64, "model": "cnn", "dataset": "fashion-mnist",
        "top1_folded": 11.33, "top1_last": 7.42, "top1_best": 7.42, "best_epoch": 1, "ramp_finished": False,
        "params_total": 1000, "params_nonzero": 520, "layers_total": 8, "layers_sparsified": 1, "nm_ok": True,
        "dense_layers": [{"layer": "3", "reason": "input channels 32 not divisible by m=64"}],
        "train_time_s": 12.0, "files": {"report": "r/report.json", "plot": "r/curves.png", "folded": "r/m.pt"},
    }  # fmt: skip
    lines = train_summary(report)
    assert lines[0] == (
        "maxq train: maxq 1:64 cnn on fashion-mnist: top-1 11.33% (shipped folded model; last epoch before folding "
        "7.42%), best epoch 7.42% (epoch 1)"
    )
    text = "\n".join(lines)
    assert "layers: 1 of 8 sparsified 1:64; 520 of 1,000 parameters nonzero (52.0%)" in text
    assert "3 (input channels 32 not divisible by m=64)" in text
    assert "N:M compliant (the 1 sparsified layers): yes" in text
