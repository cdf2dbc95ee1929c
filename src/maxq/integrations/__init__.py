"""maxq inside the training loops users already run.

* :mod:`maxq.integrations.lightning` -- ``MaxQCallback`` for PyTorch Lightning (extra: ``maxq[lightning]``).
* :mod:`maxq.integrations.hf` -- ``MaxQCallback`` for the Hugging Face ``Trainer`` (extra: ``maxq[hf]``).

Both drive a :class:`~maxq.Sparsifier` through :class:`~maxq.core.stepping.OptimizerSteps` (the one owner of
what happens around an optimizer step) and share the lifecycle below. Neither framework is imported by
``import maxq`` or by this package; only by the submodule you import.
"""
