"""maxq inside the training loops users already run.

* `maxq.integrations.lightning` -- ``MaxQCallback`` for PyTorch Lightning (extra: ``maxq[lightning]``).
* `maxq.integrations.hf` -- ``MaxQCallback`` for the Hugging Face ``Trainer`` (extra: ``maxq[hf]``).

Both drive a [`Sparsifier`][maxq.Sparsifier] through [`OptimizerSteps`][maxq.core.stepping.OptimizerSteps] (the one
owner of what happens around an optimizer step) and share the lifecycle below. Neither framework is imported by
``import maxq`` or by this package; only by the submodule you import.
"""
