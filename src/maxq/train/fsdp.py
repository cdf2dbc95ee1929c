"""``maxq train --fsdp``: the model sharded with FSDP2 (``fully_shard``) instead of replicated by DDP.

The loop sparsifies first, then shards (`shard_blocks`), on a fresh start and on resume alike, so a checkpoint's
sharded state always meets the same module structure. Gradients are averaged over the processes as DDP averages
them, so a sharded run takes the same optimizer steps as a DDP run of the same configuration.

**BatchNorm.** FSDP2 shards parameters, not buffers: each process keeps its own running statistics, from its own
batches, as DDP would without SyncBatchNorm. DDP broadcasts rank 0's buffers before every forward; the sharded
run does so at each epoch's end (`broadcast_buffers`), before the evaluation and the checkpoint, so every process
evaluates the same model, the checkpoint holds it, and rank 0's statistics (those of the folded model) are the ones
a DDP run ends with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.sharding import is_dtensor

__all__ = ["shard_blocks", "broadcast_buffers", "full_model_state", "equal_batch_count"]

#: containers whose children are the blocks worth sharding (their own forward only calls the children).
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The children of ``module`` that hold parameters, looking through containers (``nn.Sequential`` stages of
    residual blocks, ...): a convolution, a residual block, a transformer encoder. A block is all-gathered whole
    for its forward, so code that reads a sub-module's weight without calling it (``nn.MultiheadAttention``'s
    ``out_proj``) still finds it unsharded."""
    found = []
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            found += _blocks(child)
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def shard_blocks(model: nn.Module, device: torch.device, world: int) -> list[str]:
    """``fully_shard`` each parameter-holding block of ``model`` (see `_blocks`), then the root (which takes the
    rest), over one mesh dimension of ``world`` processes on ``device``'s type. Returns the blocks' names.

    Weights are sharded on dim 0, their outputs, so N:M groups (along the inputs) stay whole on one rank."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    mesh = init_device_mesh(device.type, (world,))
    names = {id(m): name for name, m in model.named_modules()}
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return [names[id(b)] for b in blocks]


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's persistent buffers (BatchNorm running statistics: those the state dict holds, and a checkpoint
    saves once, as replicated) to every process, in place. maxq's mask state is held in non-persistent buffers,
    sharded with the weights: each process keeps its own."""
    if dist.get_world_size() == 1:
        return
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set and not is_dtensor(buffer):
                dist.broadcast(buffer, 0)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded model on the CPU, on rank 0; an empty dict elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def equal_batch_count(batches: int, device: torch.device) -> int:
    """The most batches any process has to evaluate: under FSDP every forward is a collective, so every process
    runs that many (the ones with fewer run one-sample batches whose results they drop)."""
    count = torch.tensor(batches, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)
