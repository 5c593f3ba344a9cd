"""Fine-tune an MSN backbone end to end on a labelled Fashion-MNIST subset (docs/finetune.md):
the command line of :mod:`msn.eval.finetune.cli`, where the routes, the probe, the training loop
and the report live.

Examples::

    python scripts/finetune.py --checkpoint outputs/fmnist_msn --output outputs/finetune
    python scripts/finetune.py --hf exports/hf --timm exports/timm --steps 300 --labelled 500 --seed 0
"""

import sys

from msn.eval.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
