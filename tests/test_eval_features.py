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
    """Images through the encoder: ``cls_pre_ln`` and ``cls_post_ln`` go through
    ``forward_cls``, the other kinds through ``forward_blocks``."""
    calls = []
    for name in ("forward_cls", "forward_blocks"):
        original = getattr(model, name)

        def wrapped(images, *args, _original=original, **kwargs):
            calls.append(images.shape[0])
            return _original(images, *args, **kwargs)

        monkeypatch.setattr(model, name, wrapped)
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


#: float32 and float64 unit roundoffs.
FP32_U, FP64_U = 2.0**-24, 2.0**-53


def _transformers_and_ours(seed: int = 0):
    """A small transformers ViTMSNModel with peaked attention (every weight drawn at the scale
    of a trained ViT, not the init's std 0.02, under which attention is nearly uniform and a
    wrong query would barely change the output), and ours with its weights through the import
    that benchmarks/bench_features.py uses."""
    import transformers  # a test dependency (pyproject.toml)
    import bench_features

    config = transformers.ViTMSNConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                       image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = transformers.ViTMSNModel(config).eval()
    with torch.no_grad():
        for name, tensor in hf.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.ndim >= 2 and "embeddings" not in name:
                tensor.normal_(0, tensor[0].numel() ** -0.5)  # std 1/sqrt(fan_in)
            else:
                tensor.normal_(0, 0.3)
    return hf, bench_features.ours_from_hf(hf)


def test_cls_features_equal_transformers_vitmsn_within_rounding():
    """``cls_pre_ln`` and ``cls_post_ln``, computed with the last block for the CLS token alone,
    against transformers' ViTMSNModel (every token through every block): the last block's CLS
    output (``hidden_states[-1]``) and the final LayerNorm's (``last_hidden_state``).

    Bounds. The two are equal in exact arithmetic, so they differ by rounding alone. In
    float64 each value passes 4 blocks of dot products of at most K = 256 terms (error
    <= K u relative to the sum of |terms|, u = 2^-53), through LayerNorms and softmaxes whose
    conditioning at these weights stays under 10^3: at most 4 * 256 * 10^3 u max|feature|
    ~ 1e-10 max|feature|. In float32 the bound comes from transformers' own rounding: our
    error against the float64 values must stay within 4x theirs (each path rounds as much as
    the other; 4x leaves room for the different summation orders). A wrong CLS-only path (a
    wrong query row, slice of the qkv weights, scale or residual) changes the features by
    O(1), 10^9 times the float64 bound; a hook checks that the last block's MLP saw the CLS
    token alone, so that path is the one being compared."""
    hf, ours = _transformers_and_ours()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    ours.vit.blocks[-1].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))

    def features(dtype):
        x = images.to(dtype)
        with torch.inference_mode():
            out = hf.to(dtype)(pixel_values=x, output_hidden_states=True)
            theirs = {"cls_pre_ln": out.hidden_states[-1][:, 0], "cls_post_ln": out.last_hidden_state[:, 0]}
            mine = {kind: backbone_features(ours.to(dtype), x, kind) for kind in theirs}
        return theirs, mine

    theirs64, mine64 = features(torch.float64)
    assert seen == [(4, 1, 64), (4, 1, 64)]  # the CLS-only last block, for both kinds
    scale = max(t.abs().max().item() for t in theirs64.values())
    bound64 = 4 * 256 * 1e3 * FP64_U * scale
    for kind in theirs64:
        assert (mine64[kind] - theirs64[kind]).abs().max().item() <= bound64, kind
    assert (theirs64["cls_pre_ln"] - theirs64["cls_post_ln"]).abs().max() > 1e6 * bound64  # the kinds differ

    theirs32, mine32 = features(torch.float32)
    for kind in theirs32:
        their_error = (theirs32[kind].double() - theirs64[kind]).abs().max().item()
        my_error = (mine32[kind].double() - theirs64[kind]).abs().max().item()
        assert 0 < their_error < 1e3 * FP32_U * scale, kind  # float32 rounding, nothing else
        assert my_error <= 4 * their_error, (kind, my_error, their_error)
