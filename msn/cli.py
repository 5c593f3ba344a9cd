"""Command-line glue shared by the Hydra entry points: config errors become one line."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from msn.config import ConfigError, load_config

log = logging.getLogger("msn")


def run_training(raw: DictConfig) -> dict:
    """Validate ``raw`` and pre-train; a bad config or missing data exits with one line."""
    from msn import distributed
    from msn.train import Trainer, TrainingDivergedError

    try:
        cfg = load_config(raw, world_size=distributed.world_size())
        trainer = Trainer(cfg, init_state=_init_state(cfg.init_from))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(error)
    try:
        record = trainer.fit()
    except TrainingDivergedError as error:
        _fail(error)
    if record:
        log.info("finished at step %d: loss %.4f, np %d, max_t %.3f -> %s", record["step"], record["loss"],
                 record["np"], record["max_t"], cfg.output_dir)
    return record


def _init_state(path: str | None):
    """``init_from``: a callable loading weights into (network, target, prototypes)."""
    if path is None:
        return None
    from msn.export import apply_init, load_init_weights

    def apply(network, target, prototypes):
        try:
            weights = load_init_weights(path)
        except FileNotFoundError as error:
            raise ConfigError(f"init_from: {error}") from None
        for line in apply_init(network, target, prototypes, weights):
            log.info("init_from: %s", line)

    return apply


def _fail(error: BaseException) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
