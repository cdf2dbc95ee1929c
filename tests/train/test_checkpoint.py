"""maxq's torch files: sealed with their SHA-256 (any changed byte is rejected), read with ``weights_only=True``
(a file that would run code is refused unread, by every command), old unsealed files still load (with a warning)."""

import hashlib
import logging
import random
import shutil

import numpy as np
import pytest
import torch

from maxq.cli import main
from maxq.train.checkpoint import (
    CHECKPOINT_FORMAT,
    FOLDED_FORMAT,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    read_torch_file,
)
from maxq.train.loop import _rng_state, _set_rng_state

from ..corrupt import assert_each_flip_rejected


def _content():
    return {
        "format": FOLDED_FORMAT,
        "state_dict": {"fc.weight": torch.randn(8, 16), "fc.bias": torch.zeros(8)},
        "layout": {"method": "maxq", "n": 2, "m": 4, "layers": ["fc"]},
        "arch": {"model": "mlp", "in_channels": 1, "num_classes": 8, "image_size": 4},
        "config": {"ramp": (0.0, 1.0), "lr": 0.1, "nm": "2:4", "note": None},
    }


def test_sealed_round_trip_and_every_changed_byte_is_rejected(tmp_path):
    path = tmp_path / "f.pt"
    atomic_save(_content(), path)
    back = read_torch_file(path)
    want = _content()
    assert torch.equal(back["state_dict"]["fc.bias"], want["state_dict"]["fc.bias"])
    assert back["config"] == want["config"] and back["layout"] == want["layout"]
    assert torch.load(path, weights_only=True)["format"] == FOLDED_FORMAT  # still a plain torch file
    data = path.read_bytes()
    # Header, every 97th byte through the middle (zip records, pickle, tensor data), the end record and the seal.
    positions = sorted({*range(0, 64), *range(64, len(data) - 120, 97), *range(len(data) - 120, len(data))})
    flipped = tmp_path / "flipped.pt"
    assert_each_flip_rejected(data, positions, 0x10, flipped, read_torch_file, CheckpointError)
    for cut in (len(data) - 1, len(data) - 64, len(data) // 2, 10):
        flipped.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"corrupt|truncated|cannot be read"):
            read_torch_file(flipped)


def test_unsealed_files_of_older_maxq_load_with_a_warning(tmp_path, caplog):
    legacy = {**_content(), "rng": {"numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(legacy, tmp_path / "old.pt")  # as maxq <= 0.x wrote it: no seal, numpy's RNG tuple
    with caplog.at_level(logging.WARNING, logger="maxq"):
        back = read_torch_file(tmp_path / "old.pt")
    assert "no content hash" in caplog.text and "old.pt" in caplog.text
    assert np.array_equal(back["rng"]["numpy"][1], legacy["rng"]["numpy"][1])
    caplog.clear()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # a user's state dict: not ours, no warning
    with caplog.at_level(logging.WARNING, logger="maxq"):
        assert torch.equal(read_torch_file(tmp_path / "plain.pt")["w"], torch.ones(2))
    assert caplog.text == ""


def test_rng_state_is_plain_data_and_restores_exactly(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.randn(5)  # numpy's state with a cached gaussian
    atomic_save({"format": CHECKPOINT_FORMAT, "rng": _rng_state()}, tmp_path / "c.pt")
    want = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])  # weights_only load
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == want


class _Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker, sealed):
    obj = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(2)}, "x": _Payload(marker)}
    if sealed:
        atomic_save(obj, path)  # a valid seal does not make a file safe: weights_only does
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("sealed", [False, True])
def test_code_in_a_file_never_runs(sealed, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    _malicious(bad, marker, sealed)
    with pytest.raises(CheckpointError, match=r"refused.*could run code"):
        read_torch_file(bad)
    assert not marker.exists()


def test_every_command_refuses_a_malicious_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    _malicious(bad, marker, sealed=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(bad, run / "checkpoint.pt")
    commands = [
        ["verify", str(bad)],
        ["export", str(bad), "--onnx", str(tmp_path / "x.onnx")],
        ["eval", str(bad), "--dataset", "synthetic"],
        ["train", "--out", str(run), "--resume", "--dataset", "synthetic", "--no-progress"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused" in err, err
        assert ("bad.pt" in err) or ("checkpoint.pt" in err), err
        assert not marker.exists(), argv
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("content", [b"", b"garbage, not a model\n" * 3, b"PK\x03\x04" + b"\x00" * 40])
def test_garbage_gives_one_clear_line(content, tmp_path, capsys):
    path = tmp_path / "empty.pt"
    path.write_bytes(content)
    assert main(["verify", str(path)]) == 2  # an exception escaping main() would fail this test
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "empty.pt" in err, err


def test_resume_from_a_corrupt_checkpoint_leaves_the_run_untouched(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the tensor payload: torch.load alone would not notice
    (run / "checkpoint.pt").write_bytes(data)
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in run.iterdir()}
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    assert "SHA-256 does not match" in capsys.readouterr().err
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in run.iterdir()}
    assert after == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(umask, mode, tmp_path):
    import os

    from maxq.deploy.compress import save_compressed

    previous = os.umask(umask)
    try:
        atomic_save(_content(), tmp_path / "checkpoint.pt")
        layer = torch.zeros(4, 8)
        layer[:, ::2] = 1.0
        save_compressed({"fc.weight": layer}, tmp_path / "m.maxq", 2, 4, ["fc"])
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "m.maxq"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_read_init_forms_and_one_line_mismatch_errors(tmp_path):
    from maxq.train.checkpoint import folded_file, load_init_, read_init
    from maxq.train.models import build_model

    model = build_model("cnn_small", 1, 10, 28)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    atomic_save(folded_file(model.state_dict(), None, {"model": "cnn_small"}, None), tmp_path / "f.pt")
    for name, kind in (("sd.pt", "state_dict"), ("f.pt", "folded")):
        init = read_init(tmp_path / name)
        assert init.kind == kind and init.state_dict.keys() == model.state_dict().keys()
        load_init_(build_model("cnn_small", 1, 10, 28), init, "cnn_small")
    (tmp_path / "r.json").write_text('{"top1": 90}')
    with pytest.raises(CheckpointError, match="unknown file kind"):
        read_init(tmp_path / "r.json")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="unknown file kind"):
        read_init(tmp_path / "list.pt")
    with pytest.raises(CheckpointError) as caught:
        load_init_(build_model("cnn", 1, 10, 28), read_init(tmp_path / "f.pt"), "cnn")
    message = str(caught.value)
    assert "\n" not in message and "does not fit --model cnn" in message
    assert "it was trained with --model cnn_small" in message
    other = build_model("cnn_small", 1, 10, 28)
    wide = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if k == "25.weight" else v for k, v in
            other.state_dict().items()}  # fmt: skip
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"1 of other shape \(file vs model\): 25.weight 10x65 vs 10x64"):
        load_init_(other, read_init(tmp_path / "wide.pt"), "cnn_small")
