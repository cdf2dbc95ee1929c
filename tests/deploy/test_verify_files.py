"""``maxq verify`` on weight files from elsewhere: safetensors, Hugging Face folders (single file, sharded,
pytorch_model.bin), Lightning .ckpt; Conv1D weights ([in, out]) checked along dim 0; --nm / --layers / --transposed."""

import json

import pytest
import torch

import maxq
from maxq.cli import main
from maxq.train.checkpoint import read_hf_folder, save_safetensors

from ..nets import mlp
from ..train.test_checkpoint import _Payload


def _folded_mlp():
    torch.manual_seed(0)
    model = mlp()
    maxq.sparsify_(model, maxq.SRSTEConfig())
    return maxq.fold_(model)


def _verify(capsys, *argv):
    capsys.readouterr()
    code = main(["verify", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_safetensors_with_and_without_the_layout_record(tmp_path, capsys):
    model = _folded_mlp()
    state = model.state_dict()
    save_safetensors(state, tmp_path / "m.safetensors", model.maxq_layout)
    code, out, _ = _verify(capsys, tmp_path / "m.safetensors")
    assert code == 0 and "(safetensors" in out and "2/2 expected layers are 2:4" in out
    # One broken block: fails, naming the layer.
    broken = {k: v.clone() for k, v in state.items()}
    broken["2.weight"][0, :4] = 1.0
    save_safetensors(broken, tmp_path / "bad.safetensors", model.maxq_layout)
    code, out, _ = _verify(capsys, tmp_path / "bad.safetensors", "--json")
    report = json.loads(out)
    assert code == 1 and [c["name"] for c in report["layers"] if c["expected"] and not c["ok"]] == ["2"]
    # A plain file (no record): --nm is required, then the layers found N:M are the expected ones.
    save_safetensors(state, tmp_path / "plain.safetensors")
    code, _, err = _verify(capsys, tmp_path / "plain.safetensors")
    assert code == 2 and "pass --nm N:M" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _verify(capsys, tmp_path / "plain.safetensors", "--nm", "2:4", "--json")
    report = json.loads(out)
    assert code == 0 and {c["name"]: c["expected"] for c in report["layers"]} == {"0": True, "2": True, "4": False}
    # Without a record, the broken layer still counts as meant to be N:M (most blocks are) and fails.
    save_safetensors(broken, tmp_path / "bad_plain.safetensors")
    code, out, _ = _verify(capsys, tmp_path / "bad_plain.safetensors", "--nm", "2:4")
    assert code == 1 and "NOT N:M" in out
    # --layers says which must be: the dense classifier fails, a regex matching nothing is an error.
    assert _verify(capsys, tmp_path / "plain.safetensors", "--nm", "2:4", "--layers", "^(0|2)$")[0] == 0
    assert _verify(capsys, tmp_path / "plain.safetensors", "--nm", "2:4", "--layers", ".")[0] == 1
    code, _, err = _verify(capsys, tmp_path / "plain.safetensors", "--nm", "2:4", "--layers", "nope")
    assert code == 2 and "matches no" in err
    code, _, err = _verify(capsys, tmp_path / "plain.safetensors", "--nm", "2:4", "--layers", "(")
    assert code == 2 and "not a regular expression" in err
    # Dense weights only: nothing is N:M, so the file fails.
    save_safetensors(mlp().state_dict(), tmp_path / "dense.safetensors")
    assert _verify(capsys, tmp_path / "dense.safetensors", "--nm", "2:4")[0] == 1


def _gpt2_folded():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    model = transformers.GPT2LMHeadModel(config)
    maxq.sparsify_(model, maxq.SRSTEConfig())
    return maxq.fold_(model)


@pytest.mark.parametrize("shard", [False, True])
def test_hf_gpt2_folder_checks_conv1d_along_inputs(shard, tmp_path, capsys):
    model = _gpt2_folded()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if shard else {}))
    assert (folder / "model.safetensors.index.json").exists() == shard
    code, out, _ = _verify(capsys, folder, "--nm", "2:4", "--json")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "hf" and "Conv1D" in report["note"]
    expected = sorted(c["name"] for c in report["layers"] if c["expected"])
    assert expected == sorted(model.maxq_layout.layers)
    # Checked along dim 1 instead (override: no transposed layer), the Conv1D weights are not N:M.
    code, out, _ = _verify(capsys, folder, "--nm", "2:4", "--transposed", "^$", "--layers", "c_fc$")
    assert code == 1
    # The model_type rule is what makes it pass: the same weights as a plain safetensors file need --transposed.
    tensors = read_hf_folder(folder)[0]
    save_safetensors(tensors, tmp_path / "gpt2.safetensors")
    assert _verify(capsys, tmp_path / "gpt2.safetensors", "--nm", "2:4", "--layers", r"\.h\.")[0] == 1
    argv = ["--nm", "2:4", "--layers", r"\.h\.", "--transposed", "(c_attn|c_fc|c_proj)$"]
    assert _verify(capsys, tmp_path / "gpt2.safetensors", *argv)[0] == 0


def test_hf_bert_folder_with_layout_record_and_pytorch_model_bin(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=1, vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(config)
    maxq.sparsify_(model, maxq.SRSTEConfig())
    maxq.fold_(model)
    model.config.maxq_layout = model.maxq_layout.to_dict()  # the record travels in config.json
    model.save_pretrained(tmp_path / "bert")
    code, out, _ = _verify(capsys, tmp_path / "bert", "--json")  # no --nm needed: the record says
    report = json.loads(out)
    assert code == 0 and report["source"] == "the hf file's layout"
    assert sorted(c["name"] for c in report["layers"] if c["expected"]) == sorted(model.maxq_layout.layers)
    # pytorch_model.bin (read with weights_only=True), no record: --nm.
    folder = tmp_path / "bert_bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert _verify(capsys, folder, "--nm", "2:4")[0] == 0
    (folder / "pytorch_model.bin").unlink()
    code, _, err = _verify(capsys, folder, "--nm", "2:4")
    assert code == 2 and "without model.safetensors" in err


def test_lightning_checkpoint_and_malicious_ckpt(tmp_path, capsys):
    model = _folded_mlp()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "pytorch-lightning_version": "2.6.0",
        "epoch": 3,
        "optimizer_states": [],
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    code, _, err = _verify(capsys, tmp_path / "last.ckpt")
    assert code == 2 and "pass --nm" in err
    code, out, _ = _verify(capsys, tmp_path / "last.ckpt", "--nm", "2:4", "--json")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "lightning"
    assert sorted(c["name"] for c in report["layers"] if c["expected"]) == ["model.0", "model.2"]
    ckpt["maxq_layout"] = model.maxq_layout.prefixed("model").to_dict()
    torch.save(ckpt, tmp_path / "recorded.ckpt")
    code, out, _ = _verify(capsys, tmp_path / "recorded.ckpt")
    assert code == 0 and "lightning file's layout" in out
    marker = tmp_path / "pwned"
    torch.save({**ckpt, "callbacks": _Payload(marker)}, tmp_path / "bad.ckpt")
    code, _, err = _verify(capsys, tmp_path / "bad.ckpt", "--nm", "2:4")
    assert code == 2 and "refused" in err and not marker.exists()


def _text_rows(out: str) -> dict[str, list[str]]:
    """The table's rows by layer name, split into its columns (by the header's column starts)."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    starts = [i for i, ch in enumerate(lines[head + 1]) if ch == "-" and (i == 0 or lines[head + 1][i - 1] == " ")]
    rows = {}
    for line in lines[head + 2 :]:
        if line.startswith(("OK", "NOT N:M")):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[cells[0]] = cells
    return rows


def test_without_a_record_a_layer_neither_dense_nor_nm_fails(tmp_path, capsys):
    # Issue 27: 60% of one layer's blocks broken used to be listed as "dense by design" and pass (exit 0).
    state = _folded_mlp().state_dict()
    weight = state["2.weight"]  # 48 x 64: 768 blocks of 4, all 2:4
    blocks = weight.view(-1, 4)
    broken = torch.arange(blocks.shape[0]) % 5 < 3  # 3 blocks in 5 made dense
    blocks[broken] = torch.randn(int(broken.sum()), 4)
    save_safetensors(state, tmp_path / "partly.safetensors")
    code, out, _ = _verify(capsys, tmp_path / "partly.safetensors", "--nm", "2:4")
    assert code == 1 and "NOT N:M" in out, out
    row = _text_rows(out)["2"]
    assert row[2] == "2:4" and row[5] == str(int(broken.sum())) and "neither dense nor 2:4" in row[6]
    assert "--layers" in row[6] and "dense by design" not in out
    # Unstructured 50% pruning: most blocks hold 0 to 4 nonzeros at random -- neither, a failure too.
    state = _folded_mlp().state_dict()
    dense = mlp().state_dict()["2.weight"]
    state["2.weight"] = dense * (torch.rand_like(dense) < 0.5)
    save_safetensors(state, tmp_path / "unstructured.safetensors")
    assert _verify(capsys, tmp_path / "unstructured.safetensors", "--nm", "2:4")[0] == 1
    # A dense layer with zero rows (a padding embedding, a dead unit) is still found dense, and said to be found,
    # not designed: the N:M layers pass.
    state = _folded_mlp().state_dict()
    state["4.weight"][:3] = 0.0
    save_safetensors(state, tmp_path / "zero_rows.safetensors")
    code, out, _ = _verify(capsys, tmp_path / "zero_rows.safetensors", "--nm", "2:4")
    row = _text_rows(out)["4"]
    assert code == 0 and row[2] == "dense" and row[5] == "-" and row[6].startswith("found dense")
    # A record (--layers) is what makes a layer dense by design: the broken layer is then only listed.
    code, out, _ = _verify(capsys, tmp_path / "partly.safetensors", "--nm", "2:4", "--layers", "^0$")
    assert code == 0 and "dense by design" in _text_rows(out)["2"][6]


@pytest.mark.parametrize("flags", [[], ["--layers", "^(0|2)$"]], ids=["detected", "layers"])
def test_verify_json_and_table_agree_row_by_row(flags, tmp_path, capsys):
    # Issue 27: --json said "ok": false, "violations": 40 for the row the table showed as "-" / dense by design.
    state = _folded_mlp().state_dict()
    state["2.weight"][0, :4] = 1.0  # one violating block in an N:M layer
    save_safetensors(state, tmp_path / "m.safetensors")
    code, out, _ = _verify(capsys, tmp_path / "m.safetensors", "--nm", "2:4", *flags)
    json_code, json_out, _ = _verify(capsys, tmp_path / "m.safetensors", "--nm", "2:4", "--json", *flags)
    report, rows = json.loads(json_out), _text_rows(out)
    assert code == json_code == 1 and report["ok"] is False and "NOT N:M" in out
    assert [c["name"] for c in report["layers"]] == list(rows)
    for c in report["layers"]:
        violations = "-" if c["violations"] is None else str(c["violations"])
        shape = "x".join(map(str, c["shape"]))
        assert rows[c["name"]] == [c["name"], shape, c["pattern"], c["found"], str(c["groups"]), violations, c["note"]]
        assert c["ok"] == (not c["expected"] or c["violations"] == 0)
    classifier = next(c for c in report["layers"] if c["name"] == "4")
    assert classifier["expected"] is False and classifier["violations"] is None and classifier["ok"] is True
    assert classifier["pattern"] == "dense" and classifier["found"] == "dense"
    bad = next(c for c in report["layers"] if c["name"] == "2")
    assert bad["violations"] == 1 and bad["ok"] is False and bad["found"] == "4:4"


def test_rows_of_safetensors_files_and_hf_folders_come_in_name_order(tmp_path, capsys):
    # Issue 27: the reader returned a safetensors file's tensors in no fixed order, so verify's rows moved around.
    weights = {f"h.{i}.fc.weight": torch.tensor([[1.0, 0, 0, 2]] * 4) for i in (10, 2, 1, 0, 11, 3)}
    save_safetensors(weights, tmp_path / "h.safetensors")
    for _ in range(3):
        code, out, _ = _verify(capsys, tmp_path / "h.safetensors", "--nm", "2:4", "--json")
        names = [c["name"] for c in json.loads(out)["layers"]]
        assert code == 0 and names == [f"h.{i}.fc" for i in (0, 1, 2, 3, 10, 11)]


def test_lightning_checkpoint_written_during_fit_is_unfolded_on_the_fly(tmp_path, capsys):
    # Issue 27: a .ckpt a MaxQCallback fit wrote could not be verified ("fold the model with maxq.fold_").
    torch.manual_seed(0)
    model = torch.nn.Sequential(mlp(), torch.nn.ReLU(), torch.nn.Linear(10, 8), torch.nn.ReLU(), mlp((8, 12, 4)))
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 2), per_step=True))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # the LightningModule's "model" attribute
    ckpt = {"state_dict": state, "pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 3}
    sp.set_progress(1.0)  # mid-ramp: half the blocks still dense
    ckpt["callbacks"] = {"MaxQCallback{'module': 'model'}": sp.state_dict(), "ModelCheckpoint{}": {"best": None}}
    torch.save(ckpt, tmp_path / "mid.ckpt")
    code, out, _ = _verify(capsys, tmp_path / "mid.ckpt", "--json")  # the pattern comes from the callback's state
    report = json.loads(out)
    assert code == 1 and report["kind"] == "lightning" and "ramp unfinished" in report["note"]
    assert sorted(c["name"] for c in report["layers"] if c["expected"]) == sorted(f"model.{n}" for n in sp.layers)
    sp.set_progress(2.0)  # the ramp's end: every sparsified layer N:M
    ckpt["callbacks"]["MaxQCallback{'module': 'model'}"] = sp.state_dict()
    torch.save(ckpt, tmp_path / "end.ckpt")
    code, out, _ = _verify(capsys, tmp_path / "end.ckpt")
    assert code == 0 and "written during fit, not folded: checked W * Mask" in out, out
    # The effective weights checked are W * Mask: the same table as the folded model's.
    effective = maxq.check_nm(model, 2, 4)
    code, out, _ = _verify(capsys, tmp_path / "end.ckpt", "--json")
    rows = {c["name"]: c for c in json.loads(out)["layers"]}
    assert all(rows[f"model.{c.name}"]["max_nonzero"] == c.max_nonzero for c in effective.expected)
    # Weights of a sparsified model without the callback's masks: said plainly, exit 2.
    del ckpt["callbacks"]
    torch.save(ckpt, tmp_path / "nomasks.ckpt")
    code, _, err = _verify(capsys, tmp_path / "nomasks.ckpt", "--nm", "2:4")
    assert code == 2 and "without the masks" in err and len(err.strip().splitlines()) == 1
