"""Masked Siamese Networks (Assran et al., 2022, arXiv:2204.07141) in PyTorch.

Sub-packages own one concern each: ``msn.models`` (encoder, head, prototypes),
``msn.masking`` (token drop), ``msn.losses`` (the MSN objective), ``msn.data``
(datasets and multi-view augmentation), ``msn.train`` (optimisation loop),
``msn.checkpoint`` (atomic save/resume) and ``msn.metrics_log`` (metrics, wandb, progress).
"The reference" in the docstrings is the authors' code, named in docs/method.md Sec. 0.
"""

from msn.version import __version__  # noqa: F401 (re-exported)

#: The Python API (:mod:`msn.api`), imported on first use so that ``import msn`` stays light.
_API = ("pretrain", "load_backbone", "lowshot", "Backbone")


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("msn.api"), name)
    raise AttributeError(f"module 'msn' has no attribute {name!r}")
