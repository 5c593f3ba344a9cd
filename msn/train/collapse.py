"""The collapse alarm of pre-training: one warning per run when the logged statistics say the
run has collapsed or is not learning (docs/method.md Sec. 5, "The collapse alarm").

:class:`CollapseAlarm` reads the records the trainer logs (``np``, ``max_t``, ``rank``, every
``train.log_every`` steps) and, once a condition has held for ``alarm.patience`` records in a
row, returns one message naming what it saw and what to try; it never fires again in that run.
The thresholds are ``alarm.*`` (:class:`msn.config.AlarmConfig`), each a fraction of a bound
the run itself sets (K, the batch, the embedding width), so they carry from a 16-wide test
model to ViT-L. Their defaults sit far from what healthy runs log and inside what collapsed
ones do (docs/method.md Sec. 5 has the measured values):

- ``alarm.max_t`` 0.9: healthy Fashion-MNIST runs keep ``max_t`` at 0.03-0.17 (8 prototypes:
  up to 0.82); Sinkhorn off collapsed at 0.953.
- ``alarm.prototypes`` 0.1 of ``min(B, K)``: healthy runs use 0.77-0.95 of it; Sinkhorn off 0.02.
- ``alarm.rank`` 0.02 of ``min(local B, D)``: a line or a plane. Healthy runs go low too (the demo's
  target projections: 61 of 128 at step 5, 14-16 from step 120 to its end, np 90-102), so only this far a fall
  is a sign of its own; partial collapses show in ``np`` first.
- ``alarm.uniform`` 1.5 / K from twice the warm-up: the demo's lowest ``max_t`` is 14 / K.
- ``alarm.patience`` 3 records: one odd window never fires.

The detector keeps no state in checkpoints: a resumed run rebuilds it from ``metrics.jsonl``
(:meth:`CollapseAlarm.replay`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from msn.config import AlarmConfig, MSNConfig

#: What to try, per kind of alarm (the message ends with it).
ADVICE = {
    "collapse": ("Try loss.use_sinkhorn=true (balanced targets), a larger loss.memax_weight (1 in the paper, 5 "
                 "without Sinkhorn), and loss.temperature / loss.sharpen_start / loss.sharpen_final nearer the "
                 "paper's 0.1 / 0.25 (docs/method.md Sec. 5)"),
    "not learning": ("Try a lower loss.temperature (0.1 in the paper), a lower sharpening temperature "
                     "(loss.sharpen_start / sharpen_final, 0.25), a larger optim.lr, and check that the views "
                     "of an image differ and the images are not constant (docs/method.md Sec. 5)"),
}

#: The rank floor never falls below this: an effective rank of 2 or less is a line or a
#: plane, whatever the width (``alarm.rank`` of a 16-wide test model's 8 images is under 1).
RANK_FLOOR = 2.0


class CollapseAlarm:
    """Watches the logged records of one run; :meth:`observe` returns the alarm once.

    Args:
        cfg: the thresholds (``alarm.*``).
        num_prototypes: K (``loss.num_prototypes``).
        global_batch: images per step over all ranks (``optim.batch_size``): ``np`` counts
            the distinct target prototypes of the global batch, so at most ``min(B, K)``.
        local_batch: images per step on one rank: ``rank`` is measured on the local batch,
            so at most ``min(local batch, width)``.
        width: the embedding width D (``head.output_dim``).
        warmup_steps: the learning-rate warm-up in steps; "not learning" is judged from
            twice that on.
    """

    def __init__(self, cfg: AlarmConfig, num_prototypes: int, global_batch: int, local_batch: int, width: int,
                 warmup_steps: float):
        self.cfg = cfg
        self.num_prototypes = num_prototypes
        #: collapse below (or at) these: a handful of prototypes, a few embedding directions
        self.np_floor = max(1.0, cfg.prototypes * min(global_batch, num_prototypes))
        self.rank_floor = max(RANK_FLOOR, cfg.rank * min(local_batch, width))
        #: not learning below (or at) this largest target probability, from `learning_after` on
        self.uniform_ceiling = cfg.uniform / num_prototypes
        self.learning_after = 2 * warmup_steps
        self.streak: dict[str, int] = {"collapse": 0, "not learning": 0}
        self.fired: Optional[str] = None  #: the kind of alarm raised in this run, if any

    @classmethod
    def from_config(cls, cfg: MSNConfig, steps_per_epoch: int, world_size: int) -> "CollapseAlarm":
        """The alarm of a training run (``steps_per_epoch`` of the global batch)."""
        return cls(cfg.alarm, cfg.loss.num_prototypes, cfg.optim.batch_size, cfg.optim.batch_size // world_size,
                   cfg.head.output_dim, cfg.optim.warmup_epochs * steps_per_epoch)

    def diagnose(self, record: dict[str, Any]) -> tuple[str, list[str]] | None:
        """The kind (``collapse`` or ``not learning``) and the reasons one record shows, or
        ``None`` for a healthy one (no memory of earlier records)."""
        max_t, used, rank = record.get("max_t"), record.get("np"), record.get("rank")
        reasons = []
        if max_t is not None and max_t >= self.cfg.max_t:
            reasons.append(f"targets one-hot for most images (max_t {max_t:.3f} >= alarm.max_t {self.cfg.max_t})")
        if used is not None and used <= self.np_floor:
            reasons.append(f"{used:.1f} distinct target prototypes per batch (np <= {self.np_floor:.1f})")
        if rank is not None and rank <= self.rank_floor:
            reasons.append(f"target embeddings of effective rank {rank:.2f} (<= {self.rank_floor:.2f})")
        if reasons:
            return "collapse", reasons
        if max_t is not None and record.get("step", 0) >= self.learning_after and max_t <= self.uniform_ceiling:
            return "not learning", [f"targets near uniform (max_t {max_t:.5f} <= alarm.uniform/K = "
                                    f"{self.uniform_ceiling:.5f}) at twice the warm-up or later"]
        return None

    def observe(self, record: dict[str, Any]) -> str | None:
        """Take the next logged record; returns the alarm message the first time a kind has
        held for ``alarm.patience`` records in a row, else ``None``."""
        found = self._count(record)
        if found is None or self.fired is not None or self.streak[found[0]] < self.cfg.patience:
            return None
        kind, reasons = found
        self.fired = kind
        return (f"{kind}: at step {record.get('step')}, {'; '.join(reasons)} "
                f"({self.cfg.patience} logged records in a row). {ADVICE[kind]}.")

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Rebuild the state from the records a resumed run logged before (``metrics.jsonl``):
        the streaks, and whether an alarm was raised (a record with an ``alarm`` field)."""
        for record in records:
            self._count(record)
            if record.get("alarm") and self.fired is None:
                self.fired = str(record["alarm"]).split(":", 1)[0]

    def _count(self, record: dict[str, Any]) -> tuple[str, list[str]] | None:
        found = self.diagnose(record)
        for kind in self.streak:
            self.streak[kind] = self.streak[kind] + 1 if found is not None and found[0] == kind else 0
        return found
