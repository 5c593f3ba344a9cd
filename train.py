"""MSN pre-training entry point: ``python train.py experiment=fmnist_demo`` (see README);
after ``pip install .`` the same command is ``msn-train experiment=fmnist_demo``.

Several processes: ``torchrun --nproc_per_node N train.py ...``, ``srun`` with one task per
GPU, or ``python train.py -m hydra/launcher=slurm ...`` (docs/scaling.md).
"""

import os

# Idle OpenMP threads sleep instead of spinning: on small shared CPUs (loader workers, several
# processes) spinning threads slow every step several-fold; on a quiet machine it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from msn.config import DistConfig  # noqa: E402 - light: no torch yet
from msn.train.preemption import PreemptionFlag  # noqa: E402

#: Preemption signals are caught from here on, before the heavy imports (torch, Hydra): one
#: arriving during start-up stops the run at its first step boundary, not with -15.
EARLY_SIGNALS = PreemptionFlag(DistConfig().preempt_signals).__enter__()

from msn.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(EARLY_SIGNALS)
