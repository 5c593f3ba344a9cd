"""Fault injection: real processes, real signals, real files (docs/faults.md).

Each test breaks a run the way a user's machine does (kill -9 mid-run, a corrupt or foreign
checkpoint, litter of interrupted saves, a diverging update) and checks that nothing is
lost and that every fault ends in one line naming the file or key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from msn import checkpoint
from msn.train import Trainer, TrainingDivergedError

from conftest import ROOT, TINY_OVERRIDES
from cli_in_process import run_in_process

#: 400 synthetic images in batches of 8: 50 steps per epoch, a record every step.
LONG_EPOCH = [*TINY_OVERRIDES, "data.synthetic_size=400", "train.log_every=1"]


def steps_logged(out) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_kill_9_before_the_first_checkpoint_then_resume_logs_every_step_once(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_EPOCH, f"output_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(steps_logged(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    logged = steps_logged(out)
    assert len(logged) >= 3 and checkpoint.find_latest(out) is None, logged  # killed before step 50
    killed_records = (out / "metrics.jsonl").read_text()
    again = run_in_process("train.py", *LONG_EPOCH, "train.max_steps=5", f"output_dir={out}")
    assert again.returncode == 0, again.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5]  # the killed run's records are set aside, none twice
    assert (out / "metrics.jsonl.1.old").read_text() == killed_records  # kept, not deleted
    assert "is kept as metrics.jsonl.1.old" in again.stdout + again.stderr
    (out / "checkpoints" / "latest.pt").unlink()
    (out / "checkpoints" / "previous.pt").unlink(missing_ok=True)
    third = run_in_process("train.py", *LONG_EPOCH, "train.max_steps=2", f"output_dir={out}")
    assert third.returncode == 0 and (out / "metrics.jsonl.2.old").is_file()  # a second fresh start: .2.old


def test_resume_never_refuses_a_directory_holding_a_run(tmp_path):
    out = tmp_path / "run"
    first = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}")
    assert first.returncode == 0, first.stderr
    latest = out / "checkpoints" / "latest.pt"
    before, metrics = latest.read_bytes(), (out / "metrics.jsonl").read_text()
    again = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", "resume=never", f"output_dir={out}")
    assert again.returncode == 2
    assert last_line(again) == (f"error: resume=never: {out} already holds a run ({latest}); choose another "
                                "output_dir, or resume=auto to continue it")
    assert latest.read_bytes() == before and (out / "metrics.jsonl").read_text() == metrics


def test_corrupt_latest_falls_back_to_the_newest_epoch_copy_and_litter_is_removed(tmp_path):
    out = tmp_path / "run"
    keep_epochs = [*TINY_OVERRIDES, "data.synthetic_size=32", "train.checkpoint_every_epochs=1"]
    first = run_in_process("train.py", *keep_epochs, "train.max_steps=6", f"output_dir={out}")
    assert first.returncode == 0, first.stderr
    folder = out / "checkpoints"
    assert checkpoint.load_checkpoint(folder / "epoch_0001.pt")["step"] == 4
    (folder / "latest.pt").write_bytes((folder / "latest.pt").read_bytes()[:1000])  # a torn file
    assert checkpoint.load_checkpoint(folder / "previous.pt")["step"] == 4  # the checkpoint before it
    litter = folder / ".latest.pt.msn-k2j4.tmp"  # how an interrupted save names its temporary
    litter.write_bytes(b"\0" * 4096)
    foreign = folder / ".notes.tmp"  # not a name this project gives: never deleted
    foreign.write_text("mine")
    again = run_in_process("train.py", *keep_epochs, "train.max_steps=8", f"output_dir={out}")
    assert again.returncode == 0, again.stderr
    printed = again.stdout + again.stderr  # Hydra's log goes to stdout
    assert "latest.pt: not a readable checkpoint" in printed and f"continuing from {folder / 'previous.pt'}" in printed
    assert not litter.exists() and foreign.read_text() == "mine"
    assert checkpoint.load_checkpoint(folder / "latest.pt")["step"] == 8
    assert steps_logged(out) == [2, 4, 6, 8]  # step 6 logged once: the records after step 4 were cut

    (folder / "latest.pt").write_bytes(b"garbage")
    (folder / "previous.pt").unlink()
    epochs = run_in_process("train.py", *keep_epochs, "train.max_steps=8", f"output_dir={out}")
    assert epochs.returncode == 0 and f"continuing from {folder / 'epoch_0002.pt'}" in epochs.stdout + epochs.stderr

    (folder / "latest.pt").write_bytes(b"garbage")
    named = run_in_process("train.py", *TINY_OVERRIDES, f"resume={folder / 'latest.pt'}", f"output_dir={out}")
    assert named.returncode == 2
    assert last_line(named).startswith(f"error: resume: {folder / 'latest.pt'}: not a readable checkpoint")


def test_resuming_with_another_model_or_prototype_count_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}").returncode == 0
    latest = out / "checkpoints" / "latest.pt"
    for change, first in (("model.embed_dim=48", "encoder.backbone.vit.cls_token: shape (1, 1, 32) in the checkpoint, (1, 1, 48) here"),
                          ("model.depth=3", "encoder.backbone.vit.blocks.2.norm1.weight: missing in the checkpoint"),
                          ("loss.num_prototypes=12", "prototypes.weight: shape (8, 16) in the checkpoint, (12, 16) here")):
        result = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=3", change, "resume=force", f"output_dir={out}")
        assert result.returncode == 2, result.stderr
        line = last_line(result)
        assert line.startswith(f"error: resume: {latest} does not fit this config's model, head or prototypes ({first}"), line
        assert len(line) - len(str(latest)) < 200 and "Traceback" not in result.stderr


def test_non_finite_weights_never_reach_a_checkpoint(tiny_config, monkeypatch):
    """One-step epochs: the update of step 3 explodes the weights while its loss was finite;
    ``latest.pt`` must stay the step-2 state and the message must name it."""
    cfg = tiny_config(data={"synthetic_size": 8}, optim={"epochs": 6})
    trainer = Trainer(cfg)
    real_step = trainer.msn_step.optimizer.step

    def exploding_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if trainer.global_step == 2:  # the third update (steps count from 0 inside the update)
            with torch.no_grad():
                next(trainer.msn_step.network.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer.msn_step.optimizer, "step", exploding_step)
    latest = checkpoint.checkpoint_dir(cfg.output_dir) / checkpoint.LATEST
    with pytest.raises(TrainingDivergedError, match=f"non-finite weights after step 3.*last good checkpoint is {latest}"):
        trainer.fit()
    state = checkpoint.load_checkpoint(latest)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["encoder"].values() if t.is_floating_point())


def test_a_second_experiment_in_the_same_folder_is_refused_unless_forced(tmp_path):
    """``output_dir`` defaults to ``outputs/${name}`` and ``resume`` to ``auto``: a run with
    another recipe in that folder must not silently continue the first one."""
    out = tmp_path / "run"
    assert run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}").returncode == 0
    latest = out / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    other = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", "mask.ratio=0.7", f"output_dir={out}")
    assert other.returncode == 2
    assert last_line(other) == (f"error: resume=auto: {latest} holds a run with another config (mask.ratio: 0.5 -> 0.7); "
                                "choose another output_dir for a new run, or resume=force to continue this one")
    assert latest.read_bytes() == before
    # run length, logging, the monitor and paths may change: a requeued or extended run resumes silently
    same = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=3", "train.log_every=1", "logging.project=x",
                      f"output_dir={out}")
    assert same.returncode == 0 and "changed config" not in same.stdout + same.stderr
    forced = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", "mask.ratio=0.7", "resume=force", f"output_dir={out}")
    assert forced.returncode == 0 and "with a changed config: mask.ratio: 0.5 -> 0.7" in forced.stdout + forced.stderr
    assert checkpoint.load_checkpoint(latest)["step"] == 4


def test_changed_config_warning_says_unset(tmp_path):
    from msn.train.state import changed_keys

    assert changed_keys({"model": {"num_heads": None}}, {"model": {"num_heads": 4}}) == ["model.num_heads: unset -> 4"]


def test_a_class_without_images_names_the_data_root(tmp_path):
    from PIL import Image

    from msn.data import ImageFolderDataset

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match=f"data.root={tmp_path}: Found no valid file for the classes b"):
        ImageFolderDataset(str(tmp_path))


def _image_folder(root, broken: int, good: int):
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(good):
            Image.new("RGB", (40, 40), (10 * i, 60, 90)).save(root / cls / f"{i}.png")
        for i in range(broken):
            (root / cls / f"broken{i}.jpg").write_bytes(b"not an image")
    return root


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (loader workers are forks of the
    main process: they carry its command line, output_dir included)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as stream:
                    if text.encode() in stream.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("case", ["on_bad_image=error", "every image unreadable"])
def test_bad_images_with_loader_workers_exit_in_seconds_with_one_line(tmp_path, case):
    strict = case == "on_bad_image=error"
    root = _image_folder(tmp_path / "images", broken=1 if strict else 10, good=20 if strict else 0)
    overrides = [*TINY_OVERRIDES, "data=folder", f"data.root={root}", "data.num_workers=2", "train.max_steps=20",
                 f"output_dir={tmp_path / 'run'}", *(["data.on_bad_image=error"] if strict else [])]
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{case}: still running after 60 s")
    assert proc.returncode == 2, stderr
    line = stderr.strip().splitlines()[-1]
    if strict:
        assert line.startswith(f"error: {root / 'a' / 'broken0.jpg'}: cannot decode image"), line
    else:
        assert line.startswith("error: every image of a batch of 8 was unreadable, ") and "broken" in line, line
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not _processes_mentioning(str(tmp_path / "run")), "loader workers left behind"


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (the SigCgt mask of /proc)."""
    try:
        with open(f"/proc/{pid}/status") as stream:
            mask = next(int(line.split()[1], 16) for line in stream if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_during_start_up_stops_at_step_0_with_exit_75(tmp_path):
    """The handler is installed in train.py's first lines, before torch is imported: a SIGTERM
    sent then (the run is still starting) ends with a step-0 checkpoint and exit 75, not -15."""
    out = tmp_path / "run"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY_OVERRIDES, f"output_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _catches(proc.pid, signal.SIGTERM) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "preempted: stopped by SIGTERM at step 0" in stderr
    assert checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 0


def test_an_unwritable_checkpoint_folder_is_one_line(tmp_path):
    """A write that the file system refuses (here ``checkpoints`` is a file; a full disk or a
    read-only folder raise the same OSError) ends in one line, exit 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    result = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", f"output_dir={out}")
    assert result.returncode == 2, result.stderr
    assert last_line(result).startswith("error: cannot write the run's files: ") and "checkpoints" in last_line(result)
    assert "Traceback" not in result.stderr


def test_a_record_after_a_resume_says_how_many_steps_it_averages(tmp_path):
    out = tmp_path / "run"
    common = [*TINY_OVERRIDES, "data.synthetic_size=32", "optim.epochs=4", "train.log_every=4", f"output_dir={out}"]
    assert run_in_process("train.py", *common, "train.max_steps=4").returncode == 0
    assert run_in_process("train.py", *common, "train.max_steps=7").returncode == 0  # stopped mid-window
    assert run_in_process("train.py", *common, "train.max_steps=8").returncode == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["window_steps"]) for r in records] == [(4, 4), (7, 3), (8, 1)]


@pytest.mark.parametrize("name", ["USR1", "USR2"])
def test_usr_signals_stop_like_sigterm_with_exit_75(tmp_path, name):
    """Slurm's ``--signal`` sends USR1 or USR2: the same checkpoint-then-exit-75 as SIGTERM."""
    out = tmp_path / "run"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_EPOCH, f"output_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(steps_logged(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, f"SIG{name}"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    stopped = int(stderr.split(f"preempted: stopped by SIG{name} at step ")[1].split(",")[0])
    assert checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == stopped >= 2


def test_rank_0_requeues_its_slurm_job(tmp_path, monkeypatch):
    """``dist.requeue=auto`` in a Slurm job runs ``scontrol requeue <job>`` (``<array>_<task>``
    for an array job); ``never`` and a run outside Slurm do not (a fake scontrol records it)."""
    from msn.cli import _requeue

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert _requeue("auto") == "run the same command again to resume"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert _requeue("never") == "run the same command again to resume" and not calls.exists()
    assert _requeue("auto") == "requeued Slurm job 1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert _requeue("auto") == "requeued Slurm job 77_3"
    assert calls.read_text().splitlines() == ["requeue 1234", "requeue 77_3"]
