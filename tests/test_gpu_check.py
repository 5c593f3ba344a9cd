"""scripts/gpu_check.sh: its stated worst case is the sum of its stage limits, and its CPU
rehearsal runs every stage, survives a stage that times out and copies complete logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
#: The device tool brings back at most 8 files from $OUT (its README's limits).
MAX_FILES_BACK = 8
#: The worst case must leave the 15-minute device budget room for the machine's start and a rerun.
WORST_CASE_CAP_S = 420


def header() -> str:
    lines = SCRIPT.read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines[1:] if line.startswith("#"))


def test_stated_worst_case_is_the_sum_of_the_stage_limits():
    text = header()
    stated = re.search(r"= ([\d, and]+) s, and is killed GPU_CHECK_KILL_AFTER = (\d+) s after it: at most (\d+) s in all",
                       text)
    assert stated, "the header no longer states the limits, the kill grace and their sum"
    limits = [int(value) for value in re.findall(r"\d+", stated.group(1))]
    grace, total = int(stated.group(2)), int(stated.group(3))
    assert len(limits) == 7 and total == sum(limits) + grace * len(limits)
    printed = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True, timeout=30,
                             env={k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")})
    assert printed.returncode == 0 and int(printed.stdout) == total  # the script's own defaults
    assert total < WORST_CASE_CAP_S
    # the per-test limit sits inside the tests stage, so a hang is named before the stage ends
    per_test = int(re.search(r"\{GPU_CHECK_TEST_TIMEOUT:-(\d+)\}", SCRIPT.read_text()).group(1))
    assert per_test < limits[3]
    assert 'carry=[".whl"]' in text and "bash scripts/gpu_check.sh" in text


@pytest.mark.slow
def test_cpu_rehearsal_survives_a_timed_out_stage_and_copies_every_line(tmp_path):
    """Every limit x5 (a busy CPU), the report's 1 s x5 (its CPU dry run takes longer;
    tests/test_benchmarks.py runs it whole): that stage is reported TIMED OUT, the later
    stages still run, the exit status is 1, and $OUT receives at most 8 files, the summary
    among them with every line, its last one included."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(PYTHON=sys.executable, OUT=str(out), GPU_CHECK_LOGS=str(logs), GPU_CHECK_TIMEOUT_REPORT="1",
               GPU_CHECK_TIMEOUT_SCALE="5", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    summary = (logs / "gpu_check.log").read_text().splitlines()
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[gpu-check] report: TIMED OUT after 5s" in summary
    for name in ("info", "tests", "features"):
        assert any(line.startswith(f"[gpu-check] {name}: exit 0 after") for line in summary), name
    assert any(line.startswith("[gpu-check] solver: exit 0") or "bench_solver.py is absent" in line for line in summary)
    assert summary[-1].startswith("[gpu-check] copying")
    back = sorted(path.name for path in out.iterdir())
    assert len(back) <= MAX_FILES_BACK and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in back), back
    assert (out / "gpu_check.log").read_text().splitlines() == summary  # the copy holds the last line too
    with tarfile.open(out / "logs.tar.gz") as archive:
        packed = {os.path.normpath(name) for name in archive.getnames()}
    assert {"pytest.xml", "pytest.log", "features.log", "features.json", "gpu_check.log"} <= packed
    pytest_log = (out / "pytest.log").read_text()
    assert "SKIPPED" in pytest_log and "needs a CUDA device" in pytest_log  # -v -rA: every test named
    assert "| ViT-Ti/16 | 1 |" in (out / "features.log").read_text()
