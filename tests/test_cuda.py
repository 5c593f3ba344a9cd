"""Checks that need a CUDA device (every test is marked ``cuda``: skipped without one, see
``tests/conftest.py``). ``scripts/gpu_check.sh`` runs them on a lent GPU:
``python3 -m pytest -q -m cuda tests/test_cuda.py``.

Sections: (1) precision: the bf16 autocast step keeps the MSN loss in float32 and matches the
fp32 step; (2) attention: SDPA against eager; (3) distributed: one NCCL rank through DDP;
(4) the trainer: a short CUDA run to a checkpoint; (5) ``data.augment=device`` on the GPU
against the same batches made on the CPU; (6) ``train.compile`` with inductor: no
recompilation after warm-up, the eager step's loss; (7) the low-shot features (CLS-only last
block) against transformers' ViTMSNModel in fp32 and bf16. Each tolerance is sized from the
arithmetic, next to its test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msn import checkpoint
from msn.config import load_config
from msn.models import build_vit
from msn.train import Trainer

from conftest import ROOT, first_batch, jpeg_folder, tiny_config_dict

pytestmark = pytest.mark.cuda
HERE = Path(__file__).resolve().parent

#: The device every test here runs on.
DEVICE = "cuda"
#: The process-group backend of the one-rank DDP test.
BACKEND = "nccl"

#: bf16 keeps 8 significant bits: its unit roundoff (half the spacing of 1.0's neighbours).
BF16_U = 2.0**-8
#: ... and float32's 24.
FP32_U = 2.0**-24

#: A model big enough that bf16 rounding and the attention kernels matter (6 heads of 64,
#: the ViT-S/16 width, 4 blocks) yet one step takes milliseconds on a GPU: 96 px target and
#: anchor views (36 patches), two 32 px focal views, 256 prototypes.
SMALL_VIT = {
    "model": {"name": "vit_small_16", "depth": 4},
    "head": {"hidden_dim": 512, "output_dim": 128},
    "loss": {"num_prototypes": 256},
    "mask": {"ratio": 0.5},
    "data": {"name": "synthetic", "num_workers": 0, "synthetic_size": 64, "synthetic_classes": 4,
             "synthetic_image_size": 96, "views": {"rand_size": 96, "focal_size": 32, "num_focal": 2}},
    "optim": {"batch_size": 16, "epochs": 2, "warmup_epochs": 1},
}


def cuda_config(output_dir, **sections):
    """A validated config of :data:`SMALL_VIT` on :data:`DEVICE` (``sections`` update it,
    one level deep: ``data={"num_workers": 2}`` keeps the other data keys)."""
    raw = tiny_config_dict(output_dir, device=DEVICE, **{k: dict(v) for k, v in SMALL_VIT.items()})
    raw["model"] = dict(SMALL_VIT["model"])  # the preset's sizes, not the tiny ones
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return load_config(raw)


@pytest.fixture
def exact_fp32():
    """float32 products in float32 (no TF32) while a test runs, so that "fp32" means it."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius), computed in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- (1) precision
def _spy_loss(monkeypatch) -> list[tuple[str, torch.dtype, bool]]:
    """Record ``(what, dtype, autocast on)`` at the MSN loss's entry and at its softmax
    inputs, Sinkhorn input and ME-MAX input (the functions ``msn.losses`` calls)."""
    import msn.losses
    import msn.train.step

    seen: list[tuple[str, torch.dtype, bool]] = []

    def autocast_on() -> bool:
        return torch.is_autocast_enabled(torch.device(DEVICE).type)

    def wrap(module, name, what, pick=lambda args: args[0]):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            seen.append((what, pick(args).dtype, autocast_on()))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    wrap(msn.train.step, "msn_loss", "loss input: anchor projections")
    wrap(msn.train.step, "msn_loss", "loss input: target projections", pick=lambda args: args[1])
    wrap(msn.losses, "prototype_logits", "softmax: normalised projections")
    wrap(msn.losses, "sinkhorn", "Sinkhorn: sharpened targets")
    wrap(msn.losses.distributed, "all_reduce_mean", "ME-MAX: mean prediction")
    return seen


def _encoder_dtypes(trainer) -> list[torch.dtype]:
    """Hook the first block's qkv product of the online and the target encoder: the dtypes
    their outputs have (appended at each forward)."""
    dtypes: list[torch.dtype] = []
    for network in (trainer.msn_step.network, trainer.msn_step.target):
        network.backbone.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    return dtypes


def test_bf16_step_computes_the_loss_in_float32_and_matches_the_fp32_step(tmp_path, monkeypatch, exact_fp32):
    """``precision=bf16``: the encoders run in bf16, every part of the loss in float32 outside
    autocast, and the step's loss matches the fp32 step's on the same batch and weights.

    Tolerance. The two losses are one function evaluated with different roundings. bf16
    rounds each product's inputs to 8 significant bits (unit roundoff u = 2^-8, float32
    accumulation). The projections leave 4 blocks and the head, ~25 rounded products in
    sequence, with a relative error growing like the square root of that count: ~5 u. The
    test measures it (``change``, the largest change of a normalised projection; 5.8 u
    with CPU kernels) and requires 0 < change <= 32 u: bf16 did run, and it is not garbage.
    To first order a row's CE moves by ``sum_k (p_k - t_k) dl_k`` with ``dl_k`` the change of
    its logit k, at most ``change / tau`` (tau = 0.1) but of random sign over the K = 256
    prototypes, so the sum scales like ``||p - t||_2 change / tau`` (~0.1 * 0.23 for the
    near-uniform predictions at initialisation), then averages over 48 rows with random
    signs (/7): ~3e-3 at most, 1.5e-4 measured. We allow one bf16 unit roundoff of the loss
    itself, ``u * |loss| = 0.023``: the bf16 step gives the loss to bf16's own precision.
    """
    out16, out32 = tmp_path / "bf16", tmp_path / "fp32"
    fp32 = Trainer(cuda_config(out32, precision="fp32"))
    bf16 = Trainer(cuda_config(out16, precision="bf16"))
    assert bf16.device.type == torch.device(DEVICE).type and bf16.msn_step.autocast_dtype == torch.bfloat16
    for a, b in zip(fp32.msn_step.network.state_dict().values(), bf16.msn_step.network.state_dict().values()):
        assert torch.equal(a, b)  # the same initial weights (same seed)
    batch = first_batch(fp32)

    # the projections the loss sees, in both precisions (training mode, like the step)
    keep = fp32.msn_step.masks(0, batch.size, fp32.device)
    on_device = batch.to(fp32.device)
    with torch.no_grad():
        z32 = fp32.msn_step.online(on_device.anchor, keep, on_device.focal)
        with bf16.msn_step.autocast():
            z16 = bf16.msn_step.online(on_device.anchor, keep, on_device.focal)
    assert z32.dtype == torch.float32 and z16.dtype == torch.bfloat16
    unit = lambda z: torch.nn.functional.normalize(z.double(), dim=-1)  # noqa: E731
    change = float((unit(z16) - unit(z32)).norm(dim=-1).max())
    assert 0 < change <= 32 * BF16_U, change

    seen = _spy_loss(monkeypatch)
    encoder = _encoder_dtypes(bf16)
    stats16 = bf16.train_step(batch)
    assert set(encoder) == {torch.bfloat16}, encoder
    assert {what for what, *_ in seen} == {"loss input: anchor projections", "loss input: target projections",
                                           "softmax: normalised projections", "Sinkhorn: sharpened targets",
                                           "ME-MAX: mean prediction"}
    for what, dtype, autocast_on in seen:
        if what.startswith("loss input"):
            assert dtype == torch.bfloat16, (what, dtype)  # the encoders' output, as it came
        else:
            assert dtype == torch.float32 and not autocast_on, (what, dtype, autocast_on)
    seen.clear()
    stats32 = fp32.train_step(batch)
    assert all(dtype == torch.float32 for _, dtype, _ in seen)

    loss16, loss32 = float(stats16[0]), float(stats32[0])
    assert math.isfinite(loss16) and math.isfinite(loss32)
    assert abs(loss16 - loss32) <= BF16_U * abs(loss32), (loss16, loss32, change)
    assert math.log(256) - 1 < loss32 < math.log(256) + 1  # near log K at initialisation: a real loss


# ---------------------------------------------------------------------------- (2) attention
def _attention_pair(depth: int = 12):
    """ViT-S/16 at 224 px with SDPA and the same weights with eager attention (eval mode)."""
    torch.manual_seed(0)
    sdpa = build_vit("vit_small", 16, 224, depth=depth, attention="sdpa")
    eager = build_vit("vit_small", 16, 224, depth=depth, attention="eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa.to(DEVICE).eval(), eager.to(DEVICE).eval()


def _count_sdpa_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_sdpa_matches_eager_attention_in_fp32_and_bf16(monkeypatch, exact_fp32):
    """The fused kernels (``model.attention=sdpa``, the default) against timm's eager
    attention, same weights: all output tokens of ViT-S/16 (12 blocks, 6 heads of 64) on
    full 224 px images (197 tokens) and on anchors with 70 % of the patches dropped (59).

    Reference: the eager network in float64. Tolerances, on ``||x - ref|| / ||ref||``:

    * float32 (TF32 off, u = 2^-24): a dot product of length n (at most 1536, the MLP's)
      carries a relative error ~ sqrt(n) u ~ 40 u for independent roundings; 12 blocks of 4
      products add theirs to the residual stream: ~ sqrt(48) * 40 u ~ 280 u. We allow
      2^10 u = 6e-5 for each path (9 u measured with CPU kernels) and 2^11 u between them;
      a kernel that lost one head of the 6 in one block would be off by percents.
    * bf16 autocast (u = 2^-8 on the products' inputs, float32 accumulation): the inputs'
      rounding dominates, ~ sqrt(48) u ~ 7 u in the same chain; 0.9 u measured with CPU
      kernels. We allow 8 u = 3.1 % for each path and 16 u between them (the sum of the two
      sides: both are bf16 approximations of the same float64 value).
    """
    sdpa, eager = _attention_pair()
    reference = build_vit("vit_small", 16, 224, attention="eager")
    reference.load_state_dict(sdpa.state_dict())
    reference = reference.to(DEVICE, torch.float64).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 224, 224, generator=generator)
    from msn.masking import sample_keep_indices

    keep = sample_keep_indices(8, sdpa.num_patches(224), 0.7, generator=generator)
    calls = _count_sdpa_calls(monkeypatch)
    for keep_indices in (None, keep):
        k = None if keep_indices is None else keep_indices.to(DEVICE)
        with torch.no_grad():
            ref, _ = reference.forward_blocks(images.to(DEVICE, torch.float64), k)
            x = images.to(DEVICE)
            calls[0] = 0
            fused32, _ = sdpa.forward_blocks(x, k)
            assert calls[0] == len(sdpa.vit.blocks)  # the fused kernel did run
            calls[0] = 0
            eager32, _ = eager.forward_blocks(x, k)
            assert calls[0] == 0
            with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
                fused16, _ = sdpa.forward_blocks(x, k)
                eager16, _ = eager.forward_blocks(x, k)
        assert fused32.dtype == eager32.dtype == torch.float32
        tokens = ref.shape[1]
        assert tokens == (197 if keep_indices is None else 1 + 58)
        errors = {name: relative_error(value, ref) for name, value in
                  (("sdpa fp32", fused32), ("eager fp32", eager32), ("sdpa bf16", fused16), ("eager bf16", eager16))}
        assert errors["sdpa fp32"] <= 2**10 * FP32_U and errors["eager fp32"] <= 2**10 * FP32_U, errors
        assert relative_error(fused32, eager32) <= 2**11 * FP32_U, errors
        assert errors["sdpa bf16"] <= 8 * BF16_U and errors["eager bf16"] <= 8 * BF16_U, errors
        assert relative_error(fused16.float(), eager16.float()) <= 16 * BF16_U, errors


# ---------------------------------------------------------------------------- (3) distributed
#: float64 (``precision=fp64``): the DDP step and the plain step are equal in exact
#: arithmetic; with one rank the all-reduce is a copy and the division by the world size a
#: division by 1, so what may differ is only the order of atomic additions in backward
#: kernels (~1e-16 relative), amplified at most lr / eps = 1e5 by Adam's first step on a
#: gradient that is mathematically zero: 1e-9 bounds it (tests/test_distributed.py, EXACT).
EXACT = 1e-9

_NCCL_WORKER = """
import datetime, sys, torch, torch.distributed as dist
sys.path[:0] = sys.argv[1].split(":")
import test_cuda
test_cuda._one_rank_worker(*sys.argv[2:])
"""


def _snapshot(trainer, stats) -> dict:
    return {"stats": stats.detach().cpu(),
            "encoder": {k: v.detach().cpu() for k, v in trainer.msn_step.network.state_dict().items()},
            "target": {k: v.detach().cpu() for k, v in trainer.msn_step.target.state_dict().items()},
            "prototypes": trainer.msn_step.prototypes.weight.detach().cpu(),
            "grads": {k: p.grad.detach().cpu() for k, p in trainer.msn_step.network.named_parameters() if p.grad is not None}}


def _one_rank_worker(out: str, port: str) -> None:
    """In a fresh process: the plain step, then a process group of one rank (:data:`BACKEND`)
    and the same step with the online forward in DDP; both results go to ``out/*.pt``."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    try:  # how MSNStep wraps it (no per-forward buffer broadcast)
        from msn.train.step import _no_forward_buffer_sync
    except ImportError:
        def _no_forward_buffer_sync():
            return {"broadcast_buffers": False}

    out_dir = Path(out)
    plain = Trainer(cuda_config(out_dir / "plain", precision="fp64"))
    torch.save(_snapshot(plain, plain.train_step(first_batch(plain))), out_dir / "plain.pt")
    del plain

    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)
    kwargs = {"device_id": device} if BACKEND == "nccl" else {}
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120), **kwargs)
    try:
        trainer = Trainer(cuda_config(out_dir / "ddp", precision="fp64"))
        # MSNStep wraps the online forward in DDP from two ranks on; wrap it here the same way
        assert not isinstance(trainer.msn_step.online, DistributedDataParallel)
        ddp = DistributedDataParallel(trainer.msn_step.online,
                                      device_ids=[device.index] if device.type == "cuda" else None,
                                      **_no_forward_buffer_sync())
        buckets = []

        def counting_allreduce(state, bucket):
            buckets.append(bucket.buffer().numel())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        trainer.msn_step.online = ddp
        result = _snapshot(trainer, trainer.train_step(first_batch(trainer)))
        result.update(backend=dist.get_backend(), world_size=dist.get_world_size(), reduced=sum(buckets))
        torch.save(result, out_dir / "ddp.pt")
    finally:
        dist.destroy_process_group()


def test_one_rank_nccl_ddp_step_equals_the_plain_step(tmp_path):
    """A process group of one NCCL rank: the real trainer's step with its online forward in
    DDP (gradients all-reduced through NCCL, bucket by bucket) equals the step without DDP,
    in float64, to :data:`EXACT`. Runs in a subprocess with a time limit (a hung NCCL
    initialisation fails the test instead of stalling the run)."""
    from dist_helpers import free_port

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
    proc = subprocess.run([sys.executable, "-c", _NCCL_WORKER, ":".join(map(str, {HERE, ROOT / "tests", ROOT})), str(tmp_path),
                           str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    plain, ddp = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "ddp.pt")
    assert ddp["backend"] == BACKEND and ddp["world_size"] == 1
    grads = plain["grads"]
    assert ddp["reduced"] == sum(g.numel() for g in grads.values())  # every gradient went through the group
    assert plain["encoder"]["head.fc1.weight"].dtype == torch.float64
    torch.testing.assert_close(ddp["stats"], plain["stats"], rtol=0, atol=EXACT)
    for key in ("grads", "encoder", "target"):
        assert ddp[key].keys() == plain[key].keys()
        for name in plain[key]:
            torch.testing.assert_close(ddp[key][name], plain[key][name], rtol=0, atol=EXACT,
                                       msg=lambda m, where=f"{key}/{name}": f"{where}: {m}")
    torch.testing.assert_close(ddp["prototypes"], plain["prototypes"], rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------- (4) the trainer
def test_short_cuda_run_finishes_with_a_finite_loss_and_a_checkpoint(tmp_path):
    """Six steps of the trainer on data=synthetic (bf16 autocast, fused AdamW, two loader
    workers with pinned memory): finite loss, a record every 2 steps, ``latest.pt`` at the
    end with finite weights, and everything on the GPU while it ran."""
    out = tmp_path / "run"
    cfg = cuda_config(out, precision="auto", data={"num_workers": 2}, train={"max_steps": 6, "log_every": 2})
    trainer = Trainer(cfg)
    on_gpu = torch.device(DEVICE).type == "cuda"  # (DEVICE is "cpu" only to rehearse this file)
    assert trainer.device.type == torch.device(DEVICE).type
    assert trainer.msn_step.autocast_dtype == (torch.bfloat16 if on_gpu else None)
    assert all(p.device.type == trainer.device.type for p in trainer.msn_step.network.parameters())
    assert trainer.msn_step.optimizer.defaults.get("fused") or not on_gpu  # fused AdamW on CUDA
    record = trainer.fit()
    assert record["step"] == 6 and math.isfinite(record["loss"]), record
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in records)
    state = checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert state["step"] == 6
    tensors = [v for v in state["encoder"].values() if v.is_floating_point()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)


# ---------------------------------------------------------------------------- (5) device augmentation
@pytest.mark.parametrize("kind", ["fixed size (crops on the device too)", "varying size (photometric on the device)"])
def test_device_augmentation_on_the_gpu_equals_the_cpu_path(kind, tmp_path):
    """``data.augment=device``: the loader ships uint8 pixels and every parameter; the views
    made where ``msn.data.augment_on_device`` takes them, on the GPU, equal those made on the CPU from
    the same batch (which tests/test_data_device_augment.py proves bitwise equal to
    ``data.augment=batched``).

    Tolerance. Both sides evaluate the same float32 arithmetic with different kernels
    (roi_align, the blur convolution, reductions for contrast, HSV conversions): each op
    rounds to within a few units of float32's 2^-24, and no op is discontinuous in its input
    (solarisation is not in the recipe; grayscale, jitter, blur and the hue rotation are
    continuous), so about 30 ops in sequence and the normalisation's 1/std = 4.4 give errors
    ~1e-5 at most. We allow 1e-3 everywhere (1/17 of one uint8 level after normalisation) and
    a mean of 1e-5; a parameter applied to the wrong image moves values by tenths.
    """
    from msn.data import ResumableSampler, SyntheticImages, augment_on_device, build_multiview_data, build_train_loader

    views = {"rand_size": 64, "focal_size": 32, "num_focal": 4}
    cfg = load_config(tiny_config_dict(tmp_path, data={"name": "synthetic", "augment": "device", "views": views}))
    dataset = SyntheticImages(16, 4, 72) if kind.startswith("fixed") else jpeg_folder(tmp_path / "jpeg", 16, (72, 80))
    data, collate = build_multiview_data(dataset, cfg.data, seed=5)
    loader = build_train_loader(data, ResumableSampler(len(dataset), 8, seed=5), 0, collate=collate)
    for batch in loader:
        assert batch.pending is not None and batch.target.dtype == torch.uint8
        on_cpu, on_gpu = augment_on_device(batch, torch.device("cpu")), augment_on_device(batch, torch.device(DEVICE))
        assert on_gpu.pending is None and on_gpu.target.device.type == torch.device(DEVICE).type
        for name in ("target", "anchor", "focal"):
            a, b = getattr(on_cpu, name), getattr(on_gpu, name).cpu()
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape and a.numel() > 0, name
            difference = (a - b).abs()
            assert float(difference.max()) <= 1e-3 and float(difference.mean()) <= 1e-5, (name, float(difference.max()))
            assert float(a.std()) > 0.1  # real views, not zeros


# ---------------------------------------------------------------------------- (6) compile
def test_inductor_compiled_step_never_recompiles_and_matches_eager(tmp_path, exact_fp32):
    """``train.compile=true`` with inductor, the default backend, on the GPU: the first step
    compiles one static graph per view group (target, masked anchors, focal views); five more
    steps compile nothing (dynamo's counters); the compiled first step's loss equals the eager
    step's on the same batch and weights.

    Tolerance: inductor fuses and reorders the same float32 arithmetic (TF32 off); the loss
    (~log 256 = 5.5) is a sum of ~10^4 rounded terms through 2 blocks and the head, with
    relative error ~1e-6; we allow 1e-4 relative. A wrong graph (a dropped mask, another view
    group's shapes) changes the loss at the first decimal.
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    small = {"model": {"depth": 2}, "precision": "fp32"}
    compiled = Trainer(cuda_config(tmp_path / "compiled", **small, train={"compile": True, "compile_backend": "inductor"}))
    eager = Trainer(cuda_config(tmp_path / "eager", **small))
    batch = first_batch(eager)
    loss_compiled = float(compiled.train_step(batch)[0])
    loss_eager = float(eager.train_step(batch)[0])
    watched = ("stats", "frames", "recompiles")
    warm = {name: dict(counters[name]) for name in watched}
    assert warm["stats"].get("unique_graphs", 0) >= 3, warm
    for _ in range(5):
        compiled.train_step(batch)
    assert {name: dict(counters[name]) for name in watched} == warm
    assert math.isfinite(loss_compiled) and abs(loss_compiled - loss_eager) <= 1e-4 * abs(loss_eager), (loss_compiled, loss_eager)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- (7) low-shot features
def test_cls_only_features_on_the_gpu_match_transformers_in_fp32_and_bf16(exact_fp32):
    """The evaluator's features on CUDA (``cls_pre_ln`` and ``cls_post_ln`` through the
    CLS-only last block; bf16 autocast is what the evaluator uses there) against transformers'
    ViTMSNModel on the same device and precision (the model of
    tests/test_eval_features.py), both measured from the float64 CPU values.

    Our error must stay within 4x transformers' own in each precision (the same bound as the
    CPU test: the two paths round the same inputs, in other orders); theirs must look like
    rounding: below 2^10 u in float32 (TF32 off) and 16 u in bf16 (the inputs' rounding,
    ~ sqrt(4 blocks x 4 products) u, with room), relative to the largest feature.
    """
    from msn.eval.features import backbone_features
    from test_eval_features import _transformers_and_ours

    hf, ours = _transformers_and_ours()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kinds = ("cls_pre_ln", "cls_post_ln")

    def features(model_dtype, device, autocast):
        x = images.to(device, model_dtype)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = hf.to(device, model_dtype)(pixel_values=x, output_hidden_states=True)
            theirs = dict(zip(kinds, (out.hidden_states[-1][:, 0], out.last_hidden_state[:, 0])))
            mine = {kind: backbone_features(ours.to(device, model_dtype), x, kind) for kind in kinds}
        return ({k: v.double().cpu() for k, v in theirs.items()}, {k: v.double().cpu() for k, v in mine.items()})

    reference, _ = features(torch.float64, "cpu", False)
    scale = max(value.abs().max().item() for value in reference.values())
    for name, autocast, allowed in (("fp32", False, 2**10 * FP32_U), ("bf16", True, 16 * BF16_U)):
        theirs, mine = features(torch.float32, DEVICE, autocast)
        for kind in kinds:
            their_error = (theirs[kind] - reference[kind]).abs().max().item()
            my_error = (mine[kind] - reference[kind]).abs().max().item()
            assert their_error <= allowed * scale, (name, kind, their_error)
            assert my_error <= 4 * max(their_error, FP32_U * scale), (name, kind, my_error, their_error)
