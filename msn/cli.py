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
    except (ConfigError, FileNotFoundError) as error:
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
    from msn.export import loading

    if not hasattr(loading, "load_init_weights"):
        raise ConfigError("init_from: importing weights is not available in this version")

    def apply(network, target, prototypes):
        weights = loading.load_init_weights(path)
        loading.apply_init(network, target, prototypes, weights)

    return apply


def _fail(error: BaseException) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
