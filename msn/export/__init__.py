"""Weight import/export: our checkpoints <-> timm <-> transformers ViTMSN <-> reference files.

* :func:`load_backbone`: one loader for every source (evaluation, export).
* :func:`load_init_weights` + :func:`apply_init`: ``init_from=PATH`` for a fresh run.
* :func:`export`: write ``hf`` / ``timm`` / ``msn`` folders (also ``msn-export``).
"""

from msn.export.cli import export
from msn.export.loading import (
    HEADS_BY_WIDTH,
    InitWeights,
    LoadedBackbone,
    WeightsMismatchError,
    apply_init,
    load_backbone,
    load_init_weights,
)

__all__ = [
    "HEADS_BY_WIDTH",
    "InitWeights",
    "LoadedBackbone",
    "WeightsMismatchError",
    "apply_init",
    "export",
    "load_backbone",
    "load_init_weights",
]
