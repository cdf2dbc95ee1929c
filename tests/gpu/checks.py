"""Correctness on CUDA, as plain functions: ``tests/gpu/test_cuda.py`` runs them under pytest (``-m gpu``) and
``scripts/gpu_check.py checks`` runs them where pytest is not installed.

Every check takes the device to test and returns a dict of facts worth recording; it raises ``AssertionError``
when the code is wrong and :class:`SkipCheck` when it cannot apply. On CUDA the checks use full sizes (ResNet-50
layers) and compare against the CPU or against eager mode. With ``MAXQ_TEST_DEVICE=cpu`` (the dry run of
``scripts/gpu_check.sh``) the same code runs on the CPU with small sizes, so that only the hardware is new when a
GPU runs it. ``MAXQ_COMPILE_BACKEND`` picks the ``torch.compile`` backend (default inductor; the dry run uses
``aot_eager``, which traces the same graphs without generating code).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

import maxq
from maxq._engine.syncs import host_syncs
from maxq.core.nm import to_blocks
from maxq.deploy.accelerate import candidates
from maxq.train.models import build_model

__all__ = ["CHECKS", "SkipCheck", "target_device"]

Info = dict[str, Any]

#: ResNet-50 layers compared on the CPU (dry run): a 1x1, a 3x3 and a strided 1x1 projection; on CUDA one layer of
#: every distinct weight shape (20 layers with the classifier, 11M weights: the CPU side takes a while).
SMALL_LAYERS = ("layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0")
RAMP = (0.0, 2.0)  # epochs; progress 1.0 is mid-ramp (p = 0.5), 2.0 is after it (p = 0)


class SkipCheck(Exception):
    """The check does not apply here (the message says why)."""


def target_device() -> torch.device:
    """The device under test: ``MAXQ_TEST_DEVICE`` if set, else CUDA; skips without one."""
    want = os.environ.get("MAXQ_TEST_DEVICE", "").strip()
    if want:
        device = torch.device(want)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SkipCheck(f"MAXQ_TEST_DEVICE={want}, but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise SkipCheck("needs CUDA (MAXQ_TEST_DEVICE=cpu rehearses these checks on the CPU)")


def _full_size(device: torch.device) -> bool:
    return device.type == "cuda"


def _originals(sparsifier: maxq.Sparsifier) -> dict[str, Tensor]:
    modules = dict(sparsifier.model.named_modules())
    return {name: modules[name].parametrizations.weight.original for name in sparsifier.layers}


def _assert_same_mask(got: Tensor, want: Tensor, what: str) -> float:
    """Same kept weights exactly, same soft values to float rounding; returns the largest difference."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    differ = int(((got != 0) != (want != 0)).sum())
    assert differ == 0, f"{what}: {differ} of {want.numel()} weights kept on one side only"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    return float((got - want).abs().max()) if got.numel() else 0.0


def _kept_per_block(mask: Tensor, m: int) -> Tensor:
    return (to_blocks(mask.detach().cpu(), m) != 0).sum(-1)


# -- 1. masks on the device equal the CPU masks --------------------------------------------------------------------


def _distinct_shapes(model: nn.Module) -> set[str]:
    """The first Conv2d / Linear of every distinct weight shape."""
    seen: dict[tuple[int, ...], str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            seen.setdefault(tuple(module.weight.shape), name)
    return set(seen.values())


def _mask_cases() -> dict[str, tuple[maxq.NMConfig, float | None]]:
    return {
        "maxq 2:4 mid-ramp": (maxq.MaxQConfig(n=2, m=4, ramp=RAMP), 1.0),
        "maxq 2:4 after ramp": (maxq.MaxQConfig(n=2, m=4, ramp=RAMP), 2.0),
        "maxq 1:16 mid-ramp": (maxq.MaxQConfig(n=1, m=16, ramp=RAMP), 1.0),
        "srste 2:4": (maxq.SRSTEConfig(n=2, m=4), None),
        "oneshot 2:4": (maxq.OneShotConfig(n=2, m=4), None),
        "srste 1:16 (kept-index codes)": (maxq.SRSTEConfig(n=1, m=16), None),
    }


def check_masks_match_cpu(device: torch.device) -> Info:
    """ResNet-50 (fp32): the masks the Sparsifier computes on ``device`` equal those it computes on the CPU, for
    MaxQ mid-ramp and after it, SR-STE (at 1:16 too: kept-index codes) and one-shot, as set and after a weight update
    and ``step()``; mid-ramp exactly ``floor(p * G)`` blocks stay dense."""
    torch.manual_seed(0)
    base: nn.Module = torchvision.models.resnet50(num_classes=1000)
    layers = _distinct_shapes(base)
    if not _full_size(device):  # ResNet-50's first stage only (the copies are what costs time on the CPU)
        base, layers = nn.Sequential(OrderedDict(layer1=base.layer1)), set(SMALL_LAYERS)
    pick: Callable[[nn.Module, str], bool] = lambda module, name: name in layers  # noqa: E731
    compared, worst = 0, 0.0
    for case, (cfg, progress) in _mask_cases().items():
        on_cpu, on_dev = copy.deepcopy(base), copy.deepcopy(base).to(device)
        sp_cpu, sp_dev = maxq.sparsify_(on_cpu, cfg, pick), maxq.sparsify_(on_dev, cfg, pick)
        if progress is not None:  # recomputes the masks at once
            sp_cpu.set_progress(progress)
            sp_dev.set_progress(progress)
        p = sp_dev.dense_fraction
        want_p = 0.5 if "mid-ramp" in case else 0.0
        assert p == want_p, f"{case}: dense fraction {p}, expected {want_p}"
        coded = any(layer.param.coded for layer in sp_dev._layers.values())
        assert coded == ("codes" in case), f"{case}: kept-index codes {'not ' if not coded else ''}held"
        for when in ("set", "after a step"):
            if when == "after a step":  # the same small update of every weight on both sides, then step()
                gen = torch.Generator().manual_seed(1)
                w_cpu, w_dev = _originals(sp_cpu), _originals(sp_dev)
                with torch.no_grad():
                    for name, w in w_cpu.items():
                        delta = 0.02 * w.abs().mean() * torch.randn(w.shape, generator=gen)
                        w.add_(delta)
                        w_dev[name].add_(delta.to(device))
                sp_cpu.step()
                sp_dev.step()
            cpu_masks = dict(sp_cpu.named_masks())
            for name, mask in sp_dev.named_masks():
                what = f"{case} {name} ({when})"
                assert mask.device.type == device.type, f"{what}: mask on {mask.device}"
                worst = max(worst, _assert_same_mask(mask, cpu_masks[name], what))
                kept = _kept_per_block(mask, cfg.m)
                dense = int((kept > cfg.n).sum())
                assert dense == int(p * kept.numel()), f"{what}: {dense} dense blocks of {kept.numel()} at p={p}"
                assert bool((kept >= cfg.n).all()), f"{what}: a block keeps fewer than {cfg.n}"
                compared += 1
    return {"layer_masks_compared": compared, "max_abs_diff": worst, "cases": list(_mask_cases())}


# -- 2. bf16 autocast + channels_last training ----------------------------------------------------------------------


def _image_model(device: torch.device) -> tuple[nn.Module, tuple[int, ...]]:
    """ResNet-50 on CUDA, the small CNN on the CPU; with the input shape to train it on."""
    torch.manual_seed(0)
    if _full_size(device):
        return torchvision.models.resnet50(num_classes=10), (8, 3, 64, 64)
    return build_model("cnn_small", 3, 10), (4, 3, 16, 16)


def check_bf16_channels_last_training(device: torch.device) -> Info:
    """Training steps under bf16 autocast with channels_last weights and inputs run, the masks stay fp32, follow
    the updated weights (equal to a fresh exact computation from contiguous weights), and the folded model is
    exactly N:M."""
    base, shape = _image_model(device)
    info: Info = {}
    for method, cfg, progress in (
        ("srste", maxq.SRSTEConfig(n=2, m=4), None),
        ("maxq", maxq.MaxQConfig(n=2, m=4, ramp=RAMP), 1.0),
    ):
        model = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last)
        sp = maxq.sparsify_(model, cfg)
        if progress is not None:
            sp.set_progress(progress)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (shape[0],), device=device)
        before = {k: w.detach().clone() for k, w in _originals(sp).items()}
        model.train()
        losses = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(x)
                loss = nn.functional.cross_entropy(out, y)
            assert out.dtype == torch.bfloat16, f"{method}: autocast output is {out.dtype}"
            loss.backward()
            sp.regularize_()
            opt.step()
            sp.step()
            losses.append(float(loss.detach()))
        assert all(torch.isfinite(torch.tensor(losses))), f"{method}: losses {losses}"
        p = sp.dense_fraction
        originals = _originals(sp)
        for name, mask in sp.named_masks():
            w = originals[name]
            assert mask.dtype == torch.float32 and w.dtype == torch.float32, f"{method} {name}: {mask.dtype}"
            assert not torch.equal(w.detach(), before[name]), f"{method} {name}: weights did not train"
            want = maxq.maxq_mask(w.detach().contiguous(), cfg.n, cfg.m, dense_fraction=p, tau=cfg.tau, soft=cfg.soft)
            _assert_same_mask(mask, want, f"{method} {name} (channels_last vs exact)")
        if method == "maxq":
            sp.set_progress(RAMP[1])
            sp.step()
        maxq.fold_(model)
        check = maxq.check_nm(model, cfg.n, cfg.m)
        assert check.ok, f"{method}: folded model is not {cfg.n}:{cfg.m}:\n{check}"
        info[f"{method}_losses"] = losses
    return info


# -- 3. torch.compile equals eager ----------------------------------------------------------------------------------


def check_compiled_equals_eager(device: torch.device) -> Info:
    """Three MaxQ training steps (mid-ramp) through ``torch.compile`` give the losses, weight updates and masks of
    eager mode, and the model compiles as one graph (``fullgraph=True``: the forward is only ``W * mask``)."""
    backend = os.environ.get("MAXQ_COMPILE_BACKEND", "inductor")
    torch.manual_seed(0)
    base = build_model("cnn_small", 3, 10)
    shape = (16, 3, 32, 32) if _full_size(device) else (4, 3, 16, 16)
    x, y = torch.randn(shape, device=device), torch.randint(0, 10, (shape[0],), device=device)
    cfg = maxq.MaxQConfig(n=2, m=4, ramp=RAMP)
    runs: dict[str, dict[str, Any]] = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base).to(device).train()
        sp = maxq.sparsify_(model, cfg)
        sp.set_progress(1.0)
        fn = torch.compile(model, backend=backend, fullgraph=True) if mode == "compiled" else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(fn(x), y)
            loss.backward()
            sp.regularize_()
            opt.step()
            sp.step()
            losses.append(loss.detach().float().cpu())
        updates = {k: (v.detach() - start[k]).cpu() for k, v in model.named_parameters()}
        runs[mode] = {"losses": torch.stack(losses), "updates": updates, "masks": dict(sp.named_masks())}
    eager, compiled = runs["eager"], runs["compiled"]
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-3, atol=1e-4)
    worst = 0.0
    for name, du in eager["updates"].items():
        rel = float((compiled["updates"][name] - du).norm() / du.norm().clamp_min(1e-12))
        worst = max(worst, rel)
        assert rel < 1e-2, f"{name}: compiled weight update differs from eager by {rel:.2e} (relative)"
    for name, mask in eager["masks"].items():
        agree = float(((compiled["masks"][name] != 0) == (mask != 0)).float().mean())
        assert agree > 0.999, f"{name}: compiled and eager masks agree on {agree:.4%} of weights"
    breaks = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
    assert breaks == 0, f"{breaks} graph break(s) with fullgraph=True"
    return {
        "backend": backend,
        "graph_breaks": breaks,
        "losses": eager["losses"].tolist(),
        "max_relative_update_diff": worst,
    }


# -- 4. no host synchronization in a training step ------------------------------------------------------------------


def _full_step(model: nn.Module, sp: maxq.Sparsifier | None, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One training step: forward and loss under bf16 autocast, backward, decay, SGD, mask update."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if sp is not None:
        sp.regularize_()
    opt.step()
    if sp is not None:
        sp.step()


def check_training_step_has_no_host_sync(device: torch.device) -> Info:
    """A whole training step (bf16 autocast, channels_last): forward, backward, ``regularize_``, the optimizer step
    and the mask update (``Sparsifier.step()``, mid-ramp for MaxQ) never makes the host wait for the device:
    ``torch.cuda.set_sync_debug_mode("error")`` on CUDA, the dispatcher watch on the CPU."""
    with host_syncs(device) as probe:
        torch.ones(2, device=device).sum().item()
    assert len(probe) == 1, f"the sync detector missed an .item(): {probe}"  # the detector itself works
    torch.manual_seed(0)
    base = build_model("resnet20" if _full_size(device) else "cnn_small", 3, 10)
    shape = (32, 3, 32, 32) if _full_size(device) else (4, 3, 16, 16)
    info: Info = {}
    configs = {
        "srste": maxq.SRSTEConfig(n=2, m=4),
        "srste 1:8 (kept-index codes)": maxq.SRSTEConfig(n=1, m=8),
        "maxq": maxq.MaxQConfig(n=2, m=4, ramp=RAMP),
    }
    for method in ("dense", *configs):
        model = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last).train()
        sp = None
        if method != "dense":
            cfg = configs[method]
            sp = maxq.sparsify_(model, cfg)
            coded = any(layer.param.coded for layer in sp._layers.values())
            assert coded == ("codes" in method), f"{method}: kept-index codes {'not ' if not coded else ''}held"
            sp.fused = False  # on the CPU: the device-agnostic path, the one CUDA tensors take
            sp.set_progress(1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (shape[0],), device=device)
        for _ in range(2):  # warm up: optimizer state, cuDNN plans, the masks' search thresholds
            _full_step(model, sp, opt, x, y)
        try:
            with host_syncs(device, fail=True):
                _full_step(model, sp, opt, x, y)
        except RuntimeError:  # HostSync on the CPU, torch's error on CUDA: list every sync of a step
            with host_syncs(device) as events:
                _full_step(model, sp, opt, x, y)
            raise AssertionError(f"{method}: {len(events)} host sync(s) in a training step: {events[:20]}") from None
        info[method] = "no host sync"
    return info


# -- 5. 2:4 acceleration --------------------------------------------------------------------------------------------


def _folded_mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))  # a ViT-B MLP block
    maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4, skip_first=False, skip_last=False))
    return maxq.fold_(model).to(device).eval()


def check_accelerate(device: torch.device) -> Info:
    """``accelerate_`` in bf16 on a 2:4 ViT-B MLP block: forced onto the sparse kernels the outputs agree with
    dense; by default a layer is swapped exactly when its measured speedup exceeds 1. The CPU refuses clearly."""
    model = _folded_mlp(device)
    x = torch.randn(4096, 768, device=device)
    if device.type != "cuda":
        try:
            maxq.accelerate_(model, x, dtype=torch.bfloat16)
        except RuntimeError as exc:
            assert "CUDA" in str(exc), f"unclear refusal: {exc}"
        else:
            raise AssertionError("accelerate_ ran on the CPU")
        rows = candidates(model, x)
        assert [r.input_shape for r in rows] == [(4096, 768), (4096, 3072)]
        return {"cpu": "refused as documented; candidate shapes recorded"}
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise SkipCheck("2:4 sparse kernels need compute capability >= 8.0")
    with torch.no_grad():
        want = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    forced = copy.deepcopy(model)
    report = maxq.accelerate_(forced, x, dtype=torch.bfloat16, min_speedup=0.0)
    assert [r.swapped for r in report.rows] == [True, True], str(report)
    with torch.no_grad():
        got = forced(x.to(torch.bfloat16)).float()
    cos = float(nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    assert cos > 0.999, f"sparse outputs differ from dense: cosine {cos}"
    chosen = maxq.accelerate_(copy.deepcopy(model), x, dtype=torch.bfloat16)
    for r in chosen.rows:
        assert r.swapped == (r.speedup is not None and r.speedup > 1.0), f"{r.name}: {r}"
    return {"cosine": cos, "speedups": {r.name: r.speedup for r in chosen.rows}}


#: every check, in the order the runner reports them.
CHECKS: list[Callable[[torch.device], Info]] = [
    check_masks_match_cpu,
    check_bf16_channels_last_training,
    check_compiled_equals_eager,
    check_training_step_has_no_host_sync,
    check_accelerate,
]
