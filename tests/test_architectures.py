"""msn.architectures: the one table every encoder size and name derives from."""

import timm

from msn.architectures import ARCHITECTURES, HEADS_BY_WIDTH, MODELS, PUBLISHED, arch_for_width, published_arch, timm_candidates
from msn.config import ModelConfig
from msn.models import build_vit


def test_derived_tables_follow_the_architectures():
    assert HEADS_BY_WIDTH == {192: 3, 384: 6, 768: 12, 1024: 16}
    for name, dims in ARCHITECTURES.items():
        assert arch_for_width(dims["embed_dim"]) == name
        assert dims["embed_dim"] % dims["num_heads"] == 0
    assert arch_for_width(64) == "vit_mini"  # other widths: the override-friendly base
    assert ModelConfig().apply_preset().arch in ARCHITECTURES
    assert all(preset.arch in ARCHITECTURES for preset in MODELS.values())


def test_timm_candidates_are_timm_models_of_that_width_and_head_count():
    for name in PUBLISHED:
        dims = ARCHITECTURES[name]
        assert published_arch(**dims) == name
        candidates = timm_candidates(dims["embed_dim"], dims["depth"], dims["num_heads"], 16, 224)
        assert candidates == [f"{name}_patch16_224"]
        assert timm.is_model(candidates[0]), candidates
        model = timm.create_model(candidates[0], pretrained=False, depth=1, num_classes=0)
        assert model.embed_dim == dims["embed_dim"] and model.blocks[0].attn.num_heads == dims["num_heads"], name
    # another image size: the exact name first, then the 224 px entry timm builds it from
    assert timm_candidates(384, 12, 6, 16, 96) == ["vit_small_patch16_96", "vit_small_patch16_224"]


def test_timm_candidates_are_empty_for_unpublished_shapes():
    mini = ARCHITECTURES["vit_mini"]
    assert published_arch(**mini) is None
    assert timm_candidates(mini["embed_dim"], mini["depth"], mini["num_heads"], 4, 32) == []
    assert timm_candidates(384, 2, 6, 16, 224) == []  # a published width at another depth is not that size


def test_builder_uses_the_table():
    vit = build_vit("vit_tiny", 16, 32, depth=1).vit
    assert vit.embed_dim == 192 and vit.blocks[0].attn.num_heads == 3
