"""maxq: N:M sparse training with MaxQ (Xiang et al., CVPR 2024) and its baselines, for unmodified PyTorch models.

Convention: **N:M keeps N of every M** weights, in blocks of M consecutive input channels (SPEC §1).

Quick use::

    import maxq
    sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(n=2, m=4, ramp=(0, 30)))
    for epoch in range(epochs):
        sparsifier.set_progress(epoch)
        for x, y in loader:
            loss = criterion(model(x), y); loss.backward()
            sparsifier.regularize_(); optimizer.step(); optimizer.zero_grad()
    maxq.fold_(model)
    assert maxq.check_nm(model, 2, 4).ok
"""

from .accelerate import accelerate_
from .bnfold import fold_batchnorm_
from .check import LayerCheck, NMCheck, check_nm
from .compress import load_compressed, save_compressed
from .config import CONFIGS, MaxQConfig, NMConfig, OneShotConfig, SRSTEConfig, make_config
from .fold import fold_, nm_layout
from .layers import select_layers
from .masks import hard_mask, maxq_mask
from .nm import nm_mask, parse_nm
from .schedules import SCHEDULES, dense_fraction
from .sparsifier import Report, Sparsifier, sparsify_

__version__ = "0.1.0"

__all__ = [
    "CONFIGS",
    "SCHEDULES",
    "LayerCheck",
    "MaxQConfig",
    "NMCheck",
    "NMConfig",
    "OneShotConfig",
    "Report",
    "SRSTEConfig",
    "Sparsifier",
    "__version__",
    "accelerate_",
    "check_nm",
    "dense_fraction",
    "fold_",
    "fold_batchnorm_",
    "load_compressed",
    "save_compressed",
    "hard_mask",
    "make_config",
    "maxq_mask",
    "nm_layout",
    "nm_mask",
    "parse_nm",
    "select_layers",
    "sparsify_",
]
