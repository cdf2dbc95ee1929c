"""Optional fused CPU kernels (``csrc/maxq_cpu.cpp``), compiled on first use with ``torch.utils.cpp_extension``.

Eager PyTorch needs about thirty passes over memory per layer and step for the MaxQ mask; the fused kernels
need about five, which is what keeps CPU training overhead small. They are an accelerator only: every result is
identical (hard masks, order statistics) or equal to float rounding (soft scales) to the eager path, and the
eager path runs wherever they are unavailable (no C++ compiler, CUDA tensors, other dtypes).

Set ``MAXQ_CPU_KERNELS=0`` to turn them off. The build (about 30 s, once per machine) goes to torch's extension
cache (``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from types import ModuleType

__all__ = ["cpu_kernels", "kernels_enabled"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "maxq_cpu.cpp"
_VERSION = 1
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
        from torch.utils.cpp_extension import load

        tag, flags = _isa_flags()
        log.info("maxq: loading fused CPU kernels (first build takes about 30 s)")
        module = load(
            name=f"maxq_cpu_v{_VERSION}_{tag}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the eager path still works
        log.warning("maxq: fused CPU kernels unavailable (%s); using the eager PyTorch path", exc)
        module = None
    _state["module"] = module
    return module
