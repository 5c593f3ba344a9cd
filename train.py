"""MSN pre-training entry point: ``python train.py experiment=fmnist_demo`` (see README).

Several processes: ``torchrun --nproc_per_node N train.py ...``, ``srun`` with one task per
GPU, or ``python train.py -m hydra/launcher=slurm ...`` (docs/scaling.md).
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on small shared CPUs (loader workers, several
# processes) spinning threads slow every step several-fold; on a quiet machine it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from msn.config import DistConfig  # noqa: E402 - light: no torch yet
from msn.train.preemption import PreemptionFlag  # noqa: E402

#: Preemption signals are caught from here on, before the heavy imports (torch, Hydra): one
#: arriving during start-up stops the run at its first step boundary, not with -15.
EARLY_SIGNALS = PreemptionFlag(DistConfig().preempt_signals).__enter__()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from msn.cli import run_training  # noqa: E402


def _quiet_non_main_ranks(argv: list[str]) -> None:
    """Ranks > 0 of torchrun/srun neither write ``.hydra/`` nor the log file (rank 0 does)."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if "SLURM_STEP_ID" in os.environ else None)
    if not rank or int(rank) == 0:
        return
    if not any(arg.startswith(("hydra.output_subdir=", "++hydra.output_subdir=")) for arg in argv):
        argv.append("hydra.output_subdir=null")
    if not any(arg.startswith("hydra/job_logging=") for arg in argv):
        argv.append("hydra/job_logging=stdout")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training(cfg, EARLY_SIGNALS)


if __name__ == "__main__":
    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        _quiet_non_main_ranks(sys.argv)
    main()
