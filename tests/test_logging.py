"""msn.logging: metrics.jsonl and wandb (offline), a resumed run continuing its wandb run."""

from __future__ import annotations

import json
import os

from msn import checkpoint

from conftest import TINY_OVERRIDES, run_script


def _offline_runs(out) -> list[str]:
    return sorted(p.name for p in (out / "wandb").glob("offline-run-*"))


def test_wandb_offline_resume_continues_the_run_and_logs_the_export(tmp_path):
    out = tmp_path / "run"
    common = [*TINY_OVERRIDES, "logging.wandb=offline", "logging.tags=[ablation,cpu]", "logging.group=g1",
              f"output_dir={out}"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_script("train.py", *common, "train.max_steps=2", env=env)
    assert first.returncode == 0, first.stderr
    run_id = checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["extra"]["wandb_run_id"]
    assert run_id and len(_offline_runs(out)) == 1 and _offline_runs(out)[0].endswith(run_id)
    second = run_script("train.py", *common, "train.max_steps=4", "logging.artifact=msn", env=env)
    assert second.returncode == 0, second.stderr
    assert checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["extra"]["wandb_run_id"] == run_id
    runs = _offline_runs(out)
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # the same run, continued
    assert (out / "export-msn" / "msn_export.json").is_file()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2, 4]


def test_artifact_format_is_checked_before_training(tmp_path):
    bad = run_script("train.py", *TINY_OVERRIDES, "logging.artifact=tflite", f"output_dir={tmp_path / 'r'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: logging.artifact: must be null or one of ")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_logger_passes_wandb_settings(monkeypatch, tmp_path):
    import wandb

    from msn.logging import MetricsLogger

    seen = {}

    class FakeRun:
        id = "abc123"

        def finish(self):
            seen["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or FakeRun())
    logger = MetricsLogger(tmp_path, "offline", {}, "proj", "name", run_id="abc123", entity="team",
                           tags=("x", "y"), group="sweep")
    logger.close()
    assert {k: seen[k] for k in ("id", "resume", "entity", "tags", "group", "project", "mode")} == {
        "id": "abc123", "resume": "allow", "entity": "team", "tags": ["x", "y"], "group": "sweep",
        "project": "proj", "mode": "offline"}
    assert seen["finished"] and os.path.isdir(tmp_path)
