"""msn.architectures: the one table every encoder size and name derives from."""

import timm

from msn.architectures import ARCHITECTURES, HEADS_BY_WIDTH, PUBLISHED, TIMM_NAMES, arch_for_width
from msn.config import ModelConfig
from msn.models import build_vit


def test_derived_tables_follow_the_architectures():
    assert HEADS_BY_WIDTH == {192: 3, 384: 6, 768: 12, 1024: 16}
    assert set(TIMM_NAMES.values()) == {f"{name}_patch16_224" for name in PUBLISHED}
    for name, dims in ARCHITECTURES.items():
        assert arch_for_width(dims["embed_dim"]) == name
        assert dims["embed_dim"] % dims["num_heads"] == 0
    assert arch_for_width(64) == "vit_mini"  # other widths: the override-friendly base
    assert ModelConfig().arch in ARCHITECTURES


def test_timm_names_are_timm_models_of_that_width_and_head_count():
    for width, name in TIMM_NAMES.items():
        assert timm.is_model(name), name
        model = timm.create_model(name, pretrained=False, depth=1, num_classes=0)
        assert model.embed_dim == width and model.blocks[0].attn.num_heads == HEADS_BY_WIDTH[width], name


def test_builder_uses_the_table():
    vit = build_vit("vit_tiny", 16, 32, depth=1).vit
    assert vit.embed_dim == 192 and vit.blocks[0].attn.num_heads == 3
