"""kill -9 at the worst moments of a run's file writes (docs/faults.md).

A training process is killed with SIGKILL at an exact moment of a write (a wrapper around
``msn.cli.train_main`` kills its own process at the N-th call that touches a given file), then
the same ``train.py`` command is run again. Every case must end as an uninterrupted run does: the
final ``latest.pt`` equal to the bit (every tensor, the RNG states included), every step logged
once in ``metrics.jsonl``, the temporaries of the killed write removed at the next start and no
other file removed. The moments:

* (a) ``latest.pt`` half written: the temporary exists, torn, not renamed;
* (b) ``latest.pt`` fully written, killed in its ``fsync``, before the rename;
* (c) the cut-back of ``metrics.jsonl`` on resume (``msn.train.state.truncate_metrics``, written
  through ``msn.files.write_text``), killed in its ``fsync``.

At each kill the file being replaced must still be the old one: a new version appears under its
name only after it is complete and on disk (the rename comes after the fsync).

The seven runs (an uninterrupted one, three killed, three resumed) are processes of one thread
each, started in three rounds of concurrent processes: the whole file is one fixture and one test
per moment, ~25 s on 2 idle cores (each process spends ~5 s of CPU importing torch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from msn import checkpoint
from msn.files import is_own_temporary

from conftest import ROOT, TINY_OVERRIDES, assert_same_state

#: 32 images in batches of 8: 4 steps an epoch, 8 steps; records at 2, 4, 6, 8; ``latest.pt``
#: written twice, at step 4 and step 8 (the write the kills interrupt is the second one).
RUN = [*TINY_OVERRIDES, "data.synthetic_size=32"]
ALL_STEPS = [2, 4, 6, 8]
#: One thread per process: the runs go concurrently on a small machine, and every run of the
#: comparison computes with the same thread count.
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Files the trainer itself replaces by design between two starts (``previous.pt`` is dropped
#: once a finite step follows ``latest.pt``): not counted as removed by the clean-up.
MANAGED = {"checkpoints/previous.pt"}

#: Runs ``train.py``'s entry point with the same arguments, and kills its own process with
#: SIGKILL at one moment of a file write. ``MSN_TEST_KILL=MOMENT:NAME:N``: the N-th time that
#: MOMENT touches NAME or one of its temporaries (``.NAME.msn-XXXX.tmp``).
#: torn: ``torch.save`` into the temporary has written half of the bytes (flushed);
#: fsync: ``os.fsync`` of the temporary is entered (everything written, nothing renamed).
KILLER = '''
import os, signal, sys

moment, name, nth = os.environ.pop("MSN_TEST_KILL").split(":")
sys.argv[0] = {train!r}
calls = 0


def due(path):
    global calls
    base = os.path.basename(path)
    if base == name or (base.startswith("." + name + ".msn-") and base.endswith(".tmp")):
        calls += 1
        return calls == int(nth)
    return False


def written(fd):
    return os.readlink("/proc/self/fd/%d" % fd)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if moment == "fsync":
    real_fsync = os.fsync

    def fsync(fd):
        if due(written(fd)):
            die()
        return real_fsync(fd)

    os.fsync = fsync
elif moment == "torn":
    import io

    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if hasattr(f, "fileno") and due(written(f.fileno())):
            data = io.BytesIO()
            real_save(obj, data, *args, **kwargs)
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
else:
    raise SystemExit("unknown moment " + moment)

from msn.cli import train_main

train_main()
'''

#: Files planted in the run folder before each resume: named like temporaries, but not as
#: ``msn.files`` names its own (or a link); the clean-up must leave them.
FOREIGN = [".notes.tmp", ".latest.pt.msn-keep", "latest.pt.msn-1234.tmp", ".metrics.jsonl.backup.tmp"]


def start(out: Path, killer: Path | None = None, kill_at: str | None = None) -> subprocess.Popen:
    """``train.py RUN output_dir=out`` in the background (through the killer when ``kill_at``)."""
    env = dict(ENV, MSN_TEST_KILL=kill_at) if kill_at else ENV
    script = killer if kill_at else ROOT / "train.py"
    return subprocess.Popen([sys.executable, str(script), *RUN, f"output_dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str]]:
    """Each process's exit status and standard error, once all have ended (none left behind)."""
    try:
        return {key: (proc.wait(timeout=300), proc.stderr.read()) for key, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def own_temporaries(out: Path) -> list[str]:
    """Temporaries named as ``msn.files`` names them, anywhere in the run folder."""
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if is_own_temporary(path))


def files_in(out: Path) -> set[str]:
    return {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file() or path.is_symlink()}


def plant_foreign(out: Path) -> list[Path]:
    """Foreign files (and a link named as a temporary) in the run folder and ``checkpoints/``."""
    planted = []
    outside = out.parent / f"{out.name}-outside.txt"
    outside.write_text("not the run's")
    for folder in (out, out / "checkpoints"):
        folder.mkdir(exist_ok=True)
        for name in FOREIGN:
            (folder / name).write_text("mine")
            planted.append(folder / name)
        link = folder / ".latest.pt.msn-link.tmp"
        link.symlink_to(outside)
        planted.append(link)
    return planted


def latest_step(out: Path) -> int | str | None:
    """The step of ``latest.pt``; None when there is none, "unreadable" for a torn file."""
    latest = checkpoint.find_latest(out)
    try:
        return None if latest is None else checkpoint.load_checkpoint(latest)["step"]
    except ValueError:
        return "unreadable"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, in three rounds of concurrent processes; returns what each
    looked like after its kill and after its resume."""
    root = tmp_path_factory.mktemp("kills")
    killer = root / "killer.py"
    killer.write_text(KILLER.format(train=str(ROOT / "train.py")))
    cases = {"torn": "torn:latest.pt:2", "fsync": "fsync:latest.pt:2"}
    seen: dict = {"reference": root / "reference"}

    # round 1: the uninterrupted run, and one run killed at each moment of the second latest.pt write
    procs = {"reference": start(root / "reference")}
    procs.update({case: start(root / case, killer, kill_at) for case, kill_at in cases.items()})
    seen["first"] = finish(procs)
    # (c) continues from the fsync case as its kill left it, in a folder of its own
    shutil.copytree(root / "fsync", root / "cutback", symlinks=True)
    for case in cases:
        seen[case] = {"killed": _after_kill(root / case), "planted": plant_foreign(root / case)}
    before_cutback = _after_kill(root / "cutback")

    # round 2: the resumes (the same command, plain train.py), and the cut-back killed in its fsync
    procs = {case: start(root / case) for case in cases}
    procs["cutback"] = start(root / "cutback", killer, "fsync:metrics.jsonl:1")
    seen["second"] = finish(procs)
    for case in cases:
        seen[case]["resumed"] = _after_kill(root / case)
    seen["cutback"] = {"before": before_cutback, "killed": _after_kill(root / "cutback"),
                       "planted": plant_foreign(root / "cutback")}

    # round 3: the resume after the interrupted cut-back
    seen["third"] = finish({"cutback": start(root / "cutback")})
    seen["cutback"]["resumed"] = _after_kill(root / "cutback")
    seen["root"] = root
    return seen


def _after_kill(out: Path) -> dict:
    """What the run folder holds now."""
    metrics = out / "metrics.jsonl"
    return {"files": files_in(out), "temporaries": own_temporaries(out), "latest_step": latest_step(out),
            "steps": steps_logged(out), "metrics": metrics.read_bytes() if metrics.is_file() else None}


def _assert_resumed_like_the_uninterrupted_run(runs, case: str, status: tuple[int, str]) -> None:
    out, reference = runs["root"] / case, runs["reference"]
    code, stderr = status
    assert code == 0, stderr[-3000:]
    after, resumed = runs[case]["killed"], runs[case]["resumed"]
    assert resumed["temporaries"] == [], f"left by the kill, not removed at the next start: {resumed['temporaries']}"
    kept = {name for name in after["files"] if name not in after["temporaries"] and name not in MANAGED}
    assert kept <= resumed["files"], f"removed: {sorted(kept - resumed['files'])}"
    for path in runs[case]["planted"]:  # foreign files untouched
        assert os.path.lexists(path), f"removed at the next start, not a temporary of ours: {path}"
        assert path.is_symlink() or path.read_text() == "mine", path
    assert resumed["steps"] == ALL_STEPS, resumed["steps"]  # every step logged once
    assert steps_logged(reference) == ALL_STEPS
    final = checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")
    expected = checkpoint.load_checkpoint(reference / "checkpoints" / "latest.pt")
    assert final["step"] == 8
    assert assert_same_state(final, expected) > 50  # every tensor, the RNG states included


def _assert_killed_before_the_new_latest_was_visible(runs, case: str) -> None:
    code, stderr = runs["first"][case]
    assert code == -signal.SIGKILL, f"{case}: the kill never came (exit {code}): {stderr[-2000:]}"
    after = runs[case]["killed"]
    assert after["latest_step"] == 4, "latest.pt must stay step 4's until the new one is complete and synced"
    assert [Path(name).name.startswith(".latest.pt.msn-") for name in after["temporaries"]] == [True]
    assert after["steps"] == ALL_STEPS  # step 8's record was logged before its checkpoint


def test_reference_run_is_uninterrupted(runs):
    code, stderr = runs["first"]["reference"]
    assert code == 0, stderr[-3000:]
    assert latest_step(runs["reference"]) == 8 and steps_logged(runs["reference"]) == ALL_STEPS


def test_kill_9_with_latest_pt_half_written_then_resume_is_bitwise_the_uninterrupted_run(runs):
    _assert_killed_before_the_new_latest_was_visible(runs, "torn")
    _assert_resumed_like_the_uninterrupted_run(runs, "torn", runs["second"]["torn"])


def test_kill_9_during_the_fsync_of_latest_pt_then_resume_is_bitwise_the_uninterrupted_run(runs):
    _assert_killed_before_the_new_latest_was_visible(runs, "fsync")
    _assert_resumed_like_the_uninterrupted_run(runs, "fsync", runs["second"]["fsync"])


def test_kill_9_during_the_metrics_cut_back_on_resume_then_resume_logs_every_step_once(runs):
    """The resume from step 4 cuts ``metrics.jsonl`` back to the records up to step 4; killed
    in the fsync of that rewrite, ``metrics.jsonl`` must still be the whole old file (no record
    lost, none half cut), and the next start must remove the rewrite's temporary."""
    cut = runs["cutback"]
    code, stderr = runs["second"]["cutback"]
    assert code == -signal.SIGKILL, f"the kill never came (exit {code}): {stderr[-2000:]}"
    assert [name.startswith("checkpoints/.latest.pt.msn-") for name in cut["before"]["temporaries"]] == [True]
    assert cut["killed"]["metrics"] == cut["before"]["metrics"]  # untouched: records of steps 2..8
    assert cut["killed"]["latest_step"] == 4
    # the start-up clean-up ran before the cut-back: the checkpoint's temporary is gone, the rewrite's is there
    assert [Path(name).name.startswith(".metrics.jsonl.msn-") for name in cut["killed"]["temporaries"]] == [True]
    _assert_resumed_like_the_uninterrupted_run(runs, "cutback", runs["third"]["cutback"])
