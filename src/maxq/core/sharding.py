"""N:M masks on sharded weights (FSDP2 ``fully_shard``, DTensor): placements, sharded state, layer-wide statistics.

**Which placements keep N:M groups whole.** Groups run along a weight's inputs, so a weight may be sharded only on
the axis of its *outputs* (its rows in the ``[O, I(, kh, kw)]`` view): ``Shard(0)`` for ``nn.Linear`` and
``nn.Conv2d`` (FSDP2's default), ``Shard(1)`` for Hugging Face ``Conv1D``, whose weight is stored ``[in, out]``
(``fully_shard(..., shard_placement_fn=...)`` chooses it). Every other mesh dimension must replicate (HSDP).
Anything else is refused with an error that says so, before a step is taken.

**State sharded like the weight.** Each rank holds the mask state (bit planes) of the rows it holds; the forward,
which FSDP hands the whole (unsharded) weight, gathers the state with one collective per layer (1/32 of the
weight's bytes per bit plane), as FSDP gathers the weight.

**Layer-wide statistics over the whole layer.** A row's N:M blocks and its filter query are local. The kernel query
(over all rows at a kernel position) and the ramp's choice of dense blocks (over all blocks of a layer) are not:
`global_kth` selects their exact order statistic across ranks with a fixed number of all-reduces (a radix
select over the 64-bit keys of [`maxq.core.nm.order_keys`][maxq.core.nm.order_keys], ties broken by the *global*
index), so the masks equal a single process's bit for bit, with no host synchronisation beyond the collectives.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["RowSharding", "Span", "gathered", "global_kth", "is_dtensor", "row_sharding"]

_INT64_MIN = -(2**63)


_DTENSOR: list[type] = []


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``. Imports nothing: a DTensor exists only once its module
    is imported, and importing it (half a second, a few MiB) in every process that never shards would be waste."""
    if not _DTENSOR:
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if dtensor is None:  # not imported (or not yet whole): no tensor is a DTensor
            return False
        _DTENSOR.append(dtensor)
    return isinstance(t, _DTENSOR[0])


def gathered(obj: Any) -> Any:
    """``obj`` (a state: nested dicts, lists and tuples) with every DTensor replaced by its whole tensor, for a file
    that one process writes (a framework's checkpoint metadata) and any world size reads. A collective per
    DTensor: every rank of their meshes must call it, in the same order. Anything else is returned as is."""
    if is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered(v) for v in obj)
    return obj


@dataclass(frozen=True)
class Span:
    """Where this rank's entries of a set lie in the whole set: ``offset`` of the first, ``total`` entries in all,
    and the process group holding the rest (``None``: the set is whole here)."""

    offset: int = 0
    total: int | None = None
    group: Any = None


@dataclass(frozen=True, eq=False)
class RowSharding:
    """How a layer's weight is sharded over its rows (outputs).

    Attributes:
        mesh: the weight's device mesh; placements: its placements.
        mesh_dim: the mesh dimension that shards the rows.
        row_dim: the dimension of the stored weight that holds the rows (0, or 1 for HF ``Conv1D``).
        rows: rows in all; offset: the first row held here; local: rows held here.
    """

    mesh: Any
    placements: tuple
    mesh_dim: int
    row_dim: int
    rows: int
    offset: int
    local: int

    @property
    def group(self) -> Any:
        return self.mesh.get_group(self.mesh_dim)

    def span(self, per_row: int) -> Span:
        """The span of a set that runs over every row, ``per_row`` entries each (row-major)."""
        return Span(self.offset * per_row, self.rows * per_row, self.group)

    def state_placements(self, dim: int) -> tuple:
        """The weight's placements with its row shard moved to ``dim`` of a state tensor."""
        from torch.distributed.tensor import Shard

        return tuple(Shard(dim) if i == self.mesh_dim else p for i, p in enumerate(self.placements))

    def distribute(self, full: Tensor, dim: int) -> Tensor:
        """The DTensor of this rank's rows (along ``dim``) of a whole state tensor."""
        from torch.distributed.tensor import DTensor

        local = full.narrow(dim, self.offset, self.local).contiguous()
        return DTensor.from_local(
            local, self.mesh, self.state_placements(dim), run_check=False, shape=full.shape, stride=full.stride()
        )

    def from_local(self, local: Tensor, dim: int, shape: tuple[int, ...]) -> Tensor:
        """A DTensor from this rank's rows of a state tensor of global ``shape``."""
        from torch.distributed.tensor import DTensor

        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local, self.mesh, self.state_placements(dim), run_check=False, shape=torch.Size(shape), stride=stride
        )


def row_sharding(weight: Tensor, input_axis: int, name: str = "layer") -> RowSharding | None:
    """The row sharding of ``weight`` (a DTensor), ``None`` for a plain tensor.

    Raises:
        ValueError: a placement that would split N:M groups (sharded inputs, ``Partial``, several row shards).
    """
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard

    row_dim = 1 if input_axis == 0 else 0
    placements = tuple(weight.placements)
    shards = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    bad = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    if bad or len(shards) != 1 or placements[shards[0]].dim != row_dim:
        hint = (
            "shard it on dim 1 (its outputs): fully_shard(..., shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 "
            "and <p is a Conv1D weight> else None)"
            if input_axis == 0
            else "shard it on dim 0 (FSDP2's default)"
        )
        raise ValueError(
            f"maxq: {name}'s weight is sharded as {placements}: N:M groups run along its inputs (dim {input_axis} "
            f"of the stored weight), so only a shard of its outputs (Shard({row_dim})) on one mesh dimension, every "
            f"other one replicated, keeps every group whole on one rank; {hint}"
        )
    mesh_dim = shards[0]
    mesh = weight.device_mesh
    rows = weight.shape[row_dim]
    size = mesh.size(mesh_dim)
    coordinate = mesh.get_local_rank(mesh_dim)
    chunk = -(-rows // size)  # torch.chunk's split: ceil(rows / size) per rank, the last ones shorter or empty
    offset = min(coordinate * chunk, rows)
    local = max(min(chunk, rows - offset), 0)
    held = weight.to_local().shape[row_dim]
    if held != local:
        raise ValueError(f"maxq: {name}'s weight holds {held} rows here, expected {local} (an uneven sharding?)")
    return RowSharding(mesh, placements, mesh_dim, row_dim, rows, offset, local)


def _all_reduce_(t: Tensor, group: Any, op: str) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group)
    return t


def global_kth(keys: Tensor, k: int, group: Any) -> Tensor:
    """The ``k``-th smallest key (1-indexed) of every set (row) of ``keys`` (int64 ``[S, n]``, this rank's entries;
    the sets' other entries are on the other ranks of ``group``), ``[S, 1]``, the same on every rank.

    A radix select over 8-bit digits, most significant first: per round, each rank counts its candidates per
    digit, one all-reduce sums the counts, and the digit holding the ``k``-th is kept. Eight all-reduces of
    ``[S, 256]`` counts, whatever the data: exact, deterministic, no host synchronisation.
    """
    s = keys.shape[0]
    bits = keys ^ _INT64_MIN  # order-preserving: the signed order becomes the order of the raw bits, top digit first
    need = torch.full((s,), k, dtype=torch.int64, device=keys.device)
    found = torch.zeros(s, dtype=torch.int64, device=keys.device)
    candidate = torch.ones_like(keys, dtype=torch.bool)
    for shift in range(56, -1, -8):
        digit = (bits >> shift) & 255
        counts = torch.zeros(s, 256, dtype=torch.int64, device=keys.device)
        counts.scatter_add_(1, digit, candidate.to(torch.int64))
        _all_reduce_(counts, group, "SUM")
        cumulative = counts.cumsum(1)
        chosen = (cumulative < need.unsqueeze(1)).sum(1)  # the first digit whose cumulative count reaches need
        before = torch.where(chosen > 0, cumulative.gather(1, (chosen - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        need = need - before
        found = found | (chosen << shift)
        candidate = candidate & (digit == chosen.unsqueeze(1))
    return (found ^ _INT64_MIN).unsqueeze(1)


def global_min(t: Tensor, group: Any) -> Tensor:
    """Elementwise minimum of ``t`` over the ranks of ``group`` (a new tensor)."""
    return _all_reduce_(t.clone(), group, "MIN")


def move_fsdp_param(root: Any, param: Any, module: Any, name: str) -> bool:
    """Tell FSDP2 that ``param`` now lives at ``module.<name>`` (a parametrization moved it), so that its unsharded
    weight goes where the forward reads it. Returns whether an FSDP state held it.

    This reaches into FSDP2's parameter records (``FSDPParam._module_info``), which have no public setter; if
    their layout changes, the error says to sparsify before ``fully_shard`` (the order that needs none of this).
    """
    found = False
    for owner in root.modules():
        get_state = getattr(owner, "_get_fsdp_state", None)
        if get_state is None:
            continue
        group = getattr(get_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            if fsdp_param.sharded_param is not param:
                continue
            try:
                info = fsdp_param._module_info
                fsdp_param._module_info = type(info)(module, name, info.shared_modules, info.shared_param_names)
            except (AttributeError, TypeError) as exc:
                raise RuntimeError(
                    "maxq: this PyTorch's FSDP2 keeps its parameter records in a way maxq does not know, so a layer "
                    "cannot be sparsified after fully_shard; call maxq.sparsify_ before fully_shard"
                ) from exc
            found = True
    return found


def remove_weight_parametrization(module: Any) -> None:
    """``remove_parametrizations(module, "weight", leave_parametrized=False)``, also where ``fully_shard`` came after
    the parametrization: FSDP2 then wrapped the parametrized class in its own (``FSDPParametrizedLinear``), which
    torch's function does not expect (it looks for the weight's property on the outermost class and restores the
    class's first base). Here the property is removed from the parametrized class, and the FSDP class is rebuilt
    over the plain one, so the module ends as ``fully_shard`` would have left an unparametrized one."""
    from torch.nn.utils import parametrize

    cls = type(module)
    if "weight" in cls.__dict__:  # the parametrized class is the outermost one: torch's own function
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return
    owner = next(c for c in cls.__mro__ if isinstance(c.__dict__.get("weight"), property))
    original = module.parametrizations["weight"].original
    delattr(owner, "weight")
    del module.parametrizations["weight"]
    module._parameters["weight"] = original
    if not parametrize.is_parametrized(module):
        delattr(module, "parametrizations")
        bases = tuple(owner.__bases__[0] if base is owner else base for base in cls.__bases__)
        skip = ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__")
        namespace = {k: v for k, v in cls.__dict__.items() if k not in skip}
        name = cls.__name__.replace(owner.__name__, owner.__bases__[0].__name__, 1)
        module.__class__ = type(name, bases, namespace)
