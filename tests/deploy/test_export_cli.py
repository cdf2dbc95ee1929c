"""``maxq export`` and ``maxq verify``: fold -> export -> verify round trips and tampered inputs."""

import json

import pytest
import torch

import maxq
from maxq.cli import main
from maxq.train.checkpoint import FOLDED_FORMAT, atomic_save
from maxq.train.models import build_model

pytest.importorskip("onnxruntime")

ARCHS = {
    "resnet18": {"model": "resnet18", "in_channels": 3, "num_classes": 10, "image_size": 32},
    "mlp": {"model": "mlp", "in_channels": 1, "num_classes": 10, "image_size": 16},
}


def _folded_file(tmp_path, arch_name, n, m):
    arch = ARCHS[arch_name]
    model = build_model(arch["model"], arch["in_channels"], arch["num_classes"], arch["image_size"])
    sp = maxq.sparsify_(model, maxq.MaxQConfig(n=n, m=m, ramp=(0, 0)))
    x = torch.randn(4, arch["in_channels"], arch["image_size"], arch["image_size"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    sp.regularize_()
    opt.step()
    model(x)  # masks of the stepped weights, and BN statistics
    maxq.fold_(model)
    path = tmp_path / "model_folded.pt"
    atomic_save(
        {
            "format": FOLDED_FORMAT,
            "state_dict": model.state_dict(),
            "layout": model.maxq_layout.to_dict(),
            "arch": arch,
            "config": None,
        },
        path,
    )
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("nm", ["2:4", "1:16"])
def test_export_then_verify_every_artifact(arch, nm, tmp_path, capsys):
    n, m = maxq.parse_nm(nm)
    src = _folded_file(tmp_path, arch, n, m)
    outs = {k: tmp_path / f"out.{k}" for k in ("onnx", "maxq", "pt")}
    summary = tmp_path / "export.json"
    code = main(["export", str(src), "--bn-fold", "--onnx", str(outs["onnx"]), "--compressed", str(outs["maxq"]),
                 "--folded", str(outs["pt"]), "--json", str(summary)])  # fmt: skip
    assert code == 0, capsys.readouterr()
    result = json.loads(summary.read_text())
    assert result["nm_ok"] and result["compressed"]["bit_exact"]
    assert max(result["onnx"]["max_abs_diff"].values()) < 1e-4
    assert result["compressed"]["sparse_over_bound"] < 0.02
    assert result["compressed"]["file_bytes"] < result["dense_file_bytes"]
    for path in (src, *outs.values()):
        assert main(["verify", str(path)]) == 0, path
    capsys.readouterr()
    assert main(["verify", str(outs["maxq"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["kind"] == "compressed" and report["n"] == n and report["m"] == m
    # The compressed file rebuilds the (BN-folded) model for a second export.
    assert main(["export", str(outs["maxq"]), "--compressed", str(tmp_path / "again.maxq")]) == 0


def test_verify_reports_violations_and_bad_files(tmp_path, capsys):
    src = _folded_file(tmp_path, "mlp", 2, 4)
    state = torch.load(src, weights_only=True)
    layer = state["layout"]["layers"][0]
    state["state_dict"][f"{layer}.weight"][0, :4] = 1.0  # a violating group
    torch.save(state, tmp_path / "bad.pt")
    assert main(["verify", str(tmp_path / "bad.pt")]) == 1
    assert "NOT N:M" in capsys.readouterr().out
    (tmp_path / "cut.pt").write_bytes(src.read_bytes()[:200])
    assert main(["verify", str(tmp_path / "cut.pt")]) == 2
    assert "truncated" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(src, weights_only=True)["state_dict"], plain)
    assert main(["verify", str(plain)]) == 2
    assert "--nm" in capsys.readouterr().err
    assert main(["verify", str(plain), "--nm", "2:4"]) == 0


def test_export_refuses_unfinished_ramp_and_dense_runs(tmp_path, capsys):
    from maxq.train.loop import train
    from maxq.train.recipe import TrainConfig

    train(
        TrainConfig(
            dataset="synthetic", epochs=1, batch_size=64, out=str(tmp_path / "d"), method="dense", progress=False
        )
    )
    assert main(["export", str(tmp_path / "d"), "--compressed", str(tmp_path / "x.maxq")]) == 2
    err = capsys.readouterr().err
    assert "is a dense run" in err and "drop --compressed" in err and not (tmp_path / "x.maxq").exists()
    for dense in (tmp_path / "d", tmp_path / "d" / "checkpoint.pt"):
        assert main(["verify", str(dense)]) == 1  # not an N:M model, said plainly
        assert "dense run: no N:M layers to check" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "d")]) == 2
    assert "nothing to write" in capsys.readouterr().err
    cfg = TrainConfig(
        dataset="synthetic", epochs=2, batch_size=64, out=str(tmp_path / "s"), ramp=(0, 4), progress=False
    )
    train(cfg)
    ckpt = tmp_path / "s" / "checkpoint.pt"
    assert main(["export", str(ckpt), "--compressed", str(tmp_path / "y.maxq")]) == 2
    assert "mid-ramp" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--force", "--compressed", str(tmp_path / "y.maxq")]) == 0
    assert main(["verify", str(ckpt)]) == 1  # the unfolded checkpoint itself still has dense blocks


def test_export_never_overwrites_unless_asked(tmp_path, capsys):
    src = _folded_file(tmp_path, "mlp", 2, 4)
    taken = tmp_path / "taken.maxq"
    taken.write_bytes(b"precious")
    fresh = tmp_path / "fresh.onnx"
    assert main(["export", str(src), "--onnx", str(fresh), "--compressed", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "taken.maxq already exists" in err and "--overwrite" in err
    assert taken.read_bytes() == b"precious" and not fresh.exists()  # checked before anything was written
    assert main(["export", str(src), "--onnx", str(fresh), "--fp16", str(fresh)]) == 2
    assert "two outputs" in capsys.readouterr().err
    (tmp_path / "s.json").write_text("{}")
    assert main(["export", str(src), "--onnx", str(fresh), "--json", str(tmp_path / "s.json")]) == 2
    assert not fresh.exists()
    assert main(["export", str(src), "--onnx", str(fresh), "--compressed", str(taken), "--overwrite"]) == 0
    assert main(["verify", str(taken)]) == 0 and main(["verify", str(fresh)]) == 0


def test_verify_tables_show_dense_by_design_layers_and_onnx_layer_names(trained_run, exported, capsys):
    from maxq.train.checkpoint import load_folded

    _, folded = load_folded(trained_run / "model_folded.pt")
    sparse = folded["layout"]["layers"]
    for path in (trained_run, exported["onnx"], exported["int8"]):
        assert main(["verify", str(path)]) == 0
        text = capsys.readouterr().out
        rows = {line.split()[0]: line for line in text.splitlines()[2:] if line and not line.startswith("OK")}
        assert set(sparse) <= set(rows), text  # the model's layer names, also in ONNX files
        assert not any(name.startswith("onnx::") for name in rows), text
        classifier = rows["25"]  # cnn_small's Linear classifier: dense by design, not "4:4 ... 160 violations"
        assert "dense by design" in classifier and "4:4" not in classifier and classifier.split()[5] == "-"


def test_onnx_files_without_layer_names_still_verify(exported, tmp_path, capsys):
    import onnx

    from maxq.deploy.onnx_export import ONNX_LAYERS_KEY

    proto = onnx.load(str(exported["onnx"]))
    kept = [p for p in proto.metadata_props if p.key != ONNX_LAYERS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    assert main(["verify", str(old)]) == 0  # a file of an older maxq: initializer names, still checked
    assert "onnx::" in capsys.readouterr().out


def test_export_json_alone_prints_to_stdout_as_verify_and_eval_do(tmp_path, capsys):
    # Issue 27: export took --json PATH (or '-') where verify and eval take a bare --json.
    src = _folded_file(tmp_path, "mlp", 2, 4)
    capsys.readouterr()
    assert main(["export", str(src), "--compressed", str(tmp_path / "m.maxq"), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout holds the JSON alone; the human lines went to stderr
    assert summary["compressed"]["file_bytes"] > 0 and "compressed:" in captured.err
    assert main(["export", str(src), "--folded", str(tmp_path / "f.pt"), "--json", str(tmp_path / "s.json")]) == 0
    assert "folded" in json.loads((tmp_path / "s.json").read_text())
