"""Weight import/export: our checkpoints <-> timm <-> transformers ViTMSN <-> reference files."""

from msn.export.loading import LoadedBackbone, load_backbone

__all__ = ["LoadedBackbone", "load_backbone"]
