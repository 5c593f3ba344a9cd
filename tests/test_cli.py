"""End-to-end runs of ``train.py`` through Hydra, as a user types them."""

import json

import pytest

from msn import checkpoint

from conftest import TINY_OVERRIDES
from cli_in_process import run_in_process


def test_cli_run_writes_metrics_checkpoint_and_config(tmp_path):
    out = tmp_path / "run"
    result = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=3", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 3]
    assert records[-1]["lr"] > 0 and records[-1]["np"] >= 1
    state = checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert state["step"] == 3 and "optimizer" in state and "rng" in state
    assert (out / "config.yaml").is_file() and (out / ".hydra" / "config.yaml").is_file()
    # running the same command again resumes from latest and stops at the same step
    again = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", f"output_dir={out}")
    assert again.returncode == 0, again.stderr
    assert checkpoint.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 4


def test_bad_config_and_missing_data_fail_with_one_line(tmp_path):
    bad = run_in_process("train.py", *TINY_OVERRIDES, "mask.ratio=1.5", f"output_dir={tmp_path / 'a'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: mask.ratio: must be in [0, 1), got 1.5"
    missing = run_in_process("train.py", *TINY_OVERRIDES, "data=folder", f"data.root={tmp_path / 'nope'}",
                         f"output_dir={tmp_path / 'b'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: data.root: directory not found")
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_multirun_gives_every_job_its_own_directory(tmp_path):
    """``-m optim.lr=...,...``: two jobs, two runs of the full length with different weights
    (they used to share ``outputs/NAME``: job 2 resumed job 1's checkpoint and trained nothing)."""
    import torch

    sweep = tmp_path / "sweep"
    result = run_in_process("train.py", "-m", *TINY_OVERRIDES, "train.max_steps=3", "optim.lr=1e-3,5e-2",
                        f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    states = [checkpoint.load_checkpoint(sweep / str(job) / "checkpoints" / "latest.pt") for job in (0, 1)]
    assert [s["step"] for s in states] == [3, 3]
    assert [s["config"]["optim"]["lr"] for s in states] == [1e-3, 5e-2]
    assert [s["config"]["output_dir"] for s in states] == [str(sweep / "0"), str(sweep / "1")]
    first = next(iter(states[0]["encoder"]))
    assert not torch.equal(states[0]["encoder"][first], states[1]["encoder"][first])
    for job in (0, 1):
        assert [json.loads(line)["step"] for line in open(sweep / str(job) / "metrics.jsonl")] == [2, 3]


@pytest.mark.parametrize("script", ["train.py", "eval_lowshot.py"])
def test_an_unwritable_run_folder_is_one_line_before_hydra_writes(tmp_path, script):
    """A folder that cannot be made (here a file is in the way; a read-only mount or missing
    permission fail the same call) used to end in Hydra's traceback from its log handler."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    overrides = [*TINY_OVERRIDES, "train.max_steps=1"] if script == "train.py" else ["baseline=pixels", "data=synthetic"]
    result = run_in_process(script, *overrides, f"output_dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot write the run's files in {out}: Not a directory"]


def test_a_run_inside_the_test_process_leaves_its_state_as_it_was(tmp_path):
    """tests/cli_in_process.py: the signal handlers train.py installs (a config error exits
    before they are handed back), Hydra's logging handlers and job config, the environment and
    the working directory are put back after the run."""
    import logging
    import os
    import signal

    from hydra.core.hydra_config import HydraConfig

    before = ({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)},
              list(logging.getLogger().handlers), dict(os.environ), os.getcwd())
    result = run_in_process("train.py", *TINY_OVERRIDES, "mask.ratio=1.5", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: mask.ratio: must be in [0, 1), got 1.5"]
    assert (tmp_path / "run" / "train.log").is_file()  # Hydra's file handler was made, and is gone again
    after = ({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)},
             list(logging.getLogger().handlers), dict(os.environ), os.getcwd())
    assert after == before and not HydraConfig.initialized()
