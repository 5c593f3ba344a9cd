"""Benchmark: low-shot feature extraction against transformers' ViTMSNModel (eager and SDPA).

The feature is the evaluator's default, the CLS token of the last block before the final
LayerNorm (``cls_pre_ln``, docs/eval.md "Features"): ours is
:func:`msn.eval.features.backbone_features`, which runs the last block for the CLS token
alone (:meth:`msn.models.MSNViT.forward_cls`); transformers' is
``ViTMSNModel(x, output_hidden_states=True).hidden_states[-1][:, 0]``, its plain forward
(every token through every block, then its final LayerNorm) with the per-block outputs kept.

One process builds ViTMSNModel from a config with random weights (no download), once with
eager and once with SDPA attention, and loads the same weights into ours through the
project's transformers import (:func:`msn.export.load_backbone`). Each round times every
model once, in a rotated order (eager, SDPA, ours; SDPA, ours, eager; ...); the table
reports the median ms per batch of each and, as the speed-up, the median over rounds of the
SDPA / ours ratio within a round (a shared machine's speed drifts between rounds, much less
inside one), and the largest difference between our features and transformers' SDPA ones
(tests/test_eval_features.py bounds it against transformers' own rounding).

    .venv/bin/python benchmarks/bench_features.py                       # CPU, fp32
    .venv/bin/python benchmarks/bench_features.py --models vit_small --batches 8 --rounds 40
    python3 benchmarks/bench_features.py --device cuda --dtype bf16     # scripts/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from msn.architectures import ARCHITECTURES
from msn.tables import markdown_table
from msn.eval.features import backbone_features
from msn.export import load_backbone
from msn.models import MSNViT

#: What the table calls each architecture (patch 16, 224 px).
LABELS = {"vit_tiny": "ViT-Ti/16", "vit_small": "ViT-S/16", "vit_base": "ViT-B/16", "vit_large": "ViT-L/16"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Row:
    """One line of the table (times in ms per batch, medians over the rounds)."""

    model: str
    batch: int
    eager_ms: float
    sdpa_ms: float
    ours_ms: float
    speedup: float  #: median over rounds of SDPA / ours in the same round
    speedup_spread: tuple[float, float]  #: the lower and upper quartiles of those ratios
    max_abs_diff: float  #: |ours - transformers SDPA| of the features, largest element


def hf_pair(arch: str, image_size: int = 224, patch_size: int = 16, seed: int = 0):
    """transformers ViTMSNModel with eager and with SDPA attention, the same random weights."""
    from transformers import ViTMSNConfig, ViTMSNModel

    dims = ARCHITECTURES[arch]
    fields = dict(hidden_size=dims["embed_dim"], num_hidden_layers=dims["depth"], num_attention_heads=dims["num_heads"],
                  intermediate_size=4 * dims["embed_dim"], hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                  image_size=image_size, patch_size=patch_size, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    models = {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(seed)
        config = ViTMSNConfig(**fields)
        config._attn_implementation = attention
        models[attention] = ViTMSNModel(config).eval()
    assert models["eager"].config._attn_implementation == "eager"
    assert models["sdpa"].config._attn_implementation == "sdpa"
    return models["eager"], models["sdpa"]


def ours_from_hf(model) -> MSNViT:
    """Our encoder with a transformers ViTMSNModel's weights: its ``save_pretrained`` folder
    read by the project's import (:func:`msn.export.load_backbone`, strict)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return load_backbone(folder).backbone.eval()


def hf_feature(model, images: torch.Tensor) -> torch.Tensor:
    """transformers' ``cls_pre_ln``: the last block's CLS output, before the final LayerNorm."""
    return model(pixel_values=images, output_hidden_states=True).hidden_states[-1][:, 0]


def ours_feature(model: MSNViT, images: torch.Tensor) -> torch.Tensor:
    """The evaluator's feature function (:func:`msn.eval.features.backbone_features`)."""
    return backbone_features(model, images, "cls_pre_ln")


def timed(call: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of one call (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(calls: dict[str, Callable[[], torch.Tensor]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call in each round; the order rotates from round to round."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name], device))
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=4)
    return cuts[0], cuts[2]


def bench_one(arch: str, batches: Sequence[int], rounds: int, warmup: int, device: torch.device,
              dtype: torch.dtype | None, seed: int = 0) -> list[Row]:
    eager, sdpa = hf_pair(arch, seed=seed)
    ours = ours_from_hf(sdpa)
    for model in (eager, sdpa, ours):
        model.to(device)
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        images = torch.randn(batch, 3, 224, 224, generator=generator).to(device)

        def run(feature, model):
            def call():
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    return feature(model, images)
            return call

        calls = {"eager": run(hf_feature, eager), "sdpa": run(hf_feature, sdpa), "ours": run(ours_feature, ours)}
        diff = (calls["ours"]().float() - calls["sdpa"]().float()).abs().max().item()
        alternate(calls, warmup, device)
        times = alternate(calls, rounds, device)
        ratios = [s / o for s, o in zip(times["sdpa"], times["ours"])]
        rows.append(Row(LABELS.get(arch, arch), batch, *(1e3 * statistics.median(times[k]) for k in ("eager", "sdpa", "ours")),
                        statistics.median(ratios), quartiles(ratios), diff))
        print(f"[bench_features] {rows[-1].model} batch {batch}: SDPA / ours {rows[-1].speedup:.3f}x "
              f"(quartiles {rows[-1].speedup_spread[0]:.3f}-{rows[-1].speedup_spread[1]:.3f}), max |diff| {diff:.2e}",
              file=sys.stderr, flush=True)
    return rows


def markdown(rows: Sequence[Row], device: str, dtype: str) -> str:
    header = ["model", "batch", "transformers eager (ms/batch)", "transformers SDPA (ms/batch)", "ours (ms/batch)",
              "SDPA / ours (median of rounds; quartiles)", "max abs diff of the features"]
    cells = [[row.model, str(row.batch), f"{row.eager_ms:.1f}", f"{row.sdpa_ms:.1f}", f"{row.ours_ms:.1f}",
              f"**{row.speedup:.2f}x** ({row.speedup_spread[0]:.2f}-{row.speedup_spread[1]:.2f})", f"{row.max_abs_diff:.1e}"]
             for row in rows]
    return markdown_table(header, cells) + f"\n\n({device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small,vit_base", help="comma-separated keys of msn.architectures")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each times every model once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32, or bf16 autocast (what the evaluator uses on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    for name in models:
        if name not in ARCHITECTURES:
            parser.error(f"--models: unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    try:
        batches = [int(value) for value in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches: {args.batches!r} is not a comma-separated list of integers")
    if args.rounds < 1 or args.warmup < 0 or min(batches) < 1:
        parser.error("--rounds and every batch must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    rows = []
    for arch in models:
        rows += bench_one(arch, batches, args.rounds, args.warmup, device, DTYPES[args.dtype])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(markdown(rows, name, args.dtype))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "dtype": args.dtype, "torch": torch.__version__,
                                         "rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
