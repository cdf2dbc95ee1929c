"""Short training runs whose every loss, mask and folded weight is frozen in ``data/frozen_runs.json``.

The file was recorded with the float-mask implementation (a weight-sized fp32 mask buffer and the masked copy
``W * mask`` kept for backward, maxq 0.2.0, commit b711a14) *before* the mask storage was made lean, so the test
``test_frozen_runs.py`` proves the lean storage changed no bit of the math: same masks at every step, same losses,
same folded weights, for every method and variant, on the fused CPU kernels and on the device-agnostic path.

The bits are a platform's (``environment``): the file holds one recording per platform it was made on. Record one for
a new platform, only ever with the old implementation:
``PYTHONPATH=<checkout of b711a14>/src python -m tests.core.frozen_runs --record``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import maxq

PATH = Path(__file__).parent / "data" / "frozen_runs.json"
STEPS = 6


def environment() -> dict[str, Any]:
    """What the recorded bits depend on besides maxq: the frozen values are compared only where these match.

    Two x86-64 CPUs of one capability level (``AVX512``) can still give other float bits (oneDNN and MKL pick
    kernels by the exact instruction set and caches), so ``probe`` fingerprints the platform by its results: the
    digest of the same short runs on the dense models, no maxq involved."""
    return {
        "torch": torch.__version__.split("+")[0],
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "probe": probe(),
    }


@functools.cache
def probe() -> str:
    """Digest of dense training (no maxq) of every model and optimizer the runs use, on one thread."""
    dense = [{"model": k, "method": "dense", "fused": False} for k in ("cnn", "cnn_cl", "mlp")]
    dense += [{"model": "mlp", "method": "dense", "fused": False, "optimizer": "adamw"}]
    dense += [{"model": "mlp", "method": "dense", "fused": False, "dtype": "bfloat16"}]
    if importlib.util.find_spec("transformers") is not None:
        dense.append({"model": "lm", "method": "dense", "fused": False})
    return hashlib.sha256(json.dumps([run(spec) for spec in dense]).encode()).hexdigest()[:24]


def _load() -> dict[str, Any]:
    return json.loads(PATH.read_text())


def recording() -> dict[str, Any] | None:
    """The recording made on a platform like this one (``environment``), or None.

    The first recording (maxq 0.2.0's machine) predates the probe: it is used where no recording's probe matches and
    the rest of the environment does (the platform it was made on is not known more closely than that)."""
    here = environment()
    recordings = _load()["recordings"]
    for rec in recordings:
        if rec["environment"] == here:
            return rec
    coarse = {k: v for k, v in here.items() if k != "probe"}
    return next((rec for rec in recordings if rec["environment"] == coarse), None)


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _cnn(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 48),
        nn.ReLU(),
        nn.Linear(48, 10),
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.LayerNorm(64),
        nn.GELU(),
        nn.Linear(64, 96),
        nn.LayerNorm(96),
        nn.GELU(),
        nn.Linear(96, 64),
        nn.GELU(),
        nn.Linear(64, 10),
    )
    return model.to(dtype)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    return GPT2LMHeadModel(cfg)


class _LM(nn.Module):
    """The GPT-2 model as ``x -> logits`` for the shared loop."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _gpt2()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids).logits.flatten(0, 1)


def _data(kind: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    if kind == "lm":
        ids = torch.randint(0, 64, (4, 12), generator=g)
        return ids, torch.randint(0, 64, (4 * 12,), generator=g)
    return torch.randn(8, 32, generator=g).to(dtype), torch.randint(0, 10, (8,), generator=g)


def _masks_digest(sp: maxq.Sparsifier | None) -> str:
    """The digest of the masks (empty for a dense run: no sparsifier)."""
    return _digest([mask for _, mask in sp.named_masks()]) if sp is not None else ""


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One short run: ``STEPS`` optimizer steps with a per-step ramp over the first half; returns hex losses, the
    masks' digest after every step, an eval forward's digest and the folded weights' digest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(spec)
    finally:
        torch.set_num_threads(threads)


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["model"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = {"cnn": lambda: _cnn(), "cnn_cl": lambda: _cnn(True), "mlp": lambda: _mlp(dtype), "lm": _LM}[kind]()
    x, y = _data("lm" if kind == "lm" else ("cnn" if kind.startswith("cnn") else "mlp"), dtype)
    if kind == "cnn_cl":
        x = x.to(memory_format=torch.channels_last)
    options = dict(spec.get("options", {}))
    sp = None if spec["method"] == "dense" else maxq.sparsify_(model, maxq.make_config(spec["method"], **options))
    if sp is not None:
        sp.fused = spec["fused"]
        sp.update_masks()  # the masks of the path under test (sparsify_ computed them with the default one)
    if spec.get("optimizer") == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    hooked = spec.get("hooked", False) or sp is None  # dense: no maxq call in the loop
    if hooked and sp is not None:
        sp.hook_optimizer(opt, steps_per_epoch=STEPS // 2)
    model.train()
    losses, masks = [], [_masks_digest(sp)]
    for step in range(STEPS):
        if not hooked:
            sp.set_progress(step / (STEPS // 2))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if not hooked:
            sp.regularize_()
        opt.step()
        if not hooked:
            sp.step()
        losses.append(float(loss.detach()).hex())
        masks.append(_masks_digest(sp))
    model.eval()
    with torch.no_grad():
        evaluated = _digest([model(x)])
    if sp is not None:
        sp.set_progress(STEPS)
        maxq.fold_(model, force=True)
    folded = _digest(list(model.state_dict().values()))
    return {"losses": losses, "masks": masks, "eval": evaluated, "folded": folded}


def specs() -> dict[str, dict[str, Any]]:
    """Every run: each method and variant, on the fused kernels and the device-agnostic path."""
    ramp = {"ramp": (0.0, 1.0), "per_step": True}
    variants: dict[str, tuple[str, str, dict[str, Any]]] = {
        "maxq": ("cnn", "maxq", ramp),
        "maxq_staircase": ("cnn", "maxq", {"ramp": (0.0, 1.0)}),
        "maxq_noq": ("cnn", "maxq", {**ramp, "queries": False}),
        "maxq_softramp": ("cnn", "maxq", {**ramp, "soft_warmup": "ramp"}),
        "maxq_normalize": ("cnn", "maxq", {**ramp, "soft_warmup": "normalize"}),
        "maxq_random": ("cnn", "maxq", {**ramp, "order": "random", "seed": 3}),
        "maxq_largest": ("cnn", "maxq", {**ramp, "order": "largest"}),
        "maxq_every2": ("cnn", "maxq", {**ramp, "update_every": 2}),
        "maxq_1_16": ("cnn", "maxq", {**ramp, "n": 1, "m": 16, "skip_first": True}),
        "maxq_tau": ("cnn", "maxq", {**ramp, "tau": 0.003, "schedule": "cubic"}),
        "srste": ("cnn", "srste", {}),
        "srste_every3": ("cnn", "srste", {"update_every": 3}),
        "oneshot": ("cnn", "oneshot", {}),
        "maxq_cl": ("cnn_cl", "maxq", ramp),
        "srste_cl": ("cnn_cl", "srste", {}),
        "mlp_maxq": ("mlp", "maxq", ramp),
        "mlp_srste": ("mlp", "srste", {"n": 1, "m": 8}),
        "mlp_oneshot": ("mlp", "oneshot", {"n": 4, "m": 8}),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (model, method, options) in variants.items():
        for fused in (True, False):
            out[f"{name}-{'fused' if fused else 'eager'}"] = {
                "model": model, "method": method, "options": options, "fused": fused,
            }  # fmt: skip
    for name, method in (("maxq", "maxq"), ("srste", "srste"), ("oneshot", "oneshot")):
        out[f"mlp_adamw_{name}"] = {"model": "mlp", "method": method, "options": ramp if method == "maxq" else {},
                                    "fused": True, "optimizer": "adamw"}  # fmt: skip
        out[f"mlp_bf16_{name}"] = {"model": "mlp", "method": method, "options": ramp if method == "maxq" else {},
                                   "fused": True, "dtype": "bfloat16"}  # fmt: skip
    out["srste_hooked"] = {"model": "cnn", "method": "srste", "options": {}, "fused": True, "hooked": True}
    out["maxq_hooked"] = {"model": "cnn", "method": "maxq", "options": {"ramp": (0.0, 1.0)}, "fused": True,
                          "hooked": True}  # fmt: skip
    for name, method in (("maxq", "maxq"), ("srste", "srste")):
        for fused in (True, False):
            out[f"gpt2_{name}-{'fused' if fused else 'eager'}"] = {
                "model": "lm", "method": method, "options": ramp if method == "maxq" else {}, "fused": fused,
            }  # fmt: skip
    return out


def _jsonable(spec: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(spec))


def record(path: Path = PATH, select: Callable[[str], bool] = lambda name: True) -> None:
    """Add (or replace) this platform's recording in ``path``; the other platforms' recordings stay."""
    results = {name: {"spec": _jsonable(spec), **run(spec)} for name, spec in specs().items() if select(name)}
    here = environment()
    recordings = json.loads(path.read_text())["recordings"] if path.exists() else []
    recordings = [rec for rec in recordings if rec["environment"] != here]
    recordings.append({"environment": here, "maxq": maxq.__version__, "runs": results})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"recordings": recordings}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true", help="write data/frozen_runs.json from this implementation")
    args = parser.parse_args()
    if args.record:
        record()
        print(f"added this platform's recording to {PATH}")
