"""The one table of ViT architectures and model presets (bottom floor: imports nothing from ``msn``).

Everything that names or sizes an encoder derives from :data:`ARCHITECTURES` and
:data:`MODELS`: the model builder (:func:`msn.models.build_vit`), config validation
(``model.name``, ``model.arch``), the Hydra model group (``configs/model/NAME.yaml`` holds
only the name), the benchmark's models, the head-count inference of the weight loaders and
the timm and transformers names written by the exporters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Widths, depths and heads of the standard ViT sizes (Dosovitskiy et al.; DeiT), plus a
#: narrow 6-block ViT for 28-32 px images on CPUs.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass(frozen=True)
class ModelPreset:
    """A named encoder: an architecture at a patch size (``configs/model/NAME.yaml``)."""

    arch: str  #: a key of :data:`ARCHITECTURES`
    patch_size: int  #: patch side in pixels
    hub_name: Optional[str] = None  #: the authors' weights on the Hugging Face hub (docs/method.md Sec. 6)


#: The model presets; ``model=NAME`` on the command line picks one.
MODELS: dict[str, ModelPreset] = {
    "vit_mini_4": ModelPreset("vit_mini", 4),
    "vit_mini_7": ModelPreset("vit_mini", 7),
    "vit_tiny_16": ModelPreset("vit_tiny", 16),
    "vit_small_16": ModelPreset("vit_small", 16, "facebook/vit-msn-small"),
    "vit_base_16": ModelPreset("vit_base", 16, "facebook/vit-msn-base"),
    "vit_base_8": ModelPreset("vit_base", 8),
    "vit_base_4": ModelPreset("vit_base", 4, "facebook/vit-msn-base-4"),
    "vit_large_16": ModelPreset("vit_large", 16, "facebook/vit-msn-large"),
    "vit_large_7": ModelPreset("vit_large", 7, "facebook/vit-msn-large-7"),
}

#: The published sizes: their width alone tells the head count of a foreign weight file.
PUBLISHED = ("vit_tiny", "vit_small", "vit_base", "vit_large")

#: Head count by width of the published sizes (192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16).
HEADS_BY_WIDTH: dict[int, int] = {ARCHITECTURES[n]["embed_dim"]: ARCHITECTURES[n]["num_heads"] for n in PUBLISHED}


def arch_for_width(embed_dim: int) -> str:
    """The architecture name of a width (``vit_mini``, the override-friendly base, otherwise)."""
    for name, dims in ARCHITECTURES.items():
        if dims["embed_dim"] == embed_dim:
            return name
    return "vit_mini"


def published_arch(embed_dim: int, depth: int, num_heads: int) -> Optional[str]:
    """The published size with exactly these dimensions, or ``None``."""
    for name in PUBLISHED:
        if ARCHITECTURES[name] == dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads):
            return name
    return None


def timm_candidates(embed_dim: int, depth: int, num_heads: int, patch_size: int, image_size: int) -> list[str]:
    """timm registry names that describe this encoder truthfully, best first.

    timm names a ViT ``{size}_patch{P}_{S}``. The exact name comes first; the same size and
    patch at 224 px second (timm itself builds other image sizes of a model from its 224 px
    entry with ``img_size``). Shapes of no published size have none: timm registers no such
    model, and the caller must say so rather than borrow a wrong name.
    """
    arch = published_arch(embed_dim, depth, num_heads)
    if arch is None:
        return []
    names = [f"{arch}_patch{patch_size}_{image_size}", f"{arch}_patch{patch_size}_224"]
    return list(dict.fromkeys(names))


#: ``model.pos_embed`` choices: ``learned`` (the reference and timm: a trained table) or
#: ``sincos`` (a fixed 2-D sine-cosine table, msn.models.vit.sincos_pos_embed).
POS_EMBEDS = ("learned", "sincos")

#: The range of each architecture field a weights file or its config may state (widest known
#: ViTs, ViT-G/14 and ViT-22B's depth aside, with room): a file asking for more is refused before
#: any module is built (a stated ``depth: 400`` would otherwise build 400 blocks first).
ARCHITECTURE_LIMITS: dict[str, tuple[float, float]] = {
    "embed_dim": (1, 4096),
    "depth": (1, 64),
    "num_heads": (1, 64),
    "mlp_ratio": (0.25, 16.0),
    "patch_size": (1, 64),
    "image_size": (1, 2048),
    "hidden_dim": (1, 16384),
    "output_dim": (1, 16384),
    "num_prototypes": (2, 1 << 20),
}


#: Each field in range is not enough: their product is what costs. At most this many patch
#: tokens per image (a 1,024 px image with patch 8) ...
MAX_TOKENS = 16384
#: ... and this many parameters in encoder, head and prototypes (ViT-G/14 has 1.8 G).
MAX_PARAMETERS = 2_000_000_000


def parameter_estimate(fields: dict) -> int:
    """Parameters of the encoder blocks, head and prototypes these fields describe (missing
    fields count nothing): per block ``(4 + 2 * mlp_ratio) * embed_dim^2``, the head's three
    layers, ``num_prototypes * output_dim``."""
    width, hidden, output = (int(fields.get(key) or 0) for key in ("embed_dim", "hidden_dim", "output_dim"))
    blocks = int(fields.get("depth") or 0) * (4 + 2 * float(fields.get("mlp_ratio") or 4.0)) * width**2
    head = width * hidden + hidden * hidden + hidden * output
    return int(blocks + head + int(fields.get("num_prototypes") or 0) * output)


def out_of_range(fields: dict) -> Optional[str]:
    """``key=value (allowed lo..hi)`` for the first field outside :data:`ARCHITECTURE_LIMITS`
    (non-numbers included), then the token count and :func:`parameter_estimate` against
    :data:`MAX_TOKENS` and :data:`MAX_PARAMETERS`; ``None`` when everything is in range."""
    for key, (low, high) in ARCHITECTURE_LIMITS.items():
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            return f"{key}={value!r} (allowed {low:g}..{high:g})"
    if fields.get("image_size") and fields.get("patch_size"):
        tokens = (int(fields["image_size"]) // int(fields["patch_size"])) ** 2
        if tokens > MAX_TOKENS:
            return f"{tokens} patch tokens per image (image_size / patch_size squared; allowed up to {MAX_TOKENS})"
    parameters = parameter_estimate(fields)
    if parameters > MAX_PARAMETERS:
        return f"about {parameters / 1e9:.1f} G parameters (allowed up to {MAX_PARAMETERS / 1e9:g} G)"
    return None
