"""The MSN pre-training loop (paper Sec. 3; docs/method.md Sec. 6 for the step order).

:class:`Trainer` builds the data, the :class:`msn.train.step.MSNStep` (models, optimiser,
schedules, masks) and the logger from one validated config, and runs the loop: one step per
batch, a metrics record every ``train.log_every`` steps, ``latest.pt`` at every epoch end,
stopping cleanly on a preemption signal (:mod:`msn.train.preemption`).

With several processes (``docs/scaling.md``) the online encoder + head is wrapped in DDP
(both forwards of a step are one DDP call), the heads' batch norms are synchronised
(``model.sync_bn``), the prototypes' gradient is all-reduced by hand
(``loss.proto_grad_reduce``), and ME-MAX / Sinkhorn reduce over ranks inside the loss, so a
step equals the single-process step on the concatenated global batch. The EMA target is
updated identically on every rank.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from msn import checkpoint, distributed, files
from msn.config import ConfigError, MSNConfig, to_dict
from msn.data import build_dataset, build_multiview_data, build_sampler, build_train_loader, start_epoch, training_subset
from msn.metrics_log import METRICS_FILE, MetricsLogger, progress_bar, read_metrics
from msn.runtime import loader_workers, resolve_device
from msn.train import state as train_state
from msn.train.collapse import CollapseAlarm
from msn.train.monitor import LiveMonitor, ProbeFactory
from msn.train.preemption import IgnoreSignals, Preempted, PreemptionFlag
from msn.train.step import STAT_NAMES, InitState, MSNStep

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class Trainer:
    """Builds every component from a validated :class:`MSNConfig` and runs pre-training.

    Args:
        cfg: validated configuration.
        init_state: optional callable ``(network, target, prototypes) -> None`` applied before
            the optimiser is built (``init_from``).
        probe: with ``monitor.enabled``, builds what the live monitor measures
            (:mod:`msn.train.monitor`; ``train.py`` and ``msn.pretrain`` pass
            ``msn.eval.monitor.LowShotProbe.from_config``).
    """

    def __init__(self, cfg: MSNConfig, init_state: InitState | None = None, probe: ProbeFactory | None = None):
        self.cfg = cfg
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device, distributed.local_rank() if self.world_size > 1 else None)
        self.output_dir = Path(cfg.output_dir)

        self.dataset = training_subset(build_dataset(cfg.data, train=True), cfg.data.subset, cfg.seed,
                                       cfg.data.shard_order == "local")
        global_batch = cfg.optim.batch_size
        self.steps_per_epoch = len(self.dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"optim.batch_size: {global_batch} is larger than the data set ({len(self.dataset)} images)")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.max_steps = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.monitor: LiveMonitor | None = None
        if cfg.monitor.enabled and probe is None:
            log.warning("monitor.enabled is set but no probe was given (Trainer(..., probe=...)); not monitoring")
        elif cfg.monitor.enabled:  # its images are drawn once, before the global generators are seeded
            self.monitor = LiveMonitor(cfg.monitor, probe(cfg, self.dataset))

        train_state.seed_everything(cfg.seed)  # the same initial weights on every rank
        #: the train step and everything it updates (networks, prototypes, optimiser, schedules)
        self.msn_step = MSNStep.from_config(cfg, self.device, self.steps_per_epoch, init_state)

        train_data, collate = build_multiview_data(self.dataset, cfg.data, cfg.seed)
        self.sampler = build_sampler(self.dataset, cfg.data, global_batch, cfg.seed, self.rank, self.world_size)
        workers = loader_workers(cfg.data.num_workers)
        self.loader = build_train_loader(
            train_data, self.sampler, workers,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
            persistent_workers=cfg.data.persistent_workers,
            collate=collate,
        )
        if workers > 0:  # Slurm signals every process: workers leave it to the main one
            self.loader.worker_init_fn = IgnoreSignals(cfg.dist.preempt_signals)
        self.global_step = 0
        #: the collapse alarm (rank 0 only; rebuilt from metrics.jsonl on resume)
        self.alarm = (CollapseAlarm.from_config(cfg, self.steps_per_epoch, self.world_size)
                      if cfg.alarm.enabled and self.is_main else None)
        #: the step of ``latest.pt`` (written or resumed in this process), and whether a finite
        #: step after it has shown it good (until then ``previous.pt`` is kept)
        self.latest_step: int | None = None
        self.latest_shown_good = False
        self.skipped_images = 0
        self.train_seconds = 0.0
        self.wandb_run_id: str | None = None
        if self.rank:
            train_state.seed_everything(train_state.rank_seed(cfg.seed, self.rank))  # per-rank global streams

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The full training state (collective: every rank calls it)."""
        extra = {"skipped_images": self.skipped_images, "train_seconds": self.train_seconds,
                 "world_size": self.world_size, "wandb_run_id": self.wandb_run_id}
        return train_state.gather_state(self.cfg, self.msn_step, self.global_step, self.steps_per_epoch, extra)

    def load_state_dict(self, state: dict[str, Any], path: str | Path = "the checkpoint") -> None:
        self.global_step = train_state.restore_state(state, self.msn_step, self.cfg.seed, self.rank, path)
        extra = state.get("extra", {})
        self.skipped_images = int(extra.get("skipped_images", 0))
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        self.wandb_run_id = extra.get("wandb_run_id")

    def maybe_resume(self) -> Path | None:
        """Apply ``resume`` (``auto``: ``checkpoints/latest.pt``, or the newest readable epoch copy,
        if present; ``never``: refuse a directory holding a run; or a path). Metrics logged
        after the resumed step (or, on a fresh start, by a run killed before its first
        checkpoint) are set aside as ``metrics.jsonl.N.old``, so ``metrics.jsonl`` holds every
        step once and nothing another run logged is lost."""
        # fsdp2: the full state stays in CPU memory, each rank moves only its shard to the device
        load_to = torch.device("cpu") if self.cfg.dist.strategy == "fsdp2" else self.device
        found = train_state.find_resume_state(self.cfg.resume, self.output_dir, load_to, self.cfg.trust_pickle)
        if found is None:
            aside = train_state.set_aside_metrics(self.output_dir / METRICS_FILE) if self.is_main else None
            if aside is not None:
                log.warning("fresh start: %s holds no checkpoint; its %s (a run stopped before its first checkpoint?) "
                            "is kept as %s", self.output_dir, METRICS_FILE, aside.name)
            return None
        path, state = found
        changed = train_state.changed_keys(state.get("config") or {}, to_dict(self.cfg))
        if changed and self.cfg.resume == "auto":
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ConfigError(f"resume=auto: {path} holds a run with another config ({', '.join(changed[:3])}{more}); "
                              f"choose another output_dir for a new run, or resume=force to continue this one")
        if changed:
            log.warning("resuming from %s with a changed config: %s", path, ", ".join(changed))
        self.load_state_dict(state, path)
        saved_world = int(state.get("extra", {}).get("world_size", 1))
        if saved_world != self.world_size:
            log.warning("resuming a run of %d process(es) with %d: the global batch (%d) and the data order are "
                        "unchanged, each process now takes %d images per step", saved_world, self.world_size,
                        self.cfg.optim.batch_size, self.cfg.optim.batch_size // self.world_size)
        if self.is_main:
            train_state.truncate_metrics(self.output_dir / METRICS_FILE, self.global_step)
            if self.alarm is not None and (self.output_dir / METRICS_FILE).is_file():
                self.alarm.replay(read_metrics(self.output_dir))
        self.latest_step, self.latest_shown_good = self.global_step, False
        log.info("resumed from %s at step %d", path, self.global_step)
        return path

    def save(self, epoch_copy: int | None = None) -> None:
        """Rank 0 writes ``latest.pt`` atomically (every rank must call: the state is gathered).

        Raises:
            TrainingDivergedError: a weight is NaN or infinite; no checkpoint is written, so
                the last one on disk is the last finite state.
        """
        if not self.msn_step.weights_finite():
            raise TrainingDivergedError(f"non-finite weights after step {self.global_step}; stopping without writing "
                                        f"a checkpoint. {self._latest_note()}")
        state = self.state_dict()
        if self.is_main:
            checkpoint.save_training_checkpoint(state, self.output_dir, epoch_copy, keep_previous=True)
        self.latest_step, self.latest_shown_good = self.global_step, False

    # ------------------------------------------------------------------ loop
    def train_step(self, batch) -> torch.Tensor:
        """One optimiser update on a :class:`msn.data.MultiViewBatch`; returns stacked stats
        (:data:`msn.train.step.STAT_NAMES`) without synchronising with the device. A step whose
        record is due also measures the target rank (``msn_step.target_rank``)."""
        stats = self.msn_step(batch, self.global_step, measure_rank=self._log_due(self.global_step + 1))
        self.global_step += 1
        self.skipped_images += batch.skipped
        return stats

    def fit(self, preemption: PreemptionFlag | None = None,
            finish: Callable[[MetricsLogger], None] | None = None) -> dict[str, Any]:
        """Train until ``train.max_steps`` (or the end of ``optim.epochs``); returns the last
        logged record.

        Args:
            preemption: an active :class:`PreemptionFlag` (the command line installs it before
                anything else, so that a signal during start-up is honoured too); by default
                one is active while this method runs.
            finish: called on rank 0 with the open logger after the last step (the command
                line logs the final export as a wandb artifact there).
        """
        cfg = self.cfg
        if preemption is None:
            with PreemptionFlag(cfg.dist.preempt_signals, self.device) as preemption:
                return self.fit(preemption, finish)
        preemption.device = self.device
        self.output_dir.mkdir(parents=True, exist_ok=True)
        train_state.check_run_folder(self.output_dir)  # every rank: all stop, none waits in a collective
        if self.is_main:
            for path in checkpoint.remove_stale_temporaries(self.output_dir):
                log.info("removed %s, left by an interrupted save", path.name)
        self.maybe_resume()  # before anything is written: resume=never may refuse the directory
        if self.is_main:
            files.write_text(self.output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
        logging_cfg = cfg.logging
        logger = MetricsLogger(self.output_dir, logging_cfg.wandb, to_dict(cfg), logging_cfg.project, logging_cfg.run_name or cfg.name,
                               enabled=self.is_main, run_id=self.wandb_run_id, entity=logging_cfg.entity, tags=logging_cfg.tags,
                               group=logging_cfg.group)
        self.wandb_run_id = logger.run_id  # kept in the checkpoint: a resumed run continues this wandb run
        self.msn_step.train()
        bar = progress_bar(self.max_steps, self.global_step, enabled=cfg.train.progress and self.is_main)
        try:
            record = self._loop(preemption, logger, bar)
            if finish is not None and self.is_main:
                finish(logger)
            return record
        except BaseException:
            self.close_loader()  # before the exception leaves: no worker is left behind
            raise
        finally:
            bar.close()
            logger.close()

    def close_loader(self) -> None:
        """Stop the loader's worker processes now. They ignore the preemption signals (the main
        process stops them at a step boundary), so they must be shut down through their queues
        before the interpreter exits, or its exit would wait for them forever."""
        iterator = getattr(self.loader, "_iterator", None)  # persistent workers live here
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None

    def _loop(self, preemption: PreemptionFlag, logger: MetricsLogger, bar) -> dict[str, Any]:
        """Steps until the end; a record every ``train.log_every`` steps and at epoch ends,
        ``latest.pt`` at epoch ends; stop on a preemption signal or a non-finite loss."""
        cfg = self.cfg
        window = StatsWindow(self.device)
        record: dict[str, Any] = {}
        last_good_step = self.global_step
        while self.global_step < self.max_steps:
            for batch in start_epoch(self.loader, *divmod(self.global_step, self.steps_per_epoch)):
                if preemption.agreed():  # before the step: a signal during start-up counts too
                    self._stop(preemption.signal_name)
                window.add(self.train_step(batch), self.msn_step.target_rank)
                bar.update(1)
                epoch_done = self.global_step % self.steps_per_epoch == 0
                finished = self.global_step >= self.max_steps
                monitor_due = self.monitor is not None and self.monitor.due(self.global_step, finished)
                if self._log_due(self.global_step):
                    record = self._make_record(*window.close(self.world_size))
                    if not math.isfinite(record["loss"]):
                        raise TrainingDivergedError(f"non-finite loss between steps {last_good_step + 1} and "
                                                    f"{self.global_step}; stopping. {self._latest_note()}")
                    last_good_step = self.global_step
                    if self.latest_step is not None and self.global_step > self.latest_step and not self.latest_shown_good:
                        self.latest_shown_good = True  # a finite step after latest.pt: the one before it can go
                        if self.is_main:
                            checkpoint.drop_previous(self.output_dir)
                    if monitor_due:  # into this step's record, its time outside every window
                        record.update(self._evaluate_monitor())
                        window.restart()
                    self._check_alarm(record)
                    logger.log(record)
                    bar.set_postfix(self._postfix(record))
                if epoch_done or finished:
                    epoch, every = self.global_step // self.steps_per_epoch, cfg.train.checkpoint_every_epochs
                    self.save(epoch if epoch_done and every and epoch % every == 0 else None)
                if finished:
                    break
        distributed.barrier()
        return record

    def _log_due(self, step: int) -> bool:
        """Whether the record is written after ``step`` updates: every ``train.log_every``
        steps, at epoch ends, at the last step and when the monitor evaluates."""
        finished = step >= self.max_steps
        return (step % self.cfg.train.log_every == 0 or finished or step % self.steps_per_epoch == 0
                or (self.monitor is not None and self.monitor.due(step, finished)))

    def _check_alarm(self, record: dict[str, Any]) -> None:
        """The collapse alarm (:mod:`msn.train.collapse`): once per run, a warning and an
        ``alarm`` field in this record (rank 0)."""
        message = self.alarm.observe(record) if self.alarm is not None else None
        if message:
            record["alarm"] = message
            log.warning("%s", message)

    def _evaluate_monitor(self) -> dict[str, Any]:
        """The live monitor's values (:mod:`msn.train.monitor`); its seconds count in ``time_s``."""
        values = self.monitor(self.msn_step.target, self.device, self.msn_step.param_dtype, self.msn_step.autocast)
        self.train_seconds += values["monitor/seconds"]
        return {**values, "time_s": round(self.train_seconds, 3)}

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """The progress bar's numbers: loss, np, images/s and the latest monitored k-NN accuracy."""
        postfix = {"loss": f"{record['loss']:.3f}", "np": str(int(record["np"])), "img_s": f"{record['img_per_s']:.0f}"}
        if record.get("rank") is not None:
            postfix["rank"] = f"{record['rank']:.1f}"
        if self.alarm is not None and self.alarm.fired:  # stays on the bar once raised
            postfix["alarm"] = self.alarm.fired
        if self.monitor is not None and "monitor/knn_top1" in self.monitor.last:
            postfix["knn"] = f"{self.monitor.last['monitor/knn_top1']:.1f}"
        return postfix

    def _stop(self, signal_name: str) -> None:
        """Write ``latest.pt`` on a preemption signal and raise :class:`Preempted`."""
        self.save()
        distributed.barrier()  # latest.pt is on disk before any rank exits
        if self.is_main:
            log.warning("%s at step %d: wrote %s", signal_name, self.global_step,
                        checkpoint.checkpoint_dir(self.output_dir) / checkpoint.LATEST)
        raise Preempted(self.global_step, signal_name)

    def _make_record(self, means: list[float], minimum: float, steps: int, elapsed: float,
                     rank: float | None = None) -> dict[str, Any]:
        self.train_seconds += elapsed
        values = dict(zip(STAT_NAMES, means))
        values["min_max_t"] = minimum
        values["rank"] = rank  # RankMe of the record's last step, mean over ranks (None: not measured)
        return {
            "step": self.global_step,
            "epoch": (self.global_step - 1) // self.steps_per_epoch,
            **values,
            **self.msn_step.schedules.at_update(self.global_step - 1),
            "img_per_s": steps * self.cfg.optim.batch_size / max(elapsed, 1e-9),
            "window_steps": steps,  # steps this record averages (fewer after a resume mid-window)
            "skipped_images": self.skipped_images,
            "time_s": round(self.train_seconds, 3),
        }

    def _latest_note(self) -> str:
        """The newest checkpoint known good: ``latest.pt`` once a finite step followed it, else
        ``previous.pt`` (a checkpoint is good when the step after it was finite)."""
        latest, previous = checkpoint.find_latest(self.output_dir), checkpoint.find_previous(self.output_dir)
        if latest is None:
            return "No checkpoint was written."
        if self.latest_step is not None and not self.latest_shown_good and self.global_step > self.latest_step:
            if previous is None:
                return (f"{latest} (step {self.latest_step}) was followed by a non-finite step, and no earlier "
                        f"checkpoint is kept: start again with other settings.")
            return (f"{latest} (step {self.latest_step}) was followed by a non-finite step; the last good checkpoint "
                    f"is {previous}: resume={previous} continues from it.")
        return f"The last good checkpoint is {latest}."


class StatsWindow:
    """Step statistics between two log records, kept on the device (no synchronisation per
    step): sums of every statistic, the window minimum of the last one, and the latest
    measured target rank."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(STAT_NAMES), device=device)
        self.minimum = torch.full((), math.inf, device=device)
        self.rank: torch.Tensor | None = None
        self.steps, self.start = 0, time.perf_counter()

    def add(self, stats: torch.Tensor, rank: torch.Tensor | None = None) -> None:
        self.sums += stats
        self.minimum = torch.minimum(self.minimum, stats[-1])
        if rank is not None:
            self.rank = rank
        self.steps += 1

    def close(self, world_size: int) -> tuple[list[float], float, int, float, float | None]:
        """Means over steps and ranks, the minimum over ranks, the step count, the seconds and
        the latest rank (mean over ranks; every rank measures on the same steps); then start a
        new window."""
        elapsed = time.perf_counter() - self.start
        means = (distributed.all_reduce_sum_(self.sums / self.steps) / world_size).tolist()
        minimum = float(distributed.all_reduce_min_(self.minimum))
        rank = None if self.rank is None else float(distributed.all_reduce_sum_(self.rank.float().clone()) / world_size)
        steps = self.steps
        self.rank = None
        self.sums.zero_()
        self.minimum.fill_(math.inf)
        self.steps, self.start = 0, time.perf_counter()
        return means, minimum, steps, elapsed, rank

    def restart(self) -> None:
        """Start the clock of the open window now (what ran since its start is not training)."""
        self.start = time.perf_counter()
