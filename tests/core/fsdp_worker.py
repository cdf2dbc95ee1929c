"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by test_fsdp.py, or alone (world size 1) for ``load1``.

``python fsdp_worker.py MODE[,MODE...] OUT_DIR``; every rank writes ``OUT_DIR/MODE_rank<r>.pt``:

* ``compare``: every method, sparsified before and after ``fully_shard``, trained beside a DDP copy of the same
  model on the same local batches: per step, whether the masks are equal and the largest parameter difference;
  per-rank mask bytes; the report; then ``fold_`` and the full state dict (checked and loaded by the test).
* ``conv1d``: a GPT-2 model (HF ``Conv1D``) sharded on its outputs (``Shard(1)``) against DDP; and the refusal of
  FSDP2's default ``Shard(0)`` (its inputs).
* ``save`` / ``resume``: DCP checkpoint after two steps, then two more steps (``save``); fresh processes load it
  and take the same two steps (``resume``). ``load1`` (one process, no FSDP) loads it at world size 1. Each for
  every method of ``CHECKPOINTED``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import maxq

METHODS = {
    "maxq": ("maxq", {"ramp": (0.0, 1.0), "per_step": True}),
    "srste": ("srste", {}),
    "oneshot": ("oneshot", {}),
    "maxq_noq": ("maxq", {"ramp": (0.0, 1.0), "per_step": True, "queries": False, "order": "random"}),
    "srste_1_8": ("srste", {"n": 1, "m": 8}),  # held as kept-index codes (maxq.core.codes)
}
#: the methods the DCP checkpoint is saved, resumed and loaded with: bit planes, and codes
CHECKPOINTED = ("maxq", "srste_1_8")
STEPS = 4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),  # 24 rows: 12 per rank
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 36),  # 36 rows: 18 per rank
        nn.ReLU(),
        nn.Linear(36, 10),
    )


def batches(world: int, rank: int, count: int = STEPS):
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        per = 8 // world
        yield x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fully_shard(module)
    fully_shard(model)


def train_step(model, sparsifier, optimizer, x, y, step) -> float:
    sparsifier.set_progress(step / STEPS)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    sparsifier.regularize_()
    optimizer.step()
    sparsifier.step()
    return float(loss.detach())


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def compare(rank: int, world: int) -> dict:
    out = {}
    for name, (method, options) in METHODS.items():
        for order in ("before", "after"):
            config = maxq.make_config(method, **options)
            model = net()
            if order == "before":
                sp = maxq.sparsify_(model, config)
            shard(model)
            if order == "after":
                sp = maxq.sparsify_(model, config)
            ref = net()
            ref_sp = maxq.sparsify_(ref, config)
            ddp = nn.parallel.DistributedDataParallel(ref, broadcast_buffers=False)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            steps = []
            for step, (x, y) in enumerate(batches(world, rank)):
                loss = train_step(model, sp, opt, x, y, step)
                ref_loss = train_step(ddp, ref_sp, ref_opt, x, y, step)
                masks, ref_masks = dict(sp.named_masks()), dict(ref_sp.named_masks())
                params, ref_params = full_params(model), dict(ref.named_parameters())
                steps.append(
                    {
                        "loss": (loss, ref_loss),
                        "masks_equal": all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks),
                        "param_diff": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
                    }
                )
            report = sp.report()
            coded = sorted(name for name, layer in sp._layers.items() if layer.param.coded)
            bytes_ = sp.mask_bytes()
            ref_bytes = ref_sp.mask_bytes()
            maxq.fold_(model, force=True)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            folded = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            out[f"{name}-{order}"] = {
                "steps": steps,
                "mask_bytes": bytes_,
                "single_mask_bytes": ref_bytes,
                "report_layers": [r.name for r in report.sparsified],
                "coded": coded,
                "folded": {k: v.clone() for k, v in folded.items()},
            }
    return out


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=16,
            vocab_size=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def conv1d(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from maxq.core.layers import is_hf_conv1d

    out = {}
    config = maxq.MaxQConfig(ramp=(0.0, 1.0), per_step=True)
    # FSDP2's default shards dim 0, the inputs of a Conv1D weight: refused.
    model = gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    try:
        maxq.sparsify_(model, config)
        out["refused"] = ""
    except ValueError as exc:
        out["refused"] = str(exc)
    # Sharded on its outputs: Shard(1) for the Conv1D weights.
    model = gpt2()
    sp = maxq.sparsify_(model, config)
    conv1d_weights = {
        id(m.parametrizations.weight.original)
        for m in model.modules()
        if is_hf_conv1d(m) and hasattr(m, "parametrizations")
    }

    def placement(param):
        return Shard(1) if id(param) in conv1d_weights else None

    for block in model.transformer.h:
        fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    ref = gpt2()
    ref_sp = maxq.sparsify_(ref, config)
    ddp = nn.parallel.DistributedDataParallel(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    steps = []
    for step in range(3):
        ids = torch.randint(0, 64, (4, 12), generator=g)[rank * 2 : rank * 2 + 2]
        losses = []
        for m, s, o in ((model, sp, opt), (ddp, ref_sp, ref_opt)):
            s.set_progress(step / 3)
            o.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            s.regularize_()
            o.step()
            s.step()
            losses.append(float(loss.detach()))
        masks, ref_masks = dict(sp.named_masks()), dict(ref_sp.named_masks())
        params = full_params(model)
        ref_params = dict(ref.named_parameters())
        steps.append(
            {
                "loss": losses,
                "masks_equal": all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks),
                "param_diff": max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params),
            }
        )
    out["steps"] = steps
    out["mask_bytes"] = sp.mask_bytes()
    return out


def _checkpoint_state(model, sp, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state, "sparsifier": sp.state_dict()}


def _restore(model, sp, opt, ckpt: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _checkpoint_state(model, sp, opt)
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sp.load_state_dict(state["sparsifier"])


def save_or_resume(mode: str, rank: int, world: int, out_dir: Path) -> dict:
    return {name: _save_or_resume(name, mode, rank, world, out_dir) for name in CHECKPOINTED}


def _save_or_resume(name: str, mode: str, rank: int, world: int, out_dir: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    method, options = METHODS[name]
    model = net()
    sp = maxq.sparsify_(model, maxq.make_config(method, **options))
    if world > 1:
        shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = out_dir / f"dcp-{name}"
    data = list(batches(world, rank))
    losses, masks = [], []
    start = 0
    if mode in ("resume", "load1"):
        _restore(model, sp, opt, ckpt)
        start = 2
        masks_at_load = {k: v.clone() for k, v in sp.named_masks()}
        params_at_load = {k: v.clone() for k, v in full_params(model).items()} if world > 1 else {
            k: v.detach().clone() for k, v in model.named_parameters()}  # fmt: skip
        if mode == "load1":
            return {"masks": masks_at_load, "params": params_at_load, "progress": sp.progress, "step": sp.steps}
    for step in range(start, STEPS):
        x, y = data[step]
        losses.append(train_step(model, sp, opt, x, y, step))
        masks.append({k: v.clone() for k, v in sp.named_masks()})
        if mode == "save" and step == 1:
            dcp.save(_checkpoint_state(model, sp, opt), checkpoint_id=str(ckpt))
            saved_masks = {k: v.clone() for k, v in sp.named_masks()}
            saved_params = {k: v.clone() for k, v in full_params(model).items()}
    result = {"losses": losses, "masks": masks, "params": full_params(model)}
    if mode == "save":
        result.update(saved_masks=saved_masks, saved_params=saved_params)
    return result


def main() -> None:
    modes, out_dir = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    distributed = modes != ["load1"]
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    for mode in modes:
        if mode == "compare":
            result = compare(rank, world)
        elif mode == "conv1d":
            result = conv1d(rank, world)
        else:
            result = save_or_resume(mode, rank, world, out_dir)
        torch.save(result, out_dir / f"{mode}_rank{rank}.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
