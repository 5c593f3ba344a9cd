#!/usr/bin/env bash
# The prepared GPU check: one command, at most 8 minutes on a lent H200 (bare image: its own
# python3 with torch, no hydra-core/omegaconf, no network).
#
#   bash scripts/gpu_check.sh            (make gpu-check)
#
# 1. installs the wheels of .whl/ (scripts/gpu_wheels.sh fetches them beforehand, where a
#    registry is reachable) into a private folder put first on PYTHONPATH;
# 2. prints nvidia-smi, the torch build and the GPU;
# 3. runs the CUDA tests: python3 -m pytest -q -m cuda tests/test_cuda.py;
# 4. runs benchmarks/gpu_report.py (docs/results/benchmarks_gpu.md and .json);
# 5. copies the page, the JSON and the logs into $OUT when it is set.
# Each stage has its own time limit (GPU_CHECK_TIMEOUT_{INSTALL,INFO,TESTS,REPORT}: 40, 20, 200 and
# 200 s, with nvidia-smi 20 s: 480 s at worst),
# so one hang cannot eat the budget; the exit status is non-zero when a stage failed, after
# everything that was produced has been copied.
#
# Without CUDA it rehearses the same path: the tests are skipped ("needs a CUDA device") and
# the report runs its CPU dry run, written under the log folder instead of docs/results.
# PYTHON picks the interpreter (default python3; here: PYTHON=.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
logs=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/msn-gpu-check.XXXXXX")}
site=${GPU_CHECK_SITE:-$logs/site}
mkdir -p "$logs"
t_install=${GPU_CHECK_TIMEOUT_INSTALL:-40}
t_info=${GPU_CHECK_TIMEOUT_INFO:-20}
t_tests=${GPU_CHECK_TIMEOUT_TESTS:-200}
t_report=${GPU_CHECK_TIMEOUT_REPORT:-200}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

summary=$logs/gpu_check.log
failed=0
started=$(date +%s)
say() { echo "[gpu-check] $*" | tee -a "$summary"; }

# stage NAME LIMIT LOG COMMAND...: run with a time limit, output to the console and LOG
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local begin rc
  begin=$(date +%s)
  say "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "$name: TIMED OUT after ${limit}s"
  fi
  say "$name: exit $rc after $(( $(date +%s) - begin ))s"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

collect() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for file in "$summary" "$logs/info.txt" "$logs/pytest.log" "$logs/report.log" \
                "$report_dir/benchmarks_gpu.md" "$report_dir/benchmarks_gpu.json"; do
      [ -f "$file" ] && cp "$file" "$OUT/"
    done
    say "copied the page, the JSON and the logs to $OUT"
  fi
}

say "logs in $logs; python: $python"

# 1. wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  stage install "$t_install" "$logs/install.log" \
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site:$PYTHONPATH"
else
  say "install: no .whl/*.whl (make gpu-wheels fetches them); using the interpreter's own packages"
fi

# 2. the machine
cuda=0
{
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
  true
} >"$logs/info.txt" 2>&1
stage info "$t_info" "$logs/info.py.log" "$python" -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.0f} GiB | sm_{p.major}{p.minor}",
          "| bf16:", torch.cuda.is_bf16_supported(), "| nccl:", torch.distributed.is_nccl_available())
import timm, omegaconf, hydra
print("timm", timm.__version__, "| omegaconf", omegaconf.__version__, "| hydra", hydra.__version__, "from", hydra.__file__)
import msn.train, msn.config
print("msn imports: ok")
'
cat "$logs/info.py.log" >>"$logs/info.txt"
grep -q "^cuda available: True" "$logs/info.py.log" && cuda=1

# 3. the CUDA tests
stage tests "$t_tests" "$logs/pytest.log" \
  "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py

# 4. the benchmark page
if [ "$cuda" = 1 ]; then
  report_dir=docs/results
  stage report "$t_report" "$logs/report.log" "$python" benchmarks/gpu_report.py
else
  report_dir=$logs/report
  say "report: no CUDA device, so the CPU dry run, written to $report_dir"
  stage report "$t_report" "$logs/report.log" "$python" benchmarks/gpu_report.py --dry-run --output-dir "$report_dir"
fi
[ -f "$report_dir/benchmarks_gpu.md" ] && say "page: $report_dir/benchmarks_gpu.md" \
  && sed -n '/^## Targets/,/^## Train/p' "$report_dir/benchmarks_gpu.md" | head -12 | tee -a "$summary"

say "total $(( $(date +%s) - started ))s; $([ "$failed" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED')"
collect
exit "$failed"
