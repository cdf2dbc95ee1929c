"""Old flat module paths (``maxq.trainer``, ``maxq.nm``, ...) as aliases of their new homes.

maxq 0.1 kept every module directly under ``maxq/``; they now live in ``core/``, ``_engine/``, ``deploy/`` and
``train/``. ``import maxq.trainer`` still works (the same module object as ``maxq.train.loop``) and warns once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

#: old module name -> new module name (both relative to ``maxq``).
MOVED = {
    **{
        m: f"core.{m}"
        for m in [
            "nm",
            "queries",
            "schedules",
            "masks",
            "config",
            "layers",
            "parametrization",
            "sparsifier",
            "fold",
            "check",
        ]
    },
    "reference": "core.reference",
    "workspace": "_engine.workspace",
    "kernels": "_engine.kernels",
    **{m: f"deploy.{m}" for m in ["bnfold", "compress", "onnx_export", "accelerate", "artifacts", "verify"]},
    **{m: f"train.{m}" for m in ["recipe", "data", "models", "plots", "checkpoint"]},
    "trainer": "train.loop",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != "maxq" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"maxq.{MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path will go away", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the module is already executed under its new name
        return None


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
