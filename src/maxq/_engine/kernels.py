"""Optional fused CPU kernels (``csrc/maxq_cpu.cpp``), compiled on first use with ``torch.utils.cpp_extension``
and registered as ``torch.library`` custom ops (``torch.ops.maxq.*``) with fake kernels, so ``torch.compile``
traces through code that calls them instead of breaking the graph.

Eager PyTorch needs about thirty passes over memory per layer and step for the MaxQ mask; the fused kernels
need about five, which is what keeps CPU training overhead small. They are an accelerator only: every result is
identical (hard masks, order statistics) or equal to float rounding (soft scales) to the eager path, and the
eager path runs wherever they are unavailable (no C++ compiler, CUDA tensors, other dtypes).

Set ``MAXQ_CPU_KERNELS=0`` to turn them off. The build (about 30 s, logged while it runs) goes to torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), once per machine for each
version of the kernel source and of torch: every checkout and venv with those versions loads the same build.
"""

# No `from __future__ import annotations` here: torch 2.4 infers the custom ops' schemas from annotations
# that must be types, not strings (later releases resolve strings too).

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

__all__ = ["cpu_kernels", "decay_", "kernels_enabled", "same_walk"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "maxq_cpu.cpp"
_state: dict[str, ModuleType | None] = {}


def kernels_enabled() -> bool:
    """False when ``MAXQ_CPU_KERNELS`` is set to ``0``/``false``/``off``."""
    return os.environ.get("MAXQ_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def _isa_flags() -> tuple[str, list[str]]:
    """Vector ISA flags this CPU supports (the build is per machine: the cache key includes the tag)."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        if "avx2" in flags and "fma" in flags:
            return "avx2", ["-mavx2", "-mfma"]
        return "sse", []
    return platform.machine().lower() or "generic", []


def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module, building it on first call; ``None`` if disabled or the build fails."""
    if not kernels_enabled():
        return None
    if "module" in _state:
        return _state["module"]
    module = None
    try:
        # torch's CUDA builds warn about a missing CUDA runtime on import here; irrelevant for a CPU build.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        module = _load_or_build()
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the eager path still works
        # One line (a failed build's message is the whole compiler output: that goes to the debug log).
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        log.warning(
            "maxq: fused CPU kernels unavailable (%s: %s); using the eager PyTorch path (same results, slower)",
            type(exc).__name__,
            reason if len(reason) <= 160 else reason[:157] + "...",
        )
        log.debug("maxq: fused CPU kernel build failed", exc_info=True)
        module = None
    if module is not None:
        _register_ops(module)
    _state["module"] = module
    return module


# -- the build cache ---------------------------------------------------------------------------------------------
# One build per (kernel source, torch version, Python ABI, compiler flags, CPU), shared by every checkout and venv
# on the machine. torch's ninja build reruns whenever its command line changes, and that line holds the source's
# path and the venv's include paths: built straight from a checkout, two checkouts (or venvs) of the same source
# would rebuild each other's module on every start. So the source is copied to a content-addressed folder in the
# cache and built from there, and a module already built is imported directly, without asking ninja.

#: seconds between "still building" log lines during a build
BUILD_HEARTBEAT_S = 10.0
_CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
#: written into the build folder once a build has finished; only then is its library imported directly
BUILT_STAMP = "maxq-built"
_LDFLAGS = ["-fopenmp"]


def _build_name(tag: str, flags: list[str]) -> str:
    """The module's name: a digest of everything its binary depends on (the cache key)."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    abi = f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}"
    for part in (torch.__version__, abi, platform.machine(), *_CFLAGS, *flags, *_LDFLAGS):
        digest.update(b"\0" + part.encode())
    return f"maxq_cpu_{digest.hexdigest()[:12]}_{tag}"


def _build_dir(name: str) -> Path:
    """torch's extension cache folder for ``name`` (``TORCH_EXTENSIONS_DIR``, else a per-user folder); made if
    missing."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _expected_build_dir(name: str) -> Path | None:
    """Where `_build_dir` puts ``name``, worked out without importing ``torch.utils.cpp_extension``: that import
    pulls in setuptools and distutils (about 100 modules, 4-6 MiB resident), a fixed cost every training process
    would pay only to find a library built before. ``None`` where this torch's layout is unknown; a wrong guess
    only sends the caller to the full path (`_build_dir`), never to a wrong library."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root) / name
    try:  # torch's own rule (cpp_extension.get_default_build_root and _get_build_directory), torch 2.4 to 2.14
        from torch import _appdirs

        base = os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
    except Exception:
        return None
    hip, cuda = getattr(torch.version, "hip", None), torch.version.cuda
    accelerator = f"rocm{hip.replace('.', '')}" if hip else f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(base) / f"{python}_{accelerator}" / name


def _library(build_dir: Path, name: str) -> Path:
    return build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


def _stage_source(build_dir: Path) -> Path:
    """The kernel source, copied (atomically) into the build folder: the same path for every checkout."""
    staged = build_dir / "source" / _SOURCE.name
    data = _SOURCE.read_bytes()
    if not staged.is_file() or staged.read_bytes() != data:
        staged.parent.mkdir(parents=True, exist_ok=True)
        tmp = staged.with_name(f".{staged.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, staged)
    return staged


def _import_built(name: str, library: Path) -> ModuleType:
    """Import an extension module built before (what torch's ``load`` does once its build has nothing to do)."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _heartbeat(what: str) -> Iterator[None]:
    """Log ``still {what} (N s)`` every `BUILD_HEARTBEAT_S` seconds until the block ends, then the time."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(BUILD_HEARTBEAT_S):
            log.info("maxq: still %s (%.0f s)", what, time.monotonic() - started)

    thread = threading.Thread(target=beat, name="maxq-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.info("maxq: done %s in %.0f s", what, time.monotonic() - started)


def _load_or_build() -> ModuleType:
    """The kernel module from the cache, built first if this machine has no build of this source yet."""
    tag, flags = _isa_flags()
    name = _build_name(tag, flags)
    expected = _expected_build_dir(name)
    if expected is not None and (expected / BUILT_STAMP).is_file() and _library(expected, name).is_file():
        log.debug("maxq: loading the fused CPU kernels built before (%s)", expected)
        return _import_built(name, _library(expected, name))
    build_dir = _build_dir(name)
    library, stamp = _library(build_dir, name), build_dir / BUILT_STAMP
    if library.is_file() and stamp.is_file():  # the stamp comes after the build: never a half-written library
        log.debug("maxq: loading the fused CPU kernels built before (%s)", library)
        return _import_built(name, library)
    from torch.utils.cpp_extension import load

    source = _stage_source(build_dir)
    log.info(
        "maxq: building the fused CPU kernels into %s (about 30 s, once per machine for this maxq and torch "
        "version; MAXQ_CPU_KERNELS=0 skips them)",
        build_dir,
    )
    with _heartbeat("building the fused CPU kernels"):
        module = load(
            name=name,
            sources=[str(source)],
            extra_cflags=[*_CFLAGS, *flags],
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            verbose=False,
        )
    stamp.write_text(f"{library.name}\n")
    return module


# The schemas the kernels are registered under; ``(a!)``: an argument the op writes.
_SCHEMAS = {
    "mask_": "mask_(Tensor w, Tensor(a!)? mask, Tensor(b!) state, SymInt n, SymInt m, bool soft, float tau, "
    "SymInt dense_count, SymInt order, Tensor? priority, Tensor(c!)? planes, Tensor(d!)? thr) -> Tensor",
    "apply_": "apply_(Tensor w, Tensor planes, Tensor? thr, bool soft, float tau, SymInt weighted, Tensor(a!) out, "
    "SymInt n, SymInt m) -> ()",
    "decay_": "decay_(Tensor(a!) grad, Tensor w, Tensor mask, float lam) -> ()",
    "decay_bits_": "decay_bits_(Tensor(a!) grad, Tensor w, Tensor planes, float lam) -> ()",
    "mask_grad_": "mask_grad_(Tensor(a!) grad, Tensor planes) -> ()",
    "decode_kept_": "decode_kept_(Tensor code, Tensor(a!) planes, SymInt n, SymInt m, SymInt length, "
    "SymInt kernel) -> ()",
    "encode_kept_": "encode_kept_(Tensor planes, Tensor(a!) code, SymInt n, SymInt m, SymInt length, "
    "SymInt kernel) -> ()",
}
_LIBRARY: list[torch.library.Library] = []  # the ops live as long as their Library object


def _bumping(kernel: Callable[..., Any], writes: tuple[int, ...]) -> Callable[..., Any]:
    """``kernel``, then a version bump of each argument it writes (at ``writes``), as PyTorch's own in-place ops
    do: autograd then sees a weight, mask or state changed after a forward saved it."""

    def impl(*args: Any) -> Any:
        result = kernel(*args)
        for i in writes:
            t = args[i]
            if t is not None and not t.is_inference():
                increment_version(t)
        return result

    return impl


def same_walk(a: Tensor, b: Tensor) -> bool:
    """Same shape, and the same strides wherever a size is not 1 (the fused kernels walk both alike)."""
    return a.shape == b.shape and all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _any_out_layout(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_`` for an ``out`` laid out unlike the weight: the kernel walks both alike, so it writes a tensor with
    the weight's strides, copied into ``out``. A compiler may hand the op such an ``out`` (PyTorch 2.4's inductor
    lays out the tensor it functionalizes as it prefers: channels_last for a conv weight); eager calls never do."""

    def impl(w, planes, thr, soft, tau, weighted, out, n, m):
        if same_walk(out, w):
            return kernel(w, planes, thr, soft, tau, weighted, out, n, m)
        walk = torch.empty_strided(w.shape, w.stride(), dtype=out.dtype, device=out.device)
        kernel(w, planes, thr, soft, tau, weighted, walk, n, m)
        out.copy_(walk)
        return None

    return impl


def _register_ops(ext: ModuleType) -> None:
    """``torch.ops.maxq.*``: the kernels as custom ops (CPU implementations + shape-only fake kernels).

    Defined with ``torch.library.Library`` rather than the ``torch.library.custom_op`` decorator: that one wraps each
    implementation so its first call imports ``torch._dynamo`` (about 1 s in a process that folds, evaluates or
    exports: ``torch.optim`` imports it anyway), and each call costs about 3 times as much. The CPU kernel bumps the
    version of every ``(a!)`` argument (`_bumping`), and ``torch.compile`` sees each op, with its fake kernel, as one
    node."""
    if hasattr(torch.ops.maxq, "mask_grad_"):
        return  # already registered in this process
    lib = torch.library.Library("maxq", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        arguments = getattr(torch.ops.maxq, name).default._schema.arguments
        writes = tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
        kernel = _any_out_layout(ext.apply_) if name == "apply_" else getattr(ext, name)
        lib.impl(name, _bumping(kernel, writes), "CPU")

    def mask_fake(w, mask, state, n, m, soft, tau, dense_count, order, priority, planes, thr):
        return w.new_empty(3, dtype=torch.int64)

    def no_output(*args):
        return None

    for name in _SCHEMAS:
        torch.library.register_fake(f"maxq::{name}", mask_fake if name == "mask_" else no_output, lib=lib)
    _LIBRARY.append(lib)


def _fusable(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def decay_(grad: Tensor, weight: Tensor, mask: Tensor, lam: float) -> bool:
    """``grad += lam * weight * [mask == 0]`` with the fused kernel, if it applies; returns whether it ran."""
    if not (_fusable(grad) and _fusable(weight) and _fusable(mask)) or cpu_kernels() is None:
        return False
    torch.ops.maxq.decay_(grad, weight.detach(), mask, lam)
    return True
