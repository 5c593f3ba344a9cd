"""msn.metrics_log: metrics.jsonl and wandb (offline), a resumed run continuing its wandb run, and
training on a machine without wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from msn import checkpoint

from conftest import ROOT, TINY_OVERRIDES, run_script


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

    from msn.metrics_log import MetricsLogger

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


#: Run ``train.py`` (Hydra, the command line, the trainer, the logger) in a process where
#: ``import wandb`` fails, as on a machine without it. Each attempt is written to a file with
#: the file that asked for it, so that an import of ours hidden behind ``try/except
#: ImportError`` is caught too (timm's ``timm.utils`` tries one at import time and carries on
#: without it: that one is not ours).
_WITHOUT_WANDB = """
import importlib.abc, runpy, sys
attempts_file, script, *args = sys.argv[1:]

class NoWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "wandb" and not name.startswith("wandb."):
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(("<frozen", "<string>")):
            frame = frame.f_back
        where = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
        with open(attempts_file, "a") as stream:
            stream.write(f"{name}\\t{where}\\n")
        raise ImportError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, NoWandb())
for name in [n for n in sys.modules if n == "wandb" or n.startswith("wandb.")]:
    del sys.modules[name]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    assert "wandb" not in sys.modules
"""


def test_training_runs_without_wandb_installed(tmp_path):
    """``logging.wandb=disabled`` (the default) never imports wandb: a short run completes,
    writes its metrics and checkpoint, and no module of this repository asked for wandb."""
    out, attempts = tmp_path / "run", tmp_path / "wandb_imports.tsv"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_WANDB, str(attempts), str(ROOT / "train.py"),
                           *TINY_OVERRIDES, "logging.wandb=disabled", "train.max_steps=2", f"output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tried = [line.split("\t") for line in attempts.read_text().splitlines()] if attempts.exists() else []
    ours = [(name, where) for name, where in tried if where.startswith(str(ROOT)) and "site-packages" not in where]
    assert not ours, f"wandb imported by the repository with logging.wandb=disabled: {ours}"
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2]
    assert checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 2


def test_a_value_not_measured_is_null_in_metrics_and_left_out_of_wandb(monkeypatch, tmp_path):
    import wandb

    from msn.metrics_log import MetricsLogger, read_metrics

    logged = []

    class FakeRun:
        id = "r1"

        def log(self, values, step=None):
            logged.append((values, step))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    logger = MetricsLogger(tmp_path, "offline", {})
    logger.log({"step": 2, "loss": 1.5, "rank": None, "alarm": "collapse: at step 2"})
    logger.close()
    assert logged == [({"loss": 1.5, "alarm": "collapse: at step 2"}, 2)]
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 1.5, "rank": None, "alarm": "collapse: at step 2"}]
