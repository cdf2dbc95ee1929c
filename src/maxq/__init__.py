"""maxq: N:M sparse training with MaxQ (Xiang et al., CVPR 2024) and its baselines, for unmodified PyTorch models.

Convention: **N:M keeps N of every M** weights, in blocks of M consecutive input channels (METHOD.md §1).

Quick use:

```python
import maxq
sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(n=2, m=4, ramp=(0, 30)))
for epoch in range(epochs):
    sparsifier.set_progress(epoch)
    for x, y in loader:
        loss = criterion(model(x), y); loss.backward()
        sparsifier.regularize_(); optimizer.step(); optimizer.zero_grad()
        sparsifier.step()                   # masks from the updated weights (outside the forward)
maxq.fold_(model)
assert maxq.check_nm(model, 2, 4).ok
```
"""

from ._compat import install as _install_aliases
from .calibrate import CalibrationConfig, CalibrationReport, calibrate_
from .core.check import LayerCheck, NMCheck, check_nm
from .core.config import CONFIGS, MaxQConfig, NMConfig, OneShotConfig, SRSTEConfig, make_config
from .core.fold import fold_, nm_layout
from .core.layers import select_layers
from .core.masks import hard_mask, maxq_mask
from .core.nm import nm_mask, parse_nm
from .core.schedules import SCHEDULES, dense_fraction
from .core.sparsifier import Report, Sparsifier, sparsify_
from .deploy.accelerate import accelerate_
from .deploy.bnfold import fold_batchnorm_
from .deploy.compress import load_compressed, save_compressed

__version__ = "0.2.0"

_install_aliases()

__all__ = [
    "CONFIGS",
    "CalibrationConfig",
    "CalibrationReport",
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
    "calibrate_",
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
