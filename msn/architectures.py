"""The one table of ViT architectures (bottom floor: imports nothing from ``msn``).

Everything that names or sizes an encoder derives from :data:`ARCHITECTURES`: the model
builder (:func:`msn.models.build_vit`), config validation (``model.arch``), the head-count
inference of the weight loaders and the timm names written by the exporter.
"""

from __future__ import annotations

#: Widths, depths and heads of the standard ViT sizes (Dosovitskiy et al.; DeiT), plus a
#: narrow 6-block ViT for 28-32 px images on CPUs.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

#: The published sizes: their width alone tells the head count of a foreign weight file.
PUBLISHED = ("vit_tiny", "vit_small", "vit_base", "vit_large")

#: Head count by width of the published sizes (192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16).
HEADS_BY_WIDTH: dict[int, int] = {ARCHITECTURES[n]["embed_dim"]: ARCHITECTURES[n]["num_heads"] for n in PUBLISHED}

#: timm registry name by width of the published sizes (``vit_small_patch16_224``, ...); an
#: export's ``model_args`` always give the real patch, size, depth and heads.
TIMM_NAMES: dict[int, str] = {ARCHITECTURES[n]["embed_dim"]: f"{n}_patch16_224" for n in PUBLISHED}


def arch_for_width(embed_dim: int) -> str:
    """The architecture name of a width (``vit_mini``, the override-friendly base, otherwise)."""
    for name, dims in ARCHITECTURES.items():
        if dims["embed_dim"] == embed_dim:
            return name
    return "vit_mini"
