"""Weight import/export: our checkpoints <-> timm <-> transformers ViTMSN <-> the authors' files.

* :data:`FORMATS`: the one table of formats (docs/formats.md Sec. 7); importing this
  package also registers timm's ``vit_msn`` (:mod:`msn.export.timm_format`).
* :func:`load_backbone`: one loader for every format (evaluation, export).
* :func:`load_init_weights` + :func:`apply_init`: ``init_from=PATH`` for a fresh run.
* :func:`export`: write the ``hf`` / ``timm`` / ``msn`` folders (also ``msn-export``).
"""

from msn.architectures import HEADS_BY_WIDTH
from msn.export.cli import export
from msn.export.formats import FORMATS
from msn.export.loading import apply_init, load_backbone, load_init_weights
from msn.export.weight_types import Format, InitWeights, LoadedBackbone, WeightsMismatchError

__all__ = [
    "FORMATS",
    "HEADS_BY_WIDTH",
    "Format",
    "InitWeights",
    "LoadedBackbone",
    "WeightsMismatchError",
    "apply_init",
    "export",
    "load_backbone",
    "load_init_weights",
]
