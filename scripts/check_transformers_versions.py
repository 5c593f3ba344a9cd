"""Check that our transformers exports load in other transformers releases.

    python scripts/check_transformers_versions.py 4.40.2 4.57.6

For each version: install it (pip, into a folder of its own under ``--work``, beside the
project's own transformers), export a small random ViT as ``hf`` (backbone, and classifier
with labels), load both folders with that version's ``ViTMSNModel`` /
``ViTMSNForImageClassification`` and compare the features and logits with ours. Prints a
table; exit status 1 when one differs by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHECK = r"""
import json, sys, warnings
import torch
import transformers
from transformers import ViTMSNForImageClassification, ViTMSNModel
folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = ViTMSNModel.from_pretrained(folder + "/backbone").eval()
    classifier = ViTMSNForImageClassification.from_pretrained(folder + "/classifier").eval()
with torch.no_grad():
    cls = model(pixel_values=expected["images"]).last_hidden_state[:, 0]
    logits = classifier(pixel_values=expected["images"]).logits
print(json.dumps({"version": transformers.__version__,
                  "features": float((cls - expected["features"]).abs().max()),
                  "logits": float((logits - expected["logits"]).abs().max()),
                  "warnings": sorted({str(w.message).splitlines()[0][:90] for w in caught})}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+")
    parser.add_argument("--work", default=None, help="where the versions are installed (default: a temp folder)")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import torch

    from msn.config import load_config
    from msn.export import export, load_backbone
    from msn import checkpoint
    from msn.models import build_network, Prototypes

    work = Path(args.work or tempfile.mkdtemp(prefix="msn-tf-"))
    cfg = load_config({"data": {"name": "synthetic", "views": {"rand_size": 32, "focal_size": 16}},
                       "model": {"name": "vit_mini_4", "depth": 2, "embed_dim": 64, "num_heads": 4, "patch_size": 8},
                       "head": {"hidden_dim": 64, "output_dim": 32}, "loss": {"num_prototypes": 16},
                       "output_dir": str(work / "run")})
    torch.manual_seed(0)
    network = build_network(cfg.model, cfg.head, 32)
    from msn.config import to_dict

    state = {"config": to_dict(cfg), "step": 1, "epoch": 0, "encoder": network.state_dict(),
             "target_encoder": network.state_dict(), "prototypes": Prototypes(16, 32).weight.detach()}
    checkpoint.save_training_checkpoint(state, work / "run")
    export(work / "run", work / "export" / "backbone", "hf", overwrite=True)
    labels = ["a", "b", "c"]
    export(work / "run", work / "export" / "classifier", "hf", labels=labels, overwrite=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from transformers import ViTMSNForImageClassification

    loaded = load_backbone(work / "run")
    with torch.no_grad():
        features = loaded.backbone.forward_blocks(images)[0][:, 0]
        logits = ViTMSNForImageClassification.from_pretrained(work / "export" / "classifier").eval()(
            pixel_values=images).logits
    torch.save({"images": images, "features": features, "logits": logits}, work / "expected.pt")

    rows, failed = [], False
    for version in args.versions:
        target = work / f"transformers-{version}"
        if not target.is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                            f"transformers=={version}"], check=True)  # with the dependencies of that release
        env = dict(os.environ, PYTHONPATH=str(target))
        result = subprocess.run([sys.executable, "-c", CHECK, str(work / "export"), str(work / "expected.pt")],
                                capture_output=True, text=True, env=env)
        if result.returncode:
            rows.append({"version": version, "error": result.stderr.strip().splitlines()[-1]})
            failed = True
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        failed |= max(row["features"], row["logits"]) > args.atol
        rows.append(row)
    print("| transformers | max |CLS feature diff| | max |logit diff| | warnings |")
    print("|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['version']} | error: {row['error']} | | |")
        else:
            print(f"| {row['version']} | {row['features']:.2e} | {row['logits']:.2e} | {'; '.join(row['warnings']) or 'none'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
