"""Reading every file kind maxq writes (and plain state dicts / ONNX files) back into models or weights.

Kinds: ``checkpoint`` (``maxq train``'s checkpoint.pt, masks not folded), ``folded`` (model_folded.pt),
``compressed`` (`maxq.deploy.compress`), ``onnx``, a plain ``state_dict`` (``torch.save(model.state_dict())``),
and weights from elsewhere: ``safetensors`` (any safetensors file; `maxq.train.checkpoint.save_safetensors`
adds the layout record), ``hf`` (a Hugging Face model folder) and ``lightning`` (a Lightning ``.ckpt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..core.layout import LAYOUT_ATTR, NMLayout
from ..core.nm import parse_nm
from ..core.sparsifier import saved_masked_weight
from ..core.state_keys import ORIGINAL
from ..train.checkpoint import (
    CHECKPOINT_FORMAT,
    FOLDED_FORMAT,
    HF_CONFIG_LAYOUT_KEY,
    LIGHTNING_VERSION_KEY,
    SAFETENSORS_LAYOUT_KEY,
    CheckpointError,
    folded_model,
    hf_transposed,
    read_hf_folder,
    read_safetensors,
    read_torch_file,
    safetensors_header,
)

__all__ = ["file_kind", "run_file", "Weights", "weights_from", "model_from"]


def file_kind(path: str | Path) -> str:
    """Guess the kind of ``path`` from its first bytes (extension as a hint only)."""
    path = Path(path)
    if path.is_dir():
        return "hf" if (path / "config.json").is_file() else "run"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        # safetensors: u64 header length, then JSON; maxq's compressed files carry "maxq" metadata
        header = safetensors_header(path)
        if header is not None and "maxq" not in (header.get("__metadata__") or {}):
            return "safetensors"
        return "compressed"
    if head[:2] == b"PK" or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "torch"  # torch.save zip archive
    if path.suffix == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    raise CheckpointError(
        f"{path}: unknown file kind (expected a maxq checkpoint, state dict, compressed or ONNX file)"
    )


def run_file(folder: Path) -> Path:
    """The file that stands for a run folder: its ``model_folded.pt`` once finished, else its ``checkpoint.pt``."""
    for name in ("model_folded.pt", "checkpoint.pt"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} is a folder but not a maxq run (it holds neither model_folded.pt nor checkpoint.pt); pass a run "
        f"folder or a file"
    )


@dataclass
class Weights:
    """Weights to verify: ``{name}.weight`` tensors, and the sparse layers and pattern when the file says."""

    tensors: dict[str, Tensor]
    layers: list[str] | None
    n: int | None
    m: int | None
    kind: str
    note: str = ""
    dense: bool = False  # the file records a dense run: there is no N:M layer to check
    transposed: list[str] | None = None  # layers stored [in, out] (HF Conv1D), when the file (or its kind) says


def _layout_weights(tensors: dict[str, Tensor], record: Any, kind: str, source: str, **extra: Any) -> Weights:
    """``Weights`` of a file whose layout record (an ``NMLayout`` dict or JSON, or ``None``) comes with it."""
    import json

    if isinstance(record, str):
        try:
            record = json.loads(record)
        except ValueError:
            raise CheckpointError(f"{source}: its maxq layout record is not JSON") from None
    layout = NMLayout.from_dict(record, source) if record else None
    if layout is None:
        return Weights(tensors, None, None, None, kind, **extra)
    extra.setdefault("transposed", list(layout.transposed))
    return Weights(tensors, list(layout.layers), layout.n, layout.m, kind, **extra)


def weights_from(path: str | Path) -> Weights:
    """The effective weights stored in ``path`` (masks applied for unfolded checkpoints).

    Layout records: maxq's own files carry one; a safetensors file (or an HF folder's first safetensors file) may
    carry one in its header metadata (``maxq.layout``), an HF folder in ``config.json`` (``maxq_layout``), a
    Lightning checkpoint under ``ckpt["maxq_layout"]`` (e.g. from ``on_save_checkpoint``). Weights stored
    ``[in, out]`` (HF Conv1D) are known from the record, or for an HF folder from its ``model_type``
    (`maxq.train.checkpoint.hf_transposed`)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "run":
        return weights_from(run_file(path))
    if kind == "compressed":
        from .compress import decompress, read_compressed

        tensors, meta = read_compressed(path)
        state = decompress(tensors, meta, path)
        transposed = [name for name, info in meta["layers"].items() if info.get("input_axis") == 0]
        return Weights(state, list(meta["layers"]), meta["n"], meta["m"], "compressed", transposed=transposed)
    if kind == "safetensors":
        tensors, meta = read_safetensors(path)
        return _layout_weights(tensors, meta.get(SAFETENSORS_LAYOUT_KEY), "safetensors", str(path))
    if kind == "hf":
        tensors, config, meta = read_hf_folder(path)
        record = config.get(HF_CONFIG_LAYOUT_KEY) or meta.get(SAFETENSORS_LAYOUT_KEY)
        names = [k[: -len(".weight")] for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2]
        transposed = hf_transposed(config, names)
        note = f"model_type {config.get('model_type')}: Conv1D layers checked along dim 0" if transposed else ""
        weights = _layout_weights(tensors, record, "hf", str(path), note=note)
        if not weights.transposed:  # no record, or one without transposed layers: the model type says
            weights.transposed = transposed
        return weights
    if kind == "onnx":
        from .onnx_export import load_onnx, onnx_metadata, onnx_weights

        proto = load_onnx(path)
        records = onnx_metadata(proto)
        meta, names = records["layout"], records["layers"]  # names: {initializer: layer} (older files: none)
        tensors = {f"{names.get(name, name)}.weight": w for name, (w, _) in onnx_weights(proto).items()}
        layers = [names.get(name, name) for name in meta["sparse_initializers"]] if meta else None
        dense = meta is None and (records["arch"] or {}).get("method") == "dense"
        return Weights(tensors, layers, meta["n"] if meta else None, meta["m"] if meta else None, "onnx", dense=dense)
    state = read_torch_file(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(state)
    if isinstance(state, dict) and LIGHTNING_VERSION_KEY in state:
        if not isinstance(state.get("state_dict"), dict):
            raise CheckpointError(f"{path}: a Lightning checkpoint without a state_dict")
        tensors = {k: v for k, v in state["state_dict"].items() if isinstance(v, Tensor)}
        if any(".parametrizations." in k for k in tensors):  # written during a MaxQCallback fit: not folded yet
            return _from_lightning_fit(tensors, state, path)
        return _layout_weights(tensors, state.get("maxq_layout"), "lightning", str(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        layout = NMLayout.from_dict(state["layout"], str(path)) if state.get("layout") else None
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        return Weights(
            dict(state["state_dict"]),
            list(layout.layers) if layout else None,
            layout.n if layout else None,
            layout.m if layout else None,
            "folded" if state.get("format") else "state_dict",
            dense=layout is None and config.get("method") == "dense",
        )
    if isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()):
        return Weights(dict(state), None, None, None, "state_dict")
    raise CheckpointError(f"{path}: not a maxq checkpoint or a state dict")


def _unfold(tensors: dict[str, Tensor], sparsifier: dict[str, Any], prefix: str = "") -> tuple[list[str], bool]:
    """Fold on the fly, in ``tensors`` (a state dict): each layer of a sparsifier state (``Sparsifier.state_dict()``,
    layer names below ``prefix``) gets ``<layer>.weight = W * Mask`` in place of its
    ``...parametrizations.weight.original``. Returns the layers (with the prefix) and whether the ramp was
    unfinished (blocks still dense)."""
    layers = []
    for name, entry in sparsifier["layers"].items():
        layer = f"{prefix}{name}"
        original = tensors.pop(f"{layer}.{ORIGINAL}", None)
        if original is None:
            raise CheckpointError(f"the sparsifier state names layer {name}, which the weights do not hold")
        tensors[f"{layer}.weight"] = saved_masked_weight(original, entry, sparsifier["config"])
        layers.append(layer)
    return layers, any(float(e["dense_fraction"]) > 0 for e in sparsifier["layers"].values())


def _from_checkpoint(state: dict[str, Any]) -> Weights:
    """Effective weights ``W * Mask`` of an unfolded training checkpoint (as an eval forward would use)."""
    model = dict(state["model"])
    cfg = state["config"]
    sparsifier = state.get("sparsifier")
    if not sparsifier:
        return Weights(model, None, None, None, "checkpoint", dense=cfg.get("method") == "dense")
    layers, unfinished = _unfold(model, sparsifier)
    tensors = {k: v for k, v in model.items() if ".parametrizations." not in k}
    n, m = parse_nm(cfg["nm"])
    note = "unfolded checkpoint: checked W * Mask" + ("; ramp unfinished" if unfinished else "")
    return Weights(tensors, layers, n, m, "checkpoint", note)


def _from_lightning_fit(tensors: dict[str, Tensor], ckpt: dict[str, Any], path: Path) -> Weights:
    """A Lightning checkpoint written during a ``MaxQCallback`` fit: weights still parametrized, the masks in the
    callback's state (``ckpt["callbacks"]``); checked as ``W * Mask``, as the model would be folded."""
    callbacks = ckpt.get("callbacks") if isinstance(ckpt.get("callbacks"), dict) else {}
    states = [
        s
        for s in callbacks.values()
        if isinstance(s, dict) and str(s.get("format", "")).startswith("maxq.sparsifier/") and s.get("layers")
    ]
    if not states:
        raise CheckpointError(
            f"{path}: the weights of a sparsified model (...parametrizations.weight.original) without the masks "
            "(no MaxQCallback state in the checkpoint's callbacks): verify a checkpoint a MaxQCallback fit wrote, "
            "or fold the model with maxq.fold_ and save that"
        )
    layers, unfinished, patterns = [], False, set()
    for state in states:
        first = f"{next(iter(state['layers']))}.{ORIGINAL}"
        prefixes = [k[: -len(first)] for k in tensors if k == first or k.endswith(f".{first}")]
        holds_all = (p for p in prefixes if all(f"{p}{name}.{ORIGINAL}" in tensors for name in state["layers"]))
        found, late = _unfold(tensors, state, next(holds_all, ""))
        layers += found
        unfinished = unfinished or late
        patterns.add((int(state["config"]["n"]), int(state["config"]["m"])))
    if len(patterns) > 1:
        raise CheckpointError(f"{path}: MaxQCallbacks of different patterns {sorted(patterns)}; verify each part")
    ((n, m),) = patterns
    tensors = {k: v for k, v in tensors.items() if ".parametrizations." not in k}
    note = "written during fit, not folded: checked W * Mask" + ("; ramp unfinished" if unfinished else "")
    record = ckpt.get("maxq_layout") or {"n": n, "m": m, "layers": layers}
    return _layout_weights(tensors, record, "lightning", str(path), note=note)


def model_from(path: str | Path, *, force: bool = False, as_trained: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A folded model and its ``arch`` (model name, input channels, classes, image size) from a run folder,
    ``model_folded.pt``, ``checkpoint.pt`` (folded here; ``force`` prunes an unfinished ramp) or compressed file.

    ``as_trained``: a checkpoint stopped mid-ramp comes back unfolded, with its current masks (the blocks still
    dense kept: the model its last epoch evaluated), and ``arch["unfinished_ramp"]`` holds its dense fraction.
    """
    from ..train.models import build_model

    path = Path(path)
    kind = file_kind(path)
    if kind == "run":
        return model_from(run_file(path), force=force, as_trained=as_trained)
    if kind == "compressed":
        from .compress import decompress, read_compressed

        tensors, meta = read_compressed(path)
        arch = meta.get("arch")
        if not arch:
            raise CheckpointError(f"{path} does not say which model it holds (no arch in its metadata)")
        model = build_model(arch["model"], arch["in_channels"], arch["num_classes"], arch.get("image_size"))
        if arch.get("bn_folded"):
            from .bnfold import fold_batchnorm_

            fold_batchnorm_(model)  # the same structure (BN -> Identity, conv biases); weights come next
        model.load_state_dict(decompress(tensors, meta, path))
        setattr(model, LAYOUT_ATTR, NMLayout(meta["n"], meta["m"], tuple(meta["layers"]), arch.get("method")))
        return model, arch
    if kind != "torch":
        raise CheckpointError(f"{path}: cannot rebuild a PyTorch model from a {kind} file")
    state = read_torch_file(path)  # read once: seal and safety checked here
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == CHECKPOINT_FORMAT:
        return _model_from_checkpoint(state, force, as_trained)
    if found == FOLDED_FORMAT:
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        arch = dict(state["arch"])
        if config.get("method") and not arch.get("method"):
            arch["method"] = config["method"]
        return folded_model(state, path), arch
    if isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is a plain state dict: it does not record which model it belongs to, so no model can be built "
            f"from it; pass a run folder, checkpoint.pt, model_folded.pt or compressed file (maxq verify FILE --nm "
            f"N:M checks a state dict's pattern)"
        )
    what = f"a {found!r} file" if isinstance(found, str) else f"a {type(state).__name__} without a maxq format"
    raise CheckpointError(f"{path}: neither a maxq checkpoint nor a folded model (it holds {what})")


def _model_from_checkpoint(state: dict[str, Any], force: bool, as_trained: bool) -> tuple[nn.Module, dict[str, Any]]:
    from ..core.fold import fold_
    from ..core.sparsifier import sparsify_
    from ..train.models import build_model
    from ..train.recipe import TrainConfig

    cfg = TrainConfig.from_dict(state["config"])
    arch = state.get("arch")
    if arch is None:
        raise CheckpointError("checkpoint does not record the model architecture (written by an older maxq)")
    model = build_model(arch["model"], arch["in_channels"], arch["num_classes"], arch.get("image_size"))
    sparse_cfg = cfg.sparsity_config()
    sparsifier = sparsify_(model, sparse_cfg) if sparse_cfg is not None else None
    model.load_state_dict(state["model"])
    if sparsifier is not None:
        sparsifier.load_state_dict(state["sparsifier"])
        if not sparsifier.ramp_finished and as_trained:
            return model, {**arch, "method": cfg.method, "unfinished_ramp": sparsifier.dense_fraction}
        if not sparsifier.ramp_finished and not force:
            raise CheckpointError(
                f"the checkpoint is mid-ramp ({sparsifier.dense_fraction:.0%} of blocks still dense): finish "
                f"training (maxq train --out RUN --resume), or pass --force to prune them now"
            )
        fold_(model, force=force)
    return model, {**arch, "method": cfg.method}
