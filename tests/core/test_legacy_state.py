"""Sparsifier states written by maxq 0.2 (whole float masks, format ``maxq.sparsifier/2``) still load, and a run
resumed from one continues exactly as the old version continued it (``data/legacy_state_v2.pt``, written by maxq
0.2.0 at commit b711a14 on one torch thread: three steps, the state, three more steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import maxq

from ..conftest import one_thread
from ..nets import small_cnn
from . import frozen_runs

_DATA = torch.load(Path(__file__).parent / "data" / "legacy_state_v2.pt", weights_only=False)
# The file was written on the platform of the first frozen recording (the one without a probe).
_WRITER = frozen_runs._load()["recordings"][0]["environment"]
_SAME_MACHINE = (frozen_runs.recording() or {}).get("environment") == _WRITER


@pytest.mark.parametrize("name", sorted(_DATA["runs"]))
def test_a_state_of_maxq_0_2_resumes_the_run_it_came_from(name):
    with one_thread():  # as the file was written
        _resume(name)


def _resume(name: str) -> None:
    run = _DATA["runs"][name]
    saved = run["saved"]
    assert saved["sparsifier"]["format"] == "maxq.sparsifier/2"
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    model = small_cnn(8)
    sp = maxq.sparsify_(model, maxq.make_config(run["method"], **run["options"]))
    model.load_state_dict(saved["model"])
    sp.load_state_dict(saved["sparsifier"])
    for layer, mask in sp.named_masks():  # the masks the old run's next forward used, bit for bit
        assert torch.equal(mask, saved["sparsifier"]["layers"][layer]["mask"]), layer
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(saved["optimizer"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    losses = []
    for step in range(3, 6):
        sp.set_progress(step / 3)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sp.regularize_()
        opt.step()
        sp.step()
        losses.append(float(loss.detach()).hex())
    masks = dict(sp.named_masks())
    if _SAME_MACHINE:  # float results are platform-specific; the masks' kept sets are not
        assert losses == run["losses"][3:]
        assert all(torch.equal(masks[k], v) for k, v in run["final_masks"].items())
    else:
        for k, v in run["final_masks"].items():
            assert torch.equal(masks[k] != 0, v != 0), k
    assert all(not layer.param.materialized for layer in sp._layers.values())  # lean again after an update


def test_an_unknown_state_format_says_what_it_is():
    sp = maxq.sparsify_(small_cnn(8), maxq.SRSTEConfig())
    with pytest.raises(ValueError, match=r"format 'maxq\.sparsifier/9'"):
        sp.load_state_dict({"format": "maxq.sparsifier/9"})
