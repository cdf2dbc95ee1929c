"""The smoke run of tests/test_wheel.py, executed by the *installed* maxq, from outside the source tree.

Prints one JSON line: where maxq was imported from, whether the fused kernel ran, the warnings seen, the check.
Usage: python wheel_smoke.py OUT_DIR
"""

import json
import logging
import sys
import warnings
from pathlib import Path

out = Path(sys.argv[1])
records: list[logging.LogRecord] = []


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        records.append(record)


logging.getLogger().addHandler(_Keep(logging.WARNING))
heavy = ("pytest", "hypothesis", "ruff", "onnx", "onnxruntime", "lightning", "transformers", "mkdocs", "build")

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from torch import nn

    import maxq
    from maxq._engine.kernels import cpu_kernels

    dev_only = sorted(m for m in heavy if m in sys.modules)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip
    sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(n=2, m=4, ramp=(0, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for epoch in range(3):
        sparsifier.set_progress(epoch)
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            sparsifier.regularize_()
            optimizer.step()
            sparsifier.step()
            losses.append(loss.item())
    layers = list(maxq.nm_layout(model).layers)
    maxq.fold_(model)
    check = maxq.check_nm(model, 2, 4)
    maxq.save_compressed(model.state_dict(), out / "model.maxq", 2, 4, layers)

print(
    json.dumps(
        {
            "maxq_file": maxq.__file__,
            "version": maxq.__version__,
            "fused": cpu_kernels() is not None,
            "dev_only_imported": dev_only,
            "log_warnings": [r.getMessage().splitlines()[0] for r in records],
            "log_warning_lines": sum(len(r.getMessage().splitlines()) for r in records),
            "py_warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
            "layers": layers,
            "nm_ok": check.ok,
            "finite": all(map(lambda v: v == v, losses)),
        }
    )
)
