"""Stage ``fsdp`` of ``scripts/gpu_check.sh``: maxq's framework callbacks under the frameworks' own FSDP2.

    python scripts/gpu_fsdp_check.py OUT.json [--device cuda|cpu] [--dry-run]

Each part runs in a fresh ``torchrun --standalone --nproc-per-node 1`` process (one GPU), so a failing part
leaves the others' results; ``OUT.json`` holds ``{"parts": {name: {...}}, "ok": bool}``, rewritten after each part.

* ``lightning``: ``Trainer(strategy=ModelParallelStrategy())`` (FSDP2: ``fully_shard`` in ``configure_model``)
  with ``maxq.integrations.lightning.MaxQCallback``, two epochs with a checkpoint after each; the fold leaves a full
  state dict exactly N:M; a second fit resumed from the first epoch's checkpoint ends on the same weights. Runs on
  the CPU too (gloo), so the dry run rehearses all of it.
* ``hf``: ``Trainer`` with ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`` (accelerate's FSDP2)
  and ``maxq.integrations.hf.MaxQCallback``, four steps with a checkpoint after two, then ``save_model``; a second
  ``train(resume_from_checkpoint=...)`` ends on the same weights. Two models: a tiny Llama (``nn.Linear``; accelerate
  shards it) and a tiny GPT-2 (HF ``Conv1D``, whose weights must be sharded on their outputs, ``Shard(1)``, which
  accelerate cannot choose: sharded here with ``fully_shard(..., shard_placement_fn=...)`` before the Trainer,
  which accelerate keeps). Needs CUDA (on the CPU the Trainer silently falls back to DDP): the dry run marks these
  runs "skipped: needs CUDA" and rehearses the rest: the models build, the arguments parse, and the GPT-2 sharded
  the same way trains a few steps with the callback's hooks driven by hand (gloo), folds and checks N:M.

Models are built from configs (no downloads). Logs go to stderr; the JSON is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("lightning", "hf")
NEEDS_CUDA = "skipped: needs CUDA"
BATCHES = 4  # per epoch (Lightning) / optimizer steps (HF); batch 8


# -- shared ----------------------------------------------------------------------------------------------------------


def _config():
    import maxq

    return maxq.MaxQConfig(n=2, m=4, ramp=(0.0, 1.0))


def _full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}


def _compare(a: dict, b: dict) -> dict[str, Any]:
    """Same keys, same zero pattern (the masks), the largest weight difference."""
    keys = sorted(set(a) & set(b))
    return {
        "same_keys": set(a) == set(b),
        "same_zeros": all(torch_equal(a[k] == 0, b[k] == 0) for k in keys),
        "max_abs_diff": max((float((a[k].float() - b[k].float()).abs().max()) for k in keys), default=None),
    }


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _check(state: dict, layout) -> dict[str, Any]:
    import maxq

    result = maxq.check_nm(state, layout.n, layout.m, layers=layout.layers, transposed=layout.transposed)
    return {"ok": result.ok, "layers": len(result.expected), "table": str(result)}


# -- Lightning: ModelParallelStrategy ----------------------------------------------------------------------------------


def lightning(out: Path, device: str, dry_run: bool) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from maxq.core.fold import nm_layout
    from maxq.integrations.lightning import MaxQCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                     nn.Linear(128, 10))  # fmt: skip

        def configure_model(self) -> None:  # FSDP2, as ModelParallelStrategy expects
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in self.net:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):  # through forward: the root FSDP unit gathers its parameters
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8 * BATCHES, 64, generator=g),
                                          torch.randint(0, 10, (8 * BATCHES,), generator=g))  # fmt: skip
    folder = out / "lightning_checkpoints"

    def fit(ckpt_path: str | None = None) -> tuple[Any, Any]:
        callback = MaxQCallback(_config())
        saver = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = pl.Trainer(accelerator=device, devices=1, strategy=ModelParallelStrategy(), max_epochs=2,
                             callbacks=[callback, saver], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(out))  # fmt: skip
        module = Net()
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return callback, module

    start = time.perf_counter()
    callback, module = fit()
    full = _full_state(module)
    layout = nm_layout(module)
    first = folder / "epoch=0.ckpt"
    meta = torch.load(first / "meta.pt", weights_only=True) if first.is_dir() else torch.load(first, weights_only=True)
    saved = next(iter(meta["callbacks"].values()), {}) if isinstance(meta.get("callbacks"), dict) else {}
    planes = [entry["planes"] for entry in saved.get("layers", {}).values()]
    resumed_callback, resumed = fit(str(first))
    again = _full_state(resumed)
    return {
        "status": "passed",
        "device": device,
        "strategy": "ModelParallelStrategy (FSDP2)",
        "weights_sharded": type(module.net[0].weight).__name__,
        "layers": list(layout.layers),
        "callback_check_ok": bool(callback.result and callback.result.ok),
        "full_state_dict_nm": _check(full, layout),
        "unfolded_keys": sorted(k for k in full if ".parametrizations." in k),
        "checkpoint": str(first.name),
        "checkpoint_layout": meta.get("maxq_layout"),
        "checkpoint_state_whole": bool(planes) and all(type(p) is torch.Tensor for p in planes),
        "resumed_check_ok": bool(resumed_callback.result and resumed_callback.result.ok),
        "resumed_vs_uninterrupted": _compare(full, again),
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- Hugging Face Trainer + accelerate FSDP2 ------------------------------------------------------------------------


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                        max_position_embeddings=32))  # fmt: skip


def tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # fmt: skip


def shard_gpt2(model, device: str) -> None:
    """``fully_shard`` per block and the model, HF ``Conv1D`` weights (``[in, out]``) on their outputs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from maxq.core.layers import is_hf_conv1d

    conv1d = {id(m.weight) for m in model.modules() if is_hf_conv1d(m)}
    mesh = init_device_mesh(device, (dist.get_world_size(),))

    def placement(param):
        return Shard(1) if id(param) in conv1d else None

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)


class TokenData:
    """Sequences of 16 token ids (a learnable repetition), the labels the inputs."""

    def __init__(self, n: int = 8 * BATCHES) -> None:
        import torch

        g = torch.Generator().manual_seed(1)
        half = torch.randint(0, 128, (n, 8), generator=g)
        self.ids = torch.cat([half, half], 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: Path, layer_cls: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), fsdp=True,
        fsdp_config={"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": [layer_cls],
                     "state_dict_type": "FULL_STATE_DICT"},
        max_steps=BATCHES, save_strategy="steps", save_steps=BATCHES // 2, per_device_train_batch_size=8,
        learning_rate=1e-3, report_to="none", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip


def hf_trainer_run(out: Path, name: str, device: str) -> dict[str, Any]:
    """One model through the Trainer with accelerate's FSDP2: train (checkpoint at step 2), save_model, resume."""
    import torch
    from safetensors.torch import load_file
    from transformers import Trainer

    from maxq.core.fold import nm_layout
    from maxq.integrations.hf import STATE_FILE, MaxQCallback

    build, layer_cls = (tiny_llama, "LlamaDecoderLayer") if name == "llama" else (tiny_gpt2, "GPT2Block")

    def train(resume: str | None = None) -> tuple[Any, Any, Any]:
        model = build().to(device)
        if name == "gpt2":
            shard_gpt2(model, device)  # accelerate keeps a model fully_shard already wrapped
        callback = MaxQCallback(_config(), steps_per_epoch=BATCHES // 2)
        trainer = Trainer(model=model, args=training_args(out / name, layer_cls), train_dataset=TokenData(),
                          callbacks=[callback])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback, model

    start = time.perf_counter()
    trainer, callback, model = train()
    layout = nm_layout(model)
    full = _full_state(model)
    saved_dir = out / name / "final"
    trainer.save_model(str(saved_dir))
    files = sorted(p.name for p in saved_dir.iterdir()) if saved_dir.is_dir() else []
    saved = load_file(str(saved_dir / "model.safetensors")) if (saved_dir / "model.safetensors").is_file() else None
    checkpoint = out / name / f"checkpoint-{BATCHES // 2}"
    state_file = checkpoint / STATE_FILE
    whole = False
    if state_file.is_file():
        layers = torch.load(state_file, weights_only=True)["sparsifier"]["layers"]
        whole = all(type(e["planes"]) is torch.Tensor for e in layers.values())
    _, resumed_callback, resumed = train(str(checkpoint))
    again = _full_state(resumed)
    return {
        "status": "passed",
        "weights_sharded": type(next(model.parameters())).__name__,
        "layers": len(layout.layers),
        "callback_check_ok": bool(callback.result and callback.result.ok),
        "full_state_dict_nm": _check(full, layout),
        "unfolded_keys": sorted(k for k in full if ".parametrizations." in k),
        "saved_files": files,
        "saved_model_nm": _check(saved, layout) if saved is not None else None,
        "state_file_whole": whole,
        "resumed_check_ok": bool(resumed_callback.result and resumed_callback.result.ok),
        "resumed_vs_uninterrupted": _compare(full, again),
        "seconds": round(time.perf_counter() - start, 1),
    }


def hf_rehearsal(out: Path, device: str) -> dict[str, Any]:
    """What the CPU can run of the HF part: the models and arguments, and the sharded GPT-2 with the callback's
    hooks driven by hand (the Trainer's order) for a few steps, folded and checked."""
    import torch
    from transformers import TrainerControl, TrainerState

    from maxq.core.fold import nm_layout
    from maxq.integrations.hf import MaxQCallback

    args = training_args(out / "gpt2", "GPT2Block")
    llama = tiny_llama()
    model = tiny_gpt2()
    shard_gpt2(model, device)
    state, control = TrainerState(max_steps=BATCHES), TrainerControl()
    callback = MaxQCallback(_config(), steps_per_epoch=BATCHES // 2)
    callback.on_init_end(args, state, control, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    data = TokenData()
    for step in range(BATCHES):
        callback.on_step_begin(args, state, control)
        batch = data.ids[step * 8 : (step + 1) * 8]
        model(input_ids=batch, labels=batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control, model=model)
    layout = nm_layout(model)
    return {
        "arguments": {"fsdp": args.fsdp, "fsdp_config": {k: v for k, v in args.fsdp_config.items() if k != "xla"}},
        "llama_parameters": sum(p.numel() for p in llama.parameters()),
        "gpt2_hooks_by_hand": {
            "weights_sharded": type(next(model.parameters())).__name__,
            "callback_check_ok": bool(callback.result and callback.result.ok),
            "full_state_dict_nm": _check(_full_state(model), layout),
        },
    }


def hf(out: Path, device: str, dry_run: bool) -> dict[str, Any]:
    if device != "cuda":
        return {
            "status": "passed",
            "llama": {"status": NEEDS_CUDA},
            "gpt2": {"status": NEEDS_CUDA},
            "rehearsal": hf_rehearsal(out, device),
        }
    result: dict[str, Any] = {"status": "passed"}
    for name in ("llama", "gpt2"):
        try:
            result[name] = hf_trainer_run(out, name, device)
        except Exception:
            result[name] = {"status": "failed", "error": traceback.format_exc()[-3000:]}
            result["status"] = "failed"
    return result


# -- verdicts and the driver -----------------------------------------------------------------------------------------


def verdict(part: dict[str, Any]) -> list[str]:
    """What is wrong with a part's result (empty: it passed)."""
    problems = []
    runs = [part] if "full_state_dict_nm" in part else [v for v in part.values() if isinstance(v, dict)]
    if "rehearsal" in part:
        runs.append(part["rehearsal"]["gpt2_hooks_by_hand"])
    for run in runs:
        if str(run.get("status", "passed")).startswith("skipped"):
            continue
        if run.get("status") == "failed":
            problems.append(run.get("error", "failed").strip().splitlines()[-1])
            continue
        if "full_state_dict_nm" not in run:
            continue
        if not (run["callback_check_ok"] and run["full_state_dict_nm"]["ok"]):
            problems.append("the folded model is not exactly N:M")
        if run.get("unfolded_keys"):
            problems.append(f"unfolded keys in the full state dict: {run['unfolded_keys'][:3]}")
        if run.get("saved_model_nm") is not None and not run["saved_model_nm"]["ok"]:
            problems.append("the saved model is not exactly N:M")
        resumed = run.get("resumed_vs_uninterrupted")
        if resumed is not None and not (resumed["same_keys"] and resumed["same_zeros"] and run["resumed_check_ok"]):
            problems.append(f"the resumed run differs from the uninterrupted one: {resumed}")
        for key in ("checkpoint_state_whole", "state_file_whole"):
            if key in run and not run[key]:
                problems.append(f"{key} is false: the callback's checkpoint state is not whole")
    return problems


def run_part(name: str, result: Path, device: str, dry_run: bool) -> None:
    """Inside torchrun: one part, its JSON to ``result``."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if name == "hf" and not dist.is_initialized():
        dist.init_process_group(backend)  # the rehearsal's fully_shard; the Trainer would start it itself
    out = Path(tempfile.mkdtemp(prefix=f"maxq_fsdp_{name}_"))
    try:
        data = {"lightning": lightning, "hf": hf}[name](out, device, dry_run)
    except Exception:
        data = {"status": "failed", "error": traceback.format_exc()[-3000:]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result.write_text(json.dumps(data, indent=1, default=str) + "\n")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the stage's JSON")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: what can run there, the rest marked skipped")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # inside torchrun
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    if args.part:
        run_part(args.part, args.out, args.device, args.dry_run)
        return 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    record: dict[str, Any] = {"device": args.device, "dry_run": args.dry_run, "parts": {}}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MAXQ_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    for name in args.parts:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            part_json = Path(tmp) / f"{name}.json"
            cmd = [torchrun, "--standalone", "--nproc-per-node=1", str(Path(__file__).resolve()), str(part_json),
                   "--part", name, "--device", args.device, *(["--dry-run"] if args.dry_run else [])]  # fmt: skip
            print(f"fsdp: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=subprocess.STDOUT, check=False)
            try:
                data = json.loads(part_json.read_text())
            except (OSError, ValueError):
                data = {"status": "failed", "error": f"torchrun exited {proc.returncode} without a result"}
        data["wall_s"] = round(time.perf_counter() - start, 1)
        problems = verdict(data)
        if problems:
            data["status"] = "failed"
        data["problems"] = problems
        record["parts"][name] = data
        record["ok"] = all(p.get("status") == "passed" for p in record["parts"].values())
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp_out, args.out)
        print(f"fsdp: {name}: {data['status']} ({data['wall_s']} s) {'; '.join(problems)}", file=sys.stderr)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
