"""Feature extraction: which token, the extraction loop, the on-disk cache, the random baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from msn.config import DataConfig
from msn.data import SyntheticImages, eval_transform
from msn.eval.features import Encoder, backbone_features, data_identity, extract_features, random_like
from msn.models import build_vit

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vit = build_vit("vit_mini", 8, 32, depth=2)
    # non-trivial final LayerNorm so that pre- and post-LN features differ
    with torch.no_grad():
        vit.vit.norm.weight.uniform_(0.5, 1.5)
        vit.vit.norm.bias.uniform_(-0.5, 0.5)
    return vit.eval()


def test_feature_kinds(model):
    """Each kind against its definition, in float64 (equal in exact arithmetic; 1e-10 bounds
    float64 rounding on any CPU)."""
    model = copy.deepcopy(model).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        tokens, collected = model.forward_blocks(images, collect_last=2)
        pre = backbone_features(model, images, "cls_pre_ln")
        assert torch.allclose(pre, model.forward_blocks(images, collect_last=1)[1][-1][:, 0], atol=1e-10)
        assert torch.allclose(pre, collected[-1][:, 0], atol=1e-10)
        post = backbone_features(model, images, "cls_post_ln")
        assert torch.allclose(post, model(images), atol=1e-10)
        assert torch.allclose(post, model.vit.norm(pre), atol=1e-10)
        assert not torch.allclose(pre, post, atol=1e-2)
        concat = backbone_features(model, images, "cls_concat", blocks=2)
        assert concat.shape == (3, 2 * 128)
        assert torch.allclose(concat[:, 128:], post, atol=1e-10)
        assert torch.allclose(concat[:, :128], model.vit.norm(collected[0][:, 0]), atol=1e-10)
        mean = backbone_features(model, images, "patch_mean")
        assert torch.allclose(mean, tokens[:, 1:].mean(1), atol=1e-10)
    with pytest.raises(ValueError, match="unknown kind"):
        backbone_features(model, images, "cls_token")


def make_encoder(model, kind="cls_pre_ln"):
    transform = eval_transform(32, MEAN, STD)
    return Encoder("backbone", transform, 32, {"name": "test-model", "feature": kind}, model, kind)


def counting(monkeypatch, model):
    calls = []
    original = model.forward_blocks

    def wrapped(images, *args, **kwargs):
        calls.append(images.shape[0])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(model, "forward_blocks", wrapped)
    return calls


def test_extraction_matches_direct_forward_and_cache_is_hit(model, tmp_path, monkeypatch):
    data = SyntheticImages(size=24, num_classes=4, image_size=32, seed=0)
    key = data_identity(DataConfig(name="synthetic", synthetic_image_size=32, synthetic_classes=4), data, True)
    encoder = make_encoder(model)
    calls = counting(monkeypatch, model)
    wanted = [5, 0, 17, 3, 9]
    first = extract_features(encoder, data, wanted, data_key=key, batch_size=2, cache_dir=tmp_path, progress=False)
    assert first.extracted == 5 and sum(calls) == 5
    with torch.inference_mode():
        direct = backbone_features(model, torch.stack([encoder.transform(data[i][0]) for i in wanted]))
    # float32, batches of 2 against one batch of 5: each row is computed on its own, only the
    # kernels' blocking may differ (0 measured); 1e-5 is ~40 ulps of the largest value (0.26)
    assert torch.allclose(first.features, direct, atol=1e-5)
    assert first.labels.tolist() == [data.targets[i] for i in wanted]
    assert first.valid.all()

    calls.clear()
    again = extract_features(encoder, data, [9, 5], data_key=key, batch_size=2, cache_dir=tmp_path, progress=False)
    assert calls == [] and again.extracted == 0  # served from the cache file
    assert torch.equal(again.features, first.features[[4, 0]])

    more = extract_features(encoder, data, [9, 1, 2], data_key=key, batch_size=8, cache_dir=tmp_path, progress=False)
    assert more.extracted == 2 and sum(calls) == 2  # only the new images
    assert torch.equal(more.features[0], first.features[4])

    # a different feature kind is a different cache entry
    calls.clear()
    post = extract_features(make_encoder(model, "cls_post_ln"), data, [9], data_key=key, cache_dir=tmp_path,
                            progress=False)
    assert post.extracted == 1 and sum(calls) == 1
    assert len(list(tmp_path.glob("*.pt"))) == 2

    # no cache dir: always extracts
    calls.clear()
    extract_features(encoder, data, [9], data_key=key, cache_dir=None, progress=False)
    assert sum(calls) == 1


def test_pixels_encoder_flattens_the_transformed_image(tmp_path):
    data = SyntheticImages(size=8, num_classes=2, image_size=32, seed=0)
    key = data_identity(DataConfig(name="synthetic"), data, False)
    transform = eval_transform(16, MEAN, STD)
    encoder = Encoder("pixels", transform, 16, {"name": "pixels"})
    out = extract_features(encoder, data, [3], data_key=key, cache_dir=tmp_path, progress=False)
    assert out.features.shape == (1, 3 * 16 * 16)
    assert torch.allclose(out.features[0], transform(data[3][0]).flatten(), atol=1e-6)


def test_random_baseline_keeps_architecture_and_is_seeded(model):
    state = torch.random.get_rng_state()
    a, b, c = random_like(model, 0), random_like(model, 0), random_like(model, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for (name, p), q, r, s in zip(model.named_parameters(), a.parameters(), b.parameters(), c.parameters()):
        assert p.shape == q.shape and torch.equal(q, r), name
    trained_patch = model.vit.patch_embed.proj.weight
    assert not torch.allclose(a.vit.patch_embed.proj.weight, trained_patch)
    assert not torch.allclose(a.vit.norm.bias, model.vit.norm.bias)
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)
