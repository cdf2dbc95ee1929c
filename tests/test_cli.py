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
        # Issue 27: options the method ignores were dropped silently; each says which way to go.
        (["--method", "dense", "--nm", "1:4"], "--nm would have no effect with --method dense (a dense run has no"),
        (["--method", "oneshot", "--ramp", "0", "1"], "--ramp would have no effect with --method oneshot (one-shot"),
        (["--method", "oneshot", "--update-every", "2"], "--update-every would have no effect with --method oneshot"),
        (
            ["--method", "srste", "--no-queries", "--tau", "0.1"],
            "--tau --queries would have no effect with --method srste",
        ),
        (["--method", "srste", "--per-step"], "drop it (or use --method maxq, which takes every sparsity option)"),
        (["--no-no-decay-1d"], "unrecognized arguments: --no-no-decay-1d"),
        (["--decay-1d", "--no-decay-1d"], "not allowed with argument"),
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
    code = main(["train", "--dataset", "synthetic", "--out", str(out), "--no-progress", "--threads", "1", *flags])
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
    captured = capsys.readouterr()
    text = captured.out
    assert "layers: 3 of 8 sparsified 1:32" in text
    skipped = [d for d in report["dense_layers"] if "not divisible by m=32" in d["reason"]]
    assert len(skipped) == 3 and len(report["dense_layers"]) == 5
    for d in report["dense_layers"]:  # named as layers, with their type (not bare numbers)
        assert f"layer {d['layer']} ({d['type']}: {d['reason']})" in text
    # A one-epoch run ramps per step (the default ramp's staircase would never leave epoch 0): finished, N:M.
    assert report["ramp_finished"] is True and report["ramp_per_step"] is True and report["ramp"] == [0, 0.25]
    # Issue 27: the epoch line gave p at the epoch's start (1.00) for a model evaluated at its end (p = 0).
    assert "p 1.00->0.00" in captured.err


def test_an_explicit_ramp_that_does_not_fit_is_kept_and_the_warning_says_what_happens(tmp_path, capsys):
    report = _run(tmp_path, "late", "--ramp", "0", "2", "--epochs", "1", "--subset", "64", "--batch-size", "32")
    captured = capsys.readouterr()
    text, err = captured.out, captured.err
    assert "the ramp 0-2 does not finish within this 1-epoch run" in err
    assert "100% of the blocks are still dense at the end and get pruned when folding" in err
    assert "end it by epoch 0, or add --per-step to ramp every step up to epoch 1" in err
    assert "shorter --ramp" not in err  # the old advice, which did not help
    assert "maxq 2:4 on synthetic/cnn_small: 1 epoch x 2 steps, ramp 0-2, device cpu" in err  # not "1 epochs"
    # One staircase epoch leaves the ramp unfinished: folding prunes, and the headline is the folded model's.
    assert report["ramp"] == [0, 2] and report["ramp_per_step"] is False
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


# -- issue 20: a new user's first hour --------------------------------------------------------------------------


def test_the_config_records_the_values_used_not_null(tmp_path):
    import yaml

    _run(tmp_path, "cfg", "--epochs", "1", "--subset", "64", "--batch-size", "32")
    resolved = yaml.safe_load((tmp_path / "cfg" / "config.yaml").read_text())
    assert resolved["ramp"] == [0.0, 0.25] and resolved["per_step"] is True  # the short-run rule, recorded
    assert resolved["amp"] is False and resolved["threads"] == 1


@pytest.mark.parametrize("written, pattern, number", [("2:4", "2:4", 124), ("1:16", "1:16", 76)])
def test_an_unquoted_yaml_pattern_says_how_to_write_it(written, pattern, number, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: synthetic\nnm: {written}\n")  # YAML 1.1 reads it in base 60
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f'write nm: "{pattern}" (quoted): YAML reads {pattern} unquoted as the number {number}' in err
    assert not (tmp_path / "x").exists()
    recipe.write_text("dataset: synthetic\nnm: 7\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert 'nm must be a quoted pattern like nm: "2:4"' in capsys.readouterr().err


def test_argparse_errors_are_one_line_and_name_the_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "somefile", "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("maxq eval: error: unrecognized arguments: --bogus") and err.count("\n") == 1
    with pytest.raises(SystemExit) as stop:
        main(["train", "--nm", "4:2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "usage:" not in err and "n must be < m" in err


def test_train_help_shows_defaults_and_every_dataset_and_model(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fashion-mnist-32" in text and "mlp" in text
    assert "--epochs EPOCHS default 4" in text and "--batch-size BATCH_SIZE per process (default 128)" in text


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A one-epoch dense ``maxq train`` run (cnn_small, synthetic)."""
    out = tmp_path_factory.mktemp("dense") / "dense"
    flags = ["--method", "dense", "--epochs", "1", "--subset", "128", "--batch-size", "32"]
    assert main(["train", "--dataset", "synthetic", "--out", str(out), "--no-progress", "--threads", "1", *flags]) == 0
    return out


def test_a_dense_run_is_not_labelled_with_a_pattern(dense_run):
    report = json.loads((dense_run / "report.json").read_text())
    assert report["nm"] is None and report["n"] is None and report["m"] is None and report["nm_ok"] is None
    assert train_summary(report)[0].startswith("maxq train: dense cnn_small on synthetic")


def test_a_dense_run_exports_to_onnx_and_verify_says_it_is_dense(dense_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx, fp16 = tmp_path / "d.onnx", tmp_path / "d.fp16.onnx"
    assert main(["export", str(dense_run), "--onnx", str(onnx), "--fp16", str(fp16), "--json", "-"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "a dense run, no N:M layers to verify" in captured.err and "NOT N:M" not in captured.err
    assert "dense model (no N:M layers)" in captured.err and "0 N:M initializers" not in captured.err
    assert summary["dense"] is True and summary["nm_ok"] is None and onnx.exists() and fp16.exists()
    assert main(["verify", str(onnx)]) == 1  # nothing in it is N:M: said plainly, exit code 1
    assert "dense run: no N:M layers to check" in capsys.readouterr().out
    assert main(["eval", str(onnx), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(json.loads((dense_run / "report.json").read_text())["top1_folded"])


def _init_run(tmp_path, name, init, *flags):
    out = tmp_path / name
    argv = ["train", "--dataset", "synthetic", "--out", str(out), "--no-progress", "--threads", "1"]
    argv += ["--method", "oneshot", "--init", str(init), "--epochs", "1", "--subset", "64", "--batch-size", "32"]
    return main([*argv, *flags]), out


def test_init_accepts_a_run_folder_a_checkpoint_a_folded_file_and_a_state_dict(dense_run, tmp_path):
    import torch

    from maxq.train.checkpoint import read_init

    plain = tmp_path / "sd.pt"
    torch.save(read_init(dense_run / "checkpoint.pt").state_dict, plain)  # torch.save(model.state_dict())
    for name, init in [
        ("folder", dense_run),
        ("checkpoint", dense_run / "checkpoint.pt"),
        ("folded", dense_run / "model_folded.pt"),
        ("state_dict", plain),
    ]:
        code, out = _init_run(tmp_path, name, init)
        assert code == 0, name
        assert json.loads((out / "report.json").read_text())["nm_ok"] is True


def test_init_errors_are_one_line_with_exit_code_2(dense_run, tmp_path, capsys):
    cases = [
        (dense_run / "report.json", ["unknown file kind", "report.json"]),
        (tmp_path / "nowhere.pt", ["does not exist"]),
        (tmp_path, ["is a folder but not a maxq run"]),
    ]
    for init, words in cases:
        code, out = _init_run(tmp_path, "bad", init)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert all(w in err for w in words), err
        assert "could run code" not in err and not out.exists()
    code, out = _init_run(tmp_path, "other", dense_run / "checkpoint.pt", "--model", "mlp")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and len(err) < 800, err
    assert "does not fit --model mlp" in err and "missing" in err and "unexpected" in err
    assert "more)" in err and "it was trained with --model cnn_small" in err
    assert not out.exists()


def test_eval_of_a_run_stopped_mid_ramp_evaluates_it_as_trained(tmp_path, capsys):
    report = _run(tmp_path, "mid", "--ramp", "0", "3", "--epochs", "1", "--subset", "64", "--batch-size", "32")
    assert report["ramp_finished"] is False
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "mid" / "checkpoint.pt"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "unfinished ramp" in result["note"] and "--force" not in captured.err.split("maxq export")[0]
    assert result["top1"] == pytest.approx(report["top1_last"])  # the model as its last epoch evaluated it


def test_every_json_output_parses_on_stdout_alone(trained_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "m.onnx"
    capsys.readouterr()
    commands = [
        ["export", str(trained_run), "--onnx", str(onnx), "--json", "-"],
        ["verify", str(trained_run), "--json"],
        ["verify", str(trained_run / "checkpoint.pt"), "--json"],
        ["verify", str(onnx), "--json"],
        ["eval", str(trained_run / "checkpoint.pt"), "--json"],
        ["eval", str(onnx), "--json"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
        json.loads(capsys.readouterr().out)  # the result alone: logs went to stderr


def test_json_of_a_fresh_process_has_no_log_lines(trained_run):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ("verify", "eval"):
        proc = subprocess.run(
            [sys.executable, "-m", "maxq", command, str(trained_run / "checkpoint.pt"), "--json", "--threads", "1"]
            if command == "eval"
            else [sys.executable, "-m", "maxq", command, str(trained_run / "checkpoint.pt"), "--json"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout)
        if command == "eval":  # it builds the sparsified model, which logs: on stderr
            assert "stays dense" in proc.stderr


def test_verify_and_eval_name_what_they_were_given(tmp_path, capsys):
    import torch

    folder = tmp_path / "notarun"
    folder.mkdir()
    for command in ("verify", "eval"):
        assert main([command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert "is a folder but not a maxq run" in err and "checkpoint.pt does not exist" not in err
    plain = tmp_path / "sd.pt"
    torch.save({"w.weight": torch.zeros(2, 4)}, plain)
    assert main(["eval", str(plain), "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "is a plain state dict" in err and "None" not in err


def test_under_torchrun_only_the_main_process_logs(trained_run, capsys, monkeypatch):
    checkpoint = str(trained_run / "checkpoint.pt")
    assert main(["eval", checkpoint]) == 0
    assert "stays dense" in capsys.readouterr().err  # the main process (RANK 0 or no torchrun) says it
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", checkpoint]) == 0
    captured = capsys.readouterr()
    assert "stays dense" not in captured.err and "top-1" in captured.out


def test_options_a_recipe_sets_for_every_method_are_not_refused():
    from maxq.cli import _refuse_ignored_flags
    from maxq.train.recipe import TrainConfig

    cfg = TrainConfig(method="oneshot", ramp=(0, 3), per_step=True, init="x.pt")  # as configs/finetune.yaml sets
    _refuse_ignored_flags(cfg, {"method", "init", "config"})  # only flags given on the command line count
    with pytest.raises(ValueError, match="--ramp --per-step would have no effect"):
        _refuse_ignored_flags(cfg, {"method", "ramp", "per_step"})
    _refuse_ignored_flags(TrainConfig(method="maxq"), {"nm", "ramp", "tau", "queries", "update_every"})


def test_the_fine_tuning_recipe_wants_init_and_a_ramp_that_fits(tmp_path, capsys):
    # Issue 27: configs/finetune.yaml --epochs 1 ended at chance with exit 0 (the 0-3 ramp pruned 67% of the blocks
    # at the end, untrained), and without --init it trained from scratch at the fine-tuning learning rate.
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml")
    out = tmp_path / "ft"
    assert main(["train", "--config", recipe, "--out", str(out), "--method", "maxq"]) == 2
    err = capsys.readouterr().err
    assert "fine-tunes a trained model (finetune: true)" in err and "pass --init RUN/checkpoint.pt" in err
    argv = ["train", "--config", recipe, "--out", str(out), "--init", str(tmp_path / "parent.pt"), "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the ramp 0-3 of" in err and "does not finish within this 1-epoch run: 67% of the blocks" in err
    assert "e.g. --ramp 0 0.5 (the first half of the run" in err and "--per-step" not in err  # already per step
    assert not out.exists()
    # A one-shot run takes the same file (no ramp); the refusal is only for the ramp.
    argv += ["--method", "oneshot"]
    assert main(argv) == 2 and "parent.pt does not exist" in capsys.readouterr().err


def test_the_advice_for_an_explicit_per_step_ramp_does_not_suggest_per_step():
    from maxq.train.loop import ramp_left
    from maxq.train.recipe import TrainConfig

    left, fix = ramp_left(TrainConfig(epochs=2, ramp=(0, 4), per_step=True))
    assert left == 0.5 and "end it by epoch 2: e.g. --ramp 0 1" in fix and "--per-step" not in fix
    left, fix = ramp_left(TrainConfig(epochs=2, ramp=(0, 2)))
    assert left == 0.5 and "end it by epoch 1, or add --per-step" in fix


@pytest.mark.parametrize("launcher", [None, "TORCHELASTIC_RUN_ID"])
def test_a_distributed_worker_skips_the_teardown_and_keeps_its_exit_code_and_output(launcher, trained_run):
    # PyTorch's gloo teardown can abort a finished torchrun worker at interpreter exit: `python -m maxq` skips the
    # teardown in distributed workers. What it must keep: the exit code and every line of output.
    import os
    import subprocess
    import sys

    code = (
        "import atexit, runpy, sys; import torch.distributed; atexit.register(print, 'teardown ran'); "
        "sys.argv = ['maxq', *sys.argv[1:]]; runpy.run_module('maxq', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")}
    if launcher is not None:
        env[launcher] = "1"
    ok = subprocess.run([sys.executable, "-c", code, "verify", str(trained_run / "checkpoint.pt"), "--json"],
                        capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    if launcher is not None:
        bad = subprocess.run([sys.executable, "-c", code, "verify", str(trained_run / "missing.pt")],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert bad.returncode == 2 and "missing.pt does not exist" in bad.stderr, bad.stderr
    assert ok.stdout.endswith("}\n") or ok.stdout.endswith("teardown ran\n")
    json.loads(ok.stdout.removesuffix("teardown ran\n"))
    assert ("teardown ran" in ok.stdout) == (launcher is None)
