"""MSN pre-training entry point: ``python train.py experiment=fmnist_demo`` (see README)."""

import hydra
from omegaconf import DictConfig

from msn.cli import run_training


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
