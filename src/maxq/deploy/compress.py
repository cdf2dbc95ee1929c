"""Compressed N:M checkpoints (METHOD.md §6): N values per block plus packed ``ceil(log2 M)``-bit indices.

File layout -- one `safetensors <https://github.com/huggingface/safetensors>`_ file:

* for every sparsified layer ``L``: ``L.weight.values`` -- ``[G, N]`` in the weight's dtype, blocks in
  `maxq.nm.to_blocks` order ``(o, kh, kw, i // M)``, a block's kept values in channel order -- and
  ``L.weight.indices`` -- ``uint8``, the ``G * N`` in-block positions as one little-endian bit stream of
  ``ceil(log2 M)`` bits each;
* every other tensor of the state dict, as it is;
* header metadata ``"maxq"``: JSON with ``format``, ``version``, ``n``, ``m``, ``index_bits``, ``block_order``,
  the sparse ``layers`` (shape and dtype each; ``"input_axis": 0`` for a weight stored ``[in, out]``, HF
  ``Conv1D``, whose blocks are cut from its ``[out, in]`` transpose) and, when known, the ``arch`` needed to
  rebuild the model;
* header metadata ``"sha256"`` (version 2): 64 hex digits, the SHA-256 of every byte of the file except these 64
  digits. Every read checks it, so any changed byte is rejected; version-1 files (no hash) load with a warning.

A block with fewer than N nonzeros stores zeros at its lowest free positions, so decompression restores the
folded weights bit for bit (pruned entries are ``+0.0``, as [`maxq.fold_`][maxq.fold_] leaves them). Storage of a sparse
layer: ``G * N * value_bits`` plus ``ceil(G * N * index_bits / 8)`` bytes -- within a byte of the bound
``G * (N * value_bits + N * ceil(log2 M))`` bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.nm import from_blocks, oi_view, to_blocks, validate_nm

__all__ = [
    "COMPRESSED_FORMAT",
    "COMPRESSED_VERSION",
    "CompressedError",
    "CompressedInfo",
    "save_compressed",
    "load_compressed",
    "read_compressed",
    "decompress",
    "index_bits",
]

log = logging.getLogger(__name__)

COMPRESSED_FORMAT = "maxq.compressed"
COMPRESSED_VERSION = 2  # 2: + "sha256" of the file; 1 is still read (with a warning)
#: written instead of 2 when a layer is stored [in, out] ("input_axis": 0), so that older readers refuse the file
#: rather than misread it
_VERSION_TRANSPOSED = 3
_READABLE_VERSIONS = (1, 2, 3)
_DIGEST_LEN = 64


class CompressedError(ValueError):
    """A compressed file is unreadable, of another version, or internally inconsistent."""


def index_bits(m: int) -> int:
    """Bits per in-block index: ``ceil(log2 m)``."""
    return max(1, math.ceil(math.log2(m)))


def _pack(indices: Tensor, bits: int) -> Tensor:
    """``[K]`` integers in ``[0, 2**bits)`` -> little-endian bit stream as ``uint8`` ``[ceil(K * bits / 8)]``."""
    values = indices.to(torch.int64).numpy()
    stream = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def _unpack(packed: Tensor, count: int, bits: int) -> Tensor:
    stream = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy((stream.astype(np.int64) << np.arange(bits)).sum(1))


@dataclass
class CompressedInfo:
    """Sizes of a compressed file, in bytes."""

    file_bytes: int
    sparse_bytes: int  # values + indices of the sparse layers
    sparse_bound_bytes: float  # METHOD.md §6 bound for the same layers
    dense_equivalent_bytes: int  # the same tensors stored dense
    other_bytes: int  # tensors stored as they are

    @property
    def sparse_over_bound(self) -> float:
        """``sparse_bytes / bound - 1`` (0.01 = 1 % above the bound)."""
        return self.sparse_bytes / self.sparse_bound_bytes - 1 if self.sparse_bound_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "sparse_over_bound": self.sparse_over_bound}


def save_compressed(
    state_dict: Mapping[str, Tensor],
    path: str | Path,
    n: int,
    m: int,
    layers: Iterable[str],
    *,
    arch: dict[str, Any] | None = None,
    transposed: Iterable[str] = (),
) -> CompressedInfo:
    """Write a folded N:M state dict compressed.

    Args:
        state_dict: folded weights (no masks left), e.g. ``model.state_dict()`` after [`maxq.fold_`][maxq.fold_].
        n: weights kept per block (``1 <= n < m``).
        m: block size along input channels; must divide the input size.
        layers: the sparsified layers (module names; their ``.weight`` is compressed).
        arch: optional description to rebuild the model (stored in the metadata).
        transposed: the layers among ``layers`` whose weight is stored ``[in, out]`` (HF ``Conv1D``;
            ``NMLayout.transposed``).

    Returns:
        sizes of the file and of the dense weights it replaces.

    Raises:
        CompressedError: a listed layer is missing or not N:M.
    """
    validate_nm(n, m)
    bits = index_bits(m)
    layers = list(layers)
    transposed = set(transposed)
    if transposed - set(layers):
        raise CompressedError(f"transposed layers {sorted(transposed - set(layers))} are not among the sparse layers")
    tensors: dict[str, Tensor] = {}
    meta_layers: dict[str, Any] = {}
    sparse_bytes, bound_bits, dense_eq = 0, 0.0, 0
    for name in layers:
        key = f"{name}.weight"
        if key not in state_dict:
            raise CompressedError(f"layer {name} listed as sparse but {key} is not in the state dict")
        stored = state_dict[key].detach().cpu()
        axis = 0 if name in transposed else 1
        if stored.dim() not in (2, 4) or (axis == 0 and stored.dim() != 2):
            raise CompressedError(f"{key} {tuple(stored.shape)} cannot hold {n}:{m} blocks")
        weight = oi_view(stored, axis).contiguous()  # [O, I(, kh, kw)]
        if weight.shape[1] % m:
            raise CompressedError(f"{key} {tuple(stored.shape)} cannot hold {n}:{m} blocks")
        blocks = to_blocks(weight, m)
        nonzero = blocks != 0
        if bool((nonzero.sum(-1) > n).any()):
            raise CompressedError(
                f"{key} is not {n}:{m}: some blocks hold more than {n} nonzeros; fold and check it first"
            )
        # Kept positions: the nonzeros, topped up with the lowest free positions; then in channel order.
        rank = nonzero.to(torch.int64) * m * 2 - torch.arange(m)  # nonzeros first, then low positions
        idx = rank.topk(n, dim=-1).indices.sort(dim=-1).values
        values = blocks.gather(-1, idx).contiguous()
        tensors[f"{key}.values"] = values
        tensors[f"{key}.indices"] = _pack(idx.reshape(-1), bits)
        meta_layers[name] = {"shape": list(stored.shape), "dtype": str(weight.dtype).removeprefix("torch.")}
        if axis == 0:
            meta_layers[name]["input_axis"] = 0
        sparse_bytes += values.numel() * values.element_size() + tensors[f"{key}.indices"].numel()
        bound_bits += blocks.shape[0] * (n * weight.element_size() * 8 + n * bits)
        dense_eq += weight.numel() * weight.element_size()
    from ..train.checkpoint import safetensors_ready

    compressed = {f"{name}.weight" for name in meta_layers}
    rest = safetensors_ready(
        {key: value for key, value in state_dict.items() if isinstance(value, Tensor) and key not in compressed}
    )
    tensors.update(rest)
    other = sum(value.numel() * value.element_size() for value in rest.values())
    meta = {
        "format": COMPRESSED_FORMAT,
        "version": _VERSION_TRANSPOSED if transposed else COMPRESSED_VERSION,
        "n": n,
        "m": m,
        "index_bits": bits,
        "block_order": "maxq.nm.to_blocks: (o, kh, kw, i // m); indices little-endian bit stream",
        "layers": meta_layers,
        "arch": arch,
    }
    from safetensors.torch import save

    from ..train.checkpoint import atomic_write_bytes

    placeholder = "0" * _DIGEST_LEN
    data = bytearray(save(tensors, metadata={"maxq": json.dumps(meta), "sha256": placeholder}))
    at = _digest_position(bytes(data), placeholder, path)
    data[at : at + _DIGEST_LEN] = _file_digest(data, at).encode()
    path = Path(path)
    atomic_write_bytes(bytes(data), path)
    return CompressedInfo(path.stat().st_size, sparse_bytes, bound_bits / 8, dense_eq, other)


def _file_digest(data: bytes | bytearray, at: int) -> str:
    """SHA-256 (hex) of ``data`` without the 64 digest characters at ``at``."""
    view = memoryview(data)
    h = hashlib.sha256(view[:at])
    h.update(view[at + _DIGEST_LEN :])
    return h.hexdigest()


def _digest_position(data: bytes, digest: str, path: str | Path) -> int:
    """Where the digest's characters sit in the header (they occur there exactly once)."""
    end = 8 + int.from_bytes(data[:8], "little")
    at = data.find(digest.encode(), 8, end)
    if at < 0 or data.find(digest.encode(), at + 1, end) >= 0:
        raise CompressedError(f"{path} is corrupt: its header does not hold its SHA-256 exactly once")
    return at


def read_compressed(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Raw tensors and metadata of a compressed file (no decompression), after checking its SHA-256.

    Raises:
        CompressedError: missing, unreadable, changed since it was written, or of an unknown format or version.
    """
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CompressedError(f"{path} does not exist")
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(data[8 : 8 + size])
        extra = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressedError(f"{path} is not a readable compressed file (truncated or corrupt?): {first}") from None
    try:
        meta = json.loads(extra["maxq"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CompressedError(f"{path} has no maxq metadata: not written by maxq.save_compressed") from None
    digest = extra.get("sha256")
    if digest is not None and _file_digest(data, _digest_position(data, str(digest), path)) != digest:
        raise CompressedError(
            f"{path} is corrupt: its SHA-256 does not match the one written with it (the file changed after it "
            f"was saved); restore it from a copy or export it again"
        )
    if not isinstance(meta, dict) or meta.get("format") != COMPRESSED_FORMAT:
        raise CompressedError(f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") not in _READABLE_VERSIONS:
        raise CompressedError(
            f"{path}: compressed format version {meta.get('version')!r}, this maxq reads {list(_READABLE_VERSIONS)}"
        )
    if digest is None:
        if meta["version"] >= 2:
            raise CompressedError(f"{path} is corrupt: a version-{meta['version']} file without its SHA-256")
        log.warning("%s has no content hash (compressed format version 1): it cannot be checked for corruption", path)
    return tensors, meta


def load_compressed(path: str | Path) -> dict[str, Tensor]:
    """Decompress to the folded state dict, bit for bit as it was saved.

    Args:
        path: a file written by [`save_compressed`][maxq.save_compressed] (``maxq export --compressed``).

    Returns:
        the state dict (name -> tensor, dense layout), ready for ``model.load_state_dict``.

    Raises:
        CompressedError: unreadable, wrong version, or inconsistent (e.g. a block repeating an index).
    """
    tensors, meta = read_compressed(path)
    return decompress(tensors, meta, path)


def decompress(tensors: Mapping[str, Tensor], meta: dict[str, Any], source: str | Path = "") -> dict[str, Tensor]:
    """The folded state dict from what [`read_compressed`][maxq.deploy.compress.read_compressed] returned (for callers
    that also need ``meta``, so the file is read once). ``source`` names the file in error messages."""
    tensors = dict(tensors)
    n, m, bits = meta["n"], meta["m"], meta["index_bits"]
    state: dict[str, Tensor] = {}
    for name, info in meta["layers"].items():
        key = f"{name}.weight"
        try:
            values, packed = tensors.pop(f"{key}.values"), tensors.pop(f"{key}.indices")
        except KeyError:
            raise CompressedError(f"{source}: layer {name} is listed but its values or indices are missing") from None
        axis = info.get("input_axis", 1)
        if axis not in (0, 1) or (axis == 0 and len(info["shape"]) != 2):
            raise CompressedError(f"{source}: layer {name} has input_axis {axis!r} for shape {info['shape']}")
        shape = tuple(info["shape"]) if axis == 1 else tuple(info["shape"])[::-1]  # [O, I(, kh, kw)]
        groups = math.prod(shape) // m
        if tuple(values.shape) != (groups, n):
            raise CompressedError(f"{source}: {key}.values has shape {tuple(values.shape)}, expected {(groups, n)}")
        if packed.numel() != math.ceil(groups * n * bits / 8):
            raise CompressedError(
                f"{source}: {key}.indices has {packed.numel()} bytes, expected {math.ceil(groups * n * bits / 8)}"
            )
        idx = _unpack(packed, groups * n, bits).view(groups, n)
        if bool((idx >= m).any()):
            raise CompressedError(f"{source}: {key} has an index >= m={m}")
        if n > 1:
            repeats = (idx.sort(-1).values.diff(dim=-1) == 0).any(-1)
            if bool(repeats.any()):
                bad = int(repeats.nonzero()[0])
                raise CompressedError(f"{source}: {key} block {bad} repeats an index (corrupt group)")
        blocks = torch.zeros(groups, m, dtype=values.dtype)
        blocks.scatter_(-1, idx, values)
        state[key] = oi_view(from_blocks(blocks, shape), axis).contiguous()
    state.update(tensors)
    return state
