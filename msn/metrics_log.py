"""Run outputs: ``metrics.jsonl``, optional wandb, console progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from msn.files import open_append

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append one JSON object per log step to ``<output_dir>/metrics.jsonl`` and mirror it to
    wandb when ``wandb_mode`` is ``offline`` or ``online`` (``disabled`` never imports wandb).

    Args:
        output_dir: run directory.
        wandb_mode: ``disabled``, ``offline`` or ``online``.
        config: the resolved config, recorded by wandb.
        project, run_name: wandb project and run name.
        enabled: ``False`` on non-zero ranks.
        run_id: the wandb run to continue (a resumed run keeps its id in the checkpoint);
            ``None`` starts a new one. :attr:`run_id` holds the id in use.
        entity, tags, group: wandb's own settings (team or user, run tags, run group).
    """

    def __init__(self, output_dir: str | os.PathLike, wandb_mode: str = "disabled", config: dict | None = None,
                 project: str = "msn", run_name: str | None = None, enabled: bool = True, *,
                 run_id: str | None = None, entity: str | None = None, tags: Sequence[str] = (),
                 group: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.run_id = run_id
        self._wandb_run = None
        if enabled and wandb_mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(project=project, name=run_name, mode=wandb_mode, dir=str(output_dir),
                                         config=config, id=run_id, resume="allow", entity=entity,
                                         tags=list(tags) or None, group=group)
            self.run_id = self._wandb_run.id

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open_append(self.path) as stream:  # a link planted under the name is refused
            stream.write(json.dumps(clean) + "\n")
        if self._wandb_run is not None:
            # a value a record lacks this time (``rank`` on a step it was not measured) is left out
            self._wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record.get("step"))

    def log_artifact(self, folder: str | os.PathLike, name: str, kind: str = "model") -> None:
        """Upload (or, offline, stage) a folder as a wandb artifact of this run."""
        if self._wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind)
        artifact.add_dir(str(folder))
        self._wandb_run.log_artifact(artifact)

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    with open(Path(output_dir) / METRICS_FILE, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool = True) -> tqdm:
    """Step progress bar with ETA (tqdm)."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not enabled, smoothing=0.1)
