"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by test_fsdp_callbacks.py: the Lightning and Hugging Face
callbacks on a model sharded with FSDP2 (``fully_shard`` per layer + root), their hooks driven by hand in the
order the frameworks call them (their FSDP strategies need CUDA), beside an unsharded DDP copy driven the same way
on the same global batches.

``python fsdp_callbacks_worker.py MODE[,MODE...] OUT_DIR``; every rank writes ``OUT_DIR/MODE_rank<r>.pt``:

* ``lightning``: ``MaxQCallback`` of ``maxq.integrations.lightning`` on a ``LightningModule`` (no Trainer: a small
  stand-in carries the counters). Sparsified in ``setup`` before ``fully_shard`` (Lightning calls the callbacks'
  ``setup`` before ``configure_model``). A checkpoint after two steps is written as ``ModelParallelStrategy``
  writes one (model and optimizer through DCP; the rest, callbacks' state included, ``torch.save``d by rank 0
  alone) and resumed into a new module and callback.
* ``hf``: ``MaxQCallback`` of ``maxq.integrations.hf`` on a tiny BERT with ``TrainingArguments``, ``TrainerState``
  and ``TrainerControl``; ``on_save`` writes its file into the checkpoint folder after two steps; a new model and
  callback resume from it (``on_train_begin`` at step 2).

Both: per step, whether the masks equal the DDP copy's and the largest parameter difference; the report and ramp
metrics; after ``on_train_end`` (fold) the full state dict of ``get_model_state_dict(full_state_dict=True)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.distributed as dist
from torch import nn

import maxq

sys.path.insert(0, str(Path(__file__).parent))  # hf_setup

STEPS = 4  # optimizer steps; the checkpoint is taken after SAVE_AT of them
SAVE_AT = 2
SPE = 2  # steps per epoch: the ramp (0, 1) ends after 2 steps, so the run folds N:M


def config() -> maxq.MaxQConfig:
    return maxq.MaxQConfig(n=2, m=4, ramp=(0.0, 1.0), per_step=True)


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def compare(sp, ref_sp, model, ref) -> dict:
    masks, ref_masks = dict(sp.named_masks()), dict(ref_sp.named_masks())
    params = full_state(model)
    ref_params = ref.state_dict()
    return {
        "masks_equal": set(masks) == set(ref_masks) and all(torch.equal(whole(masks[k]), ref_masks[k]) for k in masks),
        "param_diff": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
        "masks": {k: whole(v).clone() for k, v in masks.items()},
        "step": sp.steps,
        "progress": sp.progress,
    }


def report_rows(report) -> list[tuple]:
    return [(r.name, r.shape, r.nm, r.dense_block_fraction, r.mean_soft_scale) for r in report.sparsified]


# -- Lightning -----------------------------------------------------------------------------------------------------


def lightning_module():
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))  # fmt: skip

        def forward(self, x):
            return self.net(x)

    return Net()


def lightning_batches(world: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        per = 8 // world
        out.append((x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return out


def fake_trainer(optimizer, rank: int, global_step: int = 0) -> SimpleNamespace:
    """What MaxQCallback reads of a ``lightning.pytorch.Trainer``."""
    return SimpleNamespace(
        global_rank=rank,
        global_step=global_step,
        optimizers=[optimizer],
        num_training_batches=SPE,
        accumulate_grad_batches=1,
        max_steps=-1,
        max_epochs=STEPS // SPE,
        estimated_stepping_batches=STEPS,
        strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None)),
    )


class LightningRun:
    """One fit: module, callback, optimizer and trainer stand-in; sharded or the DDP reference."""

    def __init__(self, rank: int, sharded: bool) -> None:
        from maxq.integrations.lightning import MaxQCallback

        self.module = lightning_module()
        self.callback = MaxQCallback(config(), log_metrics=False)
        probe = SimpleNamespace(global_rank=rank)
        self.callback.setup(probe, self.module, "fit")  # before configure_model: sparsify, then shard
        if sharded:
            shard(self.module)
            self.forward = self.module
        else:
            self.forward = nn.parallel.DistributedDataParallel(self.module)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1, momentum=0.9)
        self.trainer = fake_trainer(self.optimizer, rank)

    def start(self, global_step: int = 0) -> None:
        self.trainer.global_step = global_step
        self.callback.on_fit_start(self.trainer, self.module)
        self.callback.on_train_start(self.trainer, self.module)

    def step(self, batch, index: int) -> None:
        cb, trainer = self.callback, self.trainer
        cb.on_train_batch_start(trainer, self.module, batch, index)
        x, y = batch
        loss = nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()
        cb.on_before_optimizer_step(trainer, self.module, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, self.module, loss, batch, index)

    def save(self, folder: Path, rank: int) -> None:
        """As ``ModelParallelStrategy.save_checkpoint`` (distributed): model and optimizer through DCP, the rest of
        the checkpoint (callbacks' state included) ``torch.save``d by rank 0 alone."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        checkpoint: dict = {"global_step": self.trainer.global_step}
        self.callback.on_save_checkpoint(self.trainer, self.module, checkpoint)
        checkpoint["callbacks"] = {self.callback.state_key: self.callback.state_dict()}  # on every rank, as Lightning
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"state_dict": model_state, "optimizer_0": optim_state}, checkpoint_id=str(folder))
        if rank == 0:
            torch.save(checkpoint, folder / "meta.pt")
        dist.barrier()

    def load(self, folder: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"state_dict": model_state, "optimizer_0": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["state_dict"],
                       optim_state_dict=state["optimizer_0"])  # fmt: skip
        checkpoint = torch.load(folder / "meta.pt", weights_only=True)
        self.callback.on_load_checkpoint(self.trainer, self.module, checkpoint)
        self.callback.load_state_dict(checkpoint["callbacks"][self.callback.state_key])
        return checkpoint


def lightning(rank: int, world: int, out: Path) -> dict:
    from maxq.integrations._lifecycle import ramp_metrics

    data = lightning_batches(world, rank)
    run, ref = LightningRun(rank, sharded=True), LightningRun(rank, sharded=False)
    folder = out / "lightning_ckpt"
    run.start(), ref.start()
    steps, result = [], {}
    for index, batch in enumerate(data):
        run.step(batch, index)
        ref.step(batch, index)
        steps.append(compare(run.callback.sparsifier, ref.callback.sparsifier, run.module, ref.module))
        if index + 1 == SAVE_AT:
            run.save(folder, rank)
            result["metrics"] = (ramp_metrics(run.callback.sparsifier), ramp_metrics(ref.callback.sparsifier))
    result["steps"] = steps
    # a new module and callback resume from the checkpoint and take the last steps
    resumed = LightningRun(rank, sharded=True)
    checkpoint = resumed.load(folder)
    result["layout"] = checkpoint.get("maxq_layout")
    result["at_load"] = {k: whole(v).clone() for k, v in resumed.callback.sparsifier.named_masks()}
    resumed.start(SAVE_AT)
    for index in range(SAVE_AT, STEPS):
        resumed.step(data[index], index)
    result["resumed"] = compare(resumed.callback.sparsifier, ref.callback.sparsifier, resumed.module, ref.module)
    for r in (run, ref, resumed):
        r.callback.on_train_end(r.trainer, r.module)
    result["report"] = (report_rows(run.callback.report), report_rows(ref.callback.report))
    result["check_ok"] = run.callback.result.ok
    result["folded"] = full_state(run.module)
    result["ref_folded"] = {k: v.detach().clone() for k, v in ref.module.state_dict().items()}
    result["resumed_folded"] = full_state(resumed.module)
    return result


# -- Hugging Face ----------------------------------------------------------------------------------------------------


def hf_batches(world: int, rank: int) -> list[dict[str, torch.Tensor]]:
    from hf_setup import WordsDataset

    data = WordsDataset(8 * STEPS)
    per = 8 // world
    out = []
    for step in range(STEPS):
        rows = [data[i] for i in range(step * 8 + rank * per, step * 8 + (rank + 1) * per)]
        out.append({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return out


def bert() -> nn.Module:
    """hf_setup's tiny BERT without dropout (the sharded and the reference run draw different random numbers)."""
    from hf_setup import tiny_bert

    model = tiny_bert()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class HFRun:
    """One ``train()``: model, callback, optimizer, arguments, state and control; sharded or the DDP reference."""

    def __init__(self, out: Path, sharded: bool, global_step: int = 0) -> None:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        from maxq.integrations.hf import MaxQCallback

        self.args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, max_steps=STEPS,
                                      gradient_accumulation_steps=1, disable_tqdm=True)  # fmt: skip
        self.state = TrainerState(global_step=global_step, max_steps=STEPS)
        self.control = TrainerControl()
        self.model = bert()
        self.callback = MaxQCallback(config())
        self.callback.on_init_end(self.args, self.state, self.control, model=self.model)  # Trainer(...): sparsify
        if sharded:  # accelerate's prepare, in train(): after the callback sparsified
            shard(self.model)
            self.forward = self.model
        else:
            self.forward = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def begin(self, loader: list) -> None:
        self.callback.on_train_begin(self.args, self.state, self.control, model=self.model, optimizer=self.optimizer,
                                     train_dataloader=loader[:SPE])  # fmt: skip

    def step(self, batch: dict) -> None:
        cb, args, state, control = self.callback, self.args, self.state, self.control
        cb.on_step_begin(args, state, control)
        self.forward(**batch).loss.backward()
        cb.on_pre_optimizer_step(args, state, control, optimizer=self.optimizer)
        self.optimizer.step()
        cb.on_optimizer_step(args, state, control, optimizer=self.optimizer)
        self.optimizer.zero_grad()
        state.global_step += 1
        cb.on_step_end(args, state, control)

    def save(self, rank: int) -> Path:
        """``Trainer._save_checkpoint``: the folder (weights and optimizer through DCP here), then ``on_save``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
        self.callback.on_save(self.args, self.state, self.control)
        dist.barrier()
        return folder

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def end(self) -> None:
        self.callback.on_train_end(self.args, self.state, self.control, model=self.model)


def conv1d_refusal(out: Path) -> str:
    """A GPT-2 (HF ``Conv1D``, weights ``[in, out]``) sharded as accelerate's FSDP2 does (dim 0, its inputs): the
    callback refuses at ``on_train_begin``, before a step. Returns the message."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState, TrainingArguments

    from maxq.integrations.hf import MaxQCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=64))
    args = TrainingArguments(output_dir=str(out / "gpt2"), report_to="none", use_cpu=True, max_steps=STEPS)
    state, control = TrainerState(max_steps=STEPS), TrainerControl()
    callback = MaxQCallback(config())
    callback.on_init_end(args, state, control, model=model)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    try:
        callback.on_train_begin(args, state, control, model=model, train_dataloader=[0, 1])
    except ValueError as exc:
        return str(exc)
    return ""


def hf(rank: int, world: int, out: Path) -> dict:
    from maxq.integrations.hf import STATE_FILE

    data = hf_batches(world, rank)
    run, ref = HFRun(out / "hf", sharded=True), HFRun(out / "hf_ref", sharded=False)
    run.begin(data), ref.begin(data)
    steps, result = [], {}
    for index, batch in enumerate(data):
        run.step(batch)
        ref.step(batch)
        steps.append(compare(run.callback.sparsifier, ref.callback.sparsifier, run.model, ref.model))
        if index + 1 == SAVE_AT:
            folder = run.save(rank)
            result["state_file"] = (folder / STATE_FILE).is_file()
    result["steps"] = steps
    resumed = HFRun(out / "hf", sharded=True, global_step=SAVE_AT)
    resumed.load(folder)
    resumed.begin(data)  # on_train_begin at step 2 restores the callback's file
    result["at_load"] = {k: whole(v).clone() for k, v in resumed.callback.sparsifier.named_masks()}
    for index in range(SAVE_AT, STEPS):
        resumed.step(data[index])
    result["resumed"] = compare(resumed.callback.sparsifier, ref.callback.sparsifier, resumed.model, ref.model)
    for r in (run, ref, resumed):
        r.end()
    result["report"] = (report_rows(run.callback.report), report_rows(ref.callback.report))
    result["check_ok"] = run.callback.result.ok
    result["folded"] = full_state(run.model)
    result["conv1d_refused"] = conv1d_refusal(out)
    result["ref_folded"] = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    result["resumed_folded"] = full_state(resumed.model)
    return result


def main() -> None:
    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in modes:
        result = {"lightning": lightning, "hf": hf}[mode](rank, world, out)
        torch.save(result, out / f"{mode}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
