"""Low-shot evaluation of an MSN backbone (MSN paper Sec. 5; docs/eval.md).

    python eval_lowshot.py backbone=outputs/msn/checkpoints/latest.pt data=imagenet \
        data.root=/data/imagenet shots=[1,2,5] splits=3 percent=1

Prints a table of top-1 accuracy (logistic regression and k-NN, mean +- std over splits),
writes ``results.json``, ``lowshot.png`` and the labelled subsets into ``output_dir``.
Configuration errors are printed as one line ``error: <key>: <message>`` (exit code 2).
"""

from __future__ import annotations

import sys
import os

# Idle OpenMP threads sleep instead of spinning: on small shared CPUs (loader workers, several
# processes) spinning threads slow every step several-fold; on a quiet machine it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig

from msn.config import ConfigError
from msn.eval import config as _eval_schema  # noqa: F401 - registers eval_schema before composition


@hydra.main(config_path="configs", config_name="eval_lowshot", version_base="1.3")
def main(raw: DictConfig) -> None:
    from msn.eval.config import load_eval_config
    from msn.eval.lowshot import run_lowshot

    try:
        run_lowshot(load_eval_config(raw))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
