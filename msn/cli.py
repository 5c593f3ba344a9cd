"""Command-line glue shared by the Hydra entry points: config errors become one line.

Exit codes of ``train.py``: 0 done; 2 bad configuration or data; 75 (``EX_TEMPFAIL``)
stopped by a preemption signal after writing ``checkpoints/latest.pt`` (run the same
command again to continue; in a Slurm job rank 0 has already requeued it, see
``docs/scaling.md``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from msn.config import ConfigError, DistConfig, load_config, validate

try:  # Hydra calls every hook of a callback: its base class gives the ones not defined here
    from hydra.experimental.callback import Callback as HydraCallback
except ImportError:  # no Hydra (a bare GPU image): the entry points cannot run, the callback is never made
    HydraCallback = object

log = logging.getLogger("msn")

#: The preemption flag an entry point installed before the heavy imports (``train.py``), for
#: the Hydra task below; a module-level list so that the task stays a plain function that
#: launchers (submitit) can pickle by reference.
_EARLY_SIGNALS: list = []


def train_main(early_signals=None) -> None:
    """``msn-train`` (and ``python train.py``): MSN pre-training from the command line,
    ``key=value`` overrides of the packaged configs (:mod:`msn.config_files`), ``-m`` sweeps.

    Args:
        early_signals: a :class:`~msn.train.preemption.PreemptionFlag` already watching
            (``train.py`` installs one before torch is imported); by default one is
            installed here, before Hydra and torch load.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: see train.py
    if early_signals is None:
        from msn.train.preemption import PreemptionFlag

        early_signals = PreemptionFlag(DistConfig().preempt_signals).__enter__()
    _EARLY_SIGNALS[:] = [early_signals]
    import hydra

    from msn.config_files import CONFIG_DIR

    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        _quiet_non_main_ranks(sys.argv)
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_train_task)()


def _train_task(raw: DictConfig) -> None:
    """The Hydra task of :func:`train_main`."""
    run_training(raw, _EARLY_SIGNALS[0] if _EARLY_SIGNALS else None)


def _quiet_non_main_ranks(argv: list[str]) -> None:
    """Ranks > 0 of torchrun/srun neither write ``.hydra/`` nor the log file (rank 0 does)."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if "SLURM_STEP_ID" in os.environ else None)
    if not rank or int(rank) == 0:
        return
    if not any(arg.startswith(("hydra.output_subdir=", "++hydra.output_subdir=")) for arg in argv):
        argv.append("hydra.output_subdir=null")
    if not any(arg.startswith("hydra/job_logging=") for arg in argv):
        argv.append("hydra/job_logging=stdout")


class CheckRunFolder(HydraCallback):
    """A Hydra callback (``hydra.callbacks`` of both packaged configs), run before Hydra writes
    its log file and ``.hydra/`` into the run folder: a folder that cannot be written (a
    read-only mount, no permission, a file in the way) is one line instead of Hydra's
    traceback, and so is a symbolic link under one of Hydra's names (it opens them with
    ``open(..., "w")``, which follows links; docs/security.md)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:  # noqa: ARG002 - Hydra's signature
        from omegaconf import OmegaConf

        folder = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        subdir = OmegaConf.select(config, "hydra.output_subdir")
        names = [f"{OmegaConf.select(config, 'hydra.job.name')}.log"]
        if subdir:
            names += [subdir, *(f"{subdir}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml"))]
        for name in names:
            if (folder / name).is_symlink():
                _fail(f"{folder / name}: is a symbolic link; a run folder's files are never written through links "
                      f"(remove it, or choose another output_dir)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            _fail(f"cannot write the run's files in {folder}: {error.strerror or error}")


def eval_lowshot_main() -> None:
    """``msn-eval-lowshot`` (and ``python eval_lowshot.py``): the low-shot evaluation
    (docs/eval.md); a configuration error is one line ``error: <key>: <message>``, status 2."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import hydra

    from msn.config_files import CONFIG_DIR
    from msn.eval import config as _eval_schema  # noqa: F401 - registers eval_schema before composition

    hydra.main(config_path=str(CONFIG_DIR), config_name="eval_lowshot", version_base="1.3")(_eval_task)()


def _eval_task(raw: DictConfig) -> None:
    """The Hydra task of :func:`eval_lowshot_main`."""
    from msn.eval.config import load_eval_config
    from msn.eval.lowshot import run_lowshot

    try:
        run_lowshot(load_eval_config(raw))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_training(raw: DictConfig, preemption=None) -> dict:
    """Set up the process group (torchrun / srun), validate ``raw`` and pre-train.

    A bad config or missing data exits with one line (status 2); a preemption signal exits
    with :data:`msn.train.preemption.EXIT_PREEMPTED` after the checkpoint is written.

    Args:
        raw: the composed config.
        preemption: a :class:`~msn.train.preemption.PreemptionFlag` already watching (so
            that signals of the start-up count); by default one is installed here.
    """
    from msn import distributed
    from msn.data.decode import BadImageError
    from msn.eval.monitor import LowShotProbe
    from msn.train import Trainer, TrainingDivergedError
    from msn.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag

    raw = with_job_output_dir(raw)
    try:
        cfg = load_config(raw)  # every key checked before anything starts
        _check_artifact_format(cfg.logging.artifact)
    except ConfigError as error:
        _fail(error)
    # signals are caught from here on (train.py catches them from its first lines and passes
    # its flag): a preemption during start-up stops the run at the first step boundary
    if preemption is None:
        preemption = PreemptionFlag(cfg.dist.preempt_signals)
    with preemption.watch(cfg.dist.preempt_signals):
        try:
            env = distributed.init_from_env(device=cfg.device, backend=cfg.dist.backend,
                                            timeout_min=cfg.dist.timeout_min, slurm=cfg.dist.slurm_env)
        except ValueError as error:
            _fail(error)
        if env.rank > 0:
            log.setLevel(logging.WARNING)  # one process reports progress
        try:
            try:
                validate(cfg, world_size=distributed.world_size())  # what depends on the process count
                trainer = Trainer(cfg, init_state=init_state(cfg.init_from, cfg.trust_pickle), probe=LowShotProbe.from_config)
            except (ConfigError, FileNotFoundError, ValueError) as error:
                _fail(error)
            try:
                record = trainer.fit(preemption, finish=_artifact_logger(cfg))
            except (ConfigError, TrainingDivergedError, BadImageError) as error:  # resume, divergence, data
                _fail(error)
            except OSError as error:  # a read-only output directory, a full disk
                _fail(f"cannot write the run's files: {error}")
            except Preempted as stop:
                if distributed.is_main_process():
                    note = _requeue(cfg.dist.requeue)
                    print(f"preempted: {stop}; {note}", file=sys.stderr)
                distributed.barrier()
                distributed.teardown()
                sys.exit(EXIT_PREEMPTED)
        finally:
            distributed.teardown()
    if record:
        log.info("finished at step %d: loss %.4f, np %d, max_t %.3f -> %s", record["step"], record["loss"],
                 record["np"], record["max_t"], cfg.output_dir)
    return record


def with_job_output_dir(raw: DictConfig) -> DictConfig:
    """In a Hydra multirun (``-m``) every job trains in its own directory, the one Hydra made
    for it (``multirun/NAME/N``), unless the sweep sets ``output_dir`` itself; otherwise all
    jobs would share ``outputs/NAME`` and each would resume the previous one's checkpoint."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return raw
    hydra_cfg = HydraConfig.get()
    swept = any(override.lstrip("+").startswith("output_dir=") for override in hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN or swept:
        return raw
    raw = raw.copy()
    raw.output_dir = hydra_cfg.runtime.output_dir
    return raw


def _check_artifact_format(name: str | None) -> None:
    if name is None:
        return
    from msn.export.formats import writable

    if name not in writable():
        raise ConfigError(f"logging.artifact: must be null or one of {', '.join(writable())}, got {name!r}")


def _artifact_logger(cfg):
    """``logging.artifact=FORMAT``: after the last step, export ``latest.pt`` in that format to
    ``OUTPUT_DIR/export-FORMAT`` and log the folder as a wandb artifact of the run."""
    if cfg.logging.artifact is None or cfg.logging.wandb == "disabled":
        return None

    def finish(logger) -> None:
        from msn import checkpoint
        from msn.export import export

        folder = Path(cfg.output_dir) / f"export-{cfg.logging.artifact}"
        export(checkpoint.find_latest(cfg.output_dir), folder, cfg.logging.artifact, overwrite=True)
        logger.log_artifact(folder, name=f"{cfg.name}-{cfg.logging.artifact}")
        log.info("logged %s as a wandb artifact", folder)

    return finish


def _requeue(mode: str) -> str:
    """``dist.requeue=auto`` in a Slurm job: ``scontrol requeue $SLURM_JOB_ID`` (the job goes
    back to the queue and re-runs the same command, which resumes from ``latest.pt``)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    if mode != "auto" or not job:
        return "run the same command again to resume"
    if shutil.which("scontrol") is None:
        return f"scontrol not found: requeue Slurm job {job} yourself"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        return f"`scontrol requeue {job}` failed: {result.stderr.strip()}"
    return f"requeued Slurm job {job}"


def init_state(path: str | None, trust_pickle: bool = False):
    """``init_from``: a callable loading weights into (network, target, prototypes); torch files
    are read as tensors and plain data unless ``trust_pickle`` (docs/security.md)."""
    if path is None:
        return None
    from msn.export import apply_init, load_init_weights

    def apply(network, target, prototypes):
        try:
            weights = load_init_weights(path, trust_pickle)
        except FileNotFoundError as error:
            raise ConfigError(f"init_from: {error}") from None
        for line in apply_init(network, target, prototypes, weights):
            log.info("init_from: %s", line)

    return apply


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line; for an exception re-raised from a data-loader
    worker (``Caught X in DataLoader worker ...`` + a traceback), the original message."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _fail(error: BaseException | str) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(2)
