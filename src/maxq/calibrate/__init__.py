"""Calibrated one-shot N:M pruning of a trained model: Wanda and SparseGPT (and magnitude, their baseline).

    report = maxq.calibrate_(model, calibration_loader, method="sparsegpt", n=2, m=4, batches=32)
    sparsifier = maxq.sparsify_(model, maxq.OneShotConfig(n=2, m=4))   # fine-tune with the calibrated mask fixed

Layout: pure functions on a layer's ``[O, D]`` weight below (``magnitude.py``, ``wanda.py``, ``sparsegpt.py``),
the layer-as-matrix views (``columns.py``) and input statistics (``stats.py``) beside them, the driver that walks
the model on top (``driver.py``); the config in ``config.py``.
"""

from .columns import input_columns, weight_columns, write_columns_
from .config import CALIBRATION_METHODS, CalibrationConfig, calibration_for
from .driver import CalibrationReport, LayerCalibration, calibrate_, default_forward
from .magnitude import magnitude_prune
from .sparsegpt import inverse_hessian_factor, sparsegpt_prune
from .stats import InputStats
from .wanda import wanda_prune, wanda_scores

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationConfig",
    "CalibrationReport",
    "InputStats",
    "LayerCalibration",
    "calibrate_",
    "calibration_for",
    "default_forward",
    "input_columns",
    "inverse_hessian_factor",
    "magnitude_prune",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
    "weight_columns",
    "write_columns_",
]
