#!/usr/bin/env bash
# The prepared GPU check: one command on a lent GPU machine (bare image: its own python3 with
# torch, timm and transformers, no hydra-core/omegaconf, no network). The device tool's call:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=450)
#
# `carry` is required: .whl/ is ignored by git, so the wheels travel only when the call names
# it (scripts/gpu_wheels.sh fetches them beforehand, where a registry is reachable). Call the
# script with bash, not `make gpu-check`: the image may have no make.
#
# 1. installs the wheels of .whl/ into a private folder put first on PYTHONPATH;
# 2. prints nvidia-smi, the torch build and the GPU;
# 3. runs the CUDA tests, python3 -m pytest -v -rA -m cuda tests/test_cuda.py, with a
#    per-test timeout (pytest's built-in faulthandler_timeout: tracebacks of the test that
#    hangs; pytest-timeout's --timeout too where it is installed: that test fails, the others
#    run) and a junit XML in the log folder;
# 4. runs benchmarks/gpu_report.py (docs/results/benchmarks_gpu.md and .json);
# 5. runs benchmarks/bench_features.py --device cuda --dtype bf16 (low-shot features against
#    transformers' ViTMSNModel, eager and SDPA);
# 6. runs benchmarks/bench_solver.py (GPU_CHECK_SOLVER_ARGS, default --device cuda
#    --skip-sklearn), when the file exists;
# 7. copies the logs, the page and a tarball of the whole log folder into $OUT when it is set
#    (8 files: what the device tool brings back), after the last line is written.
#
# Each stage has its own time limit, GPU_CHECK_TIMEOUT_{SMI,INSTALL,INFO,TESTS,REPORT,FEATURES,
# SOLVER} = 10, 15, 20, 150, 120, 40 and 35 s, and is killed GPU_CHECK_KILL_AFTER = 2 s after
# it: at most 404 s in all (`bash scripts/gpu_check.sh --budget` prints the sum of the
# limits in force; tests/test_gpu_check.py checks this line against it). One hang cannot eat
# the device budget; the exit status is non-zero when a stage failed, after everything
# produced has been copied.
#
# Without CUDA it rehearses the same path (bash scripts/gpu_check.sh, or make gpu-check; on a
# busy CPU with GPU_CHECK_TIMEOUT_SCALE=5, which multiplies every limit): the tests are
# skipped ("needs a CUDA device"), the report runs its CPU dry run written under the log
# folder instead of docs/results, and the two benchmarks run tiny CPU sizes.
# PYTHON picks the interpreter (default python3; here: PYTHON=.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."

# GPU_CHECK_TIMEOUT_SCALE (a whole number, default 1) multiplies every limit: a rehearsal on a
# loaded CPU needs minutes where the GPU machine needs seconds (imports alone take 20 s there)
scale=${GPU_CHECK_TIMEOUT_SCALE:-1}
t_smi=$(( ${GPU_CHECK_TIMEOUT_SMI:-10} * scale ))
t_install=$(( ${GPU_CHECK_TIMEOUT_INSTALL:-15} * scale ))
t_info=$(( ${GPU_CHECK_TIMEOUT_INFO:-20} * scale ))
t_tests=$(( ${GPU_CHECK_TIMEOUT_TESTS:-150} * scale ))
t_report=$(( ${GPU_CHECK_TIMEOUT_REPORT:-120} * scale ))
t_features=$(( ${GPU_CHECK_TIMEOUT_FEATURES:-40} * scale ))
t_solver=$(( ${GPU_CHECK_TIMEOUT_SOLVER:-35} * scale ))
kill_after=${GPU_CHECK_KILL_AFTER:-2}
#: per-test limit inside the tests stage (below it, so the hung test is named before the stage ends)
t_test=$(( ${GPU_CHECK_TEST_TIMEOUT:-75} * scale ))
limits=("$t_smi" "$t_install" "$t_info" "$t_tests" "$t_report" "$t_features" "$t_solver")
worst=0
for limit in "${limits[@]}"; do worst=$(( worst + limit + kill_after )); done
if [ "${1:-}" = "--budget" ]; then
  echo "$worst"
  exit 0
fi

python=${PYTHON:-python3}
logs=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/msn-gpu-check.XXXXXX")}
site=${GPU_CHECK_SITE:-$logs/site}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

summary=$logs/gpu_check.log
failed=0
started=$(date +%s)
report_dir=$logs/report
say() { echo "[gpu-check] $*" | tee -a "$summary"; }

# stage NAME LIMIT LOG COMMAND...: run with a time limit, output to the console and LOG
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local begin rc
  begin=$(date +%s)
  say "$name: start (limit ${limit}s)"
  timeout --kill-after="$kill_after" "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "$name: TIMED OUT after ${limit}s"
  fi
  say "$name: exit $rc after $(( $(date +%s) - begin ))s"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

# the files brought back: at most 8 (the device tool's limit), the summary copied last so
# that it holds every line written
collect() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  local file
  for file in "$report_dir/benchmarks_gpu.md" "$report_dir/benchmarks_gpu.json"; do
    [ -f "$file" ] && cp "$file" "$logs/"
  done
  tar -czf "$OUT/logs.tar.gz" -C "$logs" --exclude=./site --exclude=./report . 2>/dev/null
  for file in "$logs/info.txt" "$logs/pytest.log" "$logs/report.log" "$logs/features.log" "$logs/solver.log" \
              "$report_dir/benchmarks_gpu.md" "$summary"; do
    [ -f "$file" ] && cp "$file" "$OUT/"
  done
}

say "logs in $logs; python: $python; stage limits at most ${worst}s in all"

# 1. wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  stage install "$t_install" "$logs/install.log" \
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site:$PYTHONPATH"
else
  say "install: no .whl/*.whl: the call must carry it (carry=[\".whl\"]; bash scripts/gpu_wheels.sh fetches them);" \
      "using the interpreter's own packages"
fi

# 2. the machine
cuda=0
{
  command -v nvidia-smi >/dev/null && timeout --kill-after="$kill_after" "$t_smi" nvidia-smi
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

# 3. the CUDA tests: -v names each test as it starts, so a log cut by the stage limit ends at the
# one that hung; faulthandler_timeout dumps its tracebacks after t_test seconds
per_test=(-o "faulthandler_timeout=$t_test")
"$python" -c "import pytest_timeout" 2>/dev/null && per_test+=(--timeout "$t_test")
stage tests "$t_tests" "$logs/pytest.log" \
  "$python" -m pytest -v -rA -p no:cacheprovider -m cuda "${per_test[@]}" --junitxml "$logs/pytest.xml" tests/test_cuda.py

# 4. the benchmark page
if [ "$cuda" = 1 ]; then
  report_dir=docs/results
  stage report "$t_report" "$logs/report.log" "$python" benchmarks/gpu_report.py
else
  say "report: no CUDA device, so the CPU dry run, written to $report_dir"
  stage report "$t_report" "$logs/report.log" "$python" benchmarks/gpu_report.py --dry-run --output-dir "$report_dir"
fi
[ -f "$report_dir/benchmarks_gpu.md" ] && say "page: $report_dir/benchmarks_gpu.md" \
  && sed -n '/^## Targets/,/^## Train/p' "$report_dir/benchmarks_gpu.md" | head -12 | tee -a "$summary"

# 5. low-shot features against transformers (bf16 on the GPU; a tiny fp32 rehearsal on the CPU)
if [ "$cuda" = 1 ]; then
  features_args=(--device cuda --dtype bf16)
else
  features_args=(--device cpu --dtype fp32 --models vit_tiny --batches 1 --rounds 1 --warmup 0)
fi
stage features "$t_features" "$logs/features.log" \
  "$python" benchmarks/bench_features.py "${features_args[@]}" --json "$logs/features.json"

# 6. the solver on the GPU (benchmarks/bench_solver.py, when present)
if [ -f benchmarks/bench_solver.py ]; then
  if [ "$cuda" = 1 ]; then
    read -r -a solver_args <<<"${GPU_CHECK_SOLVER_ARGS:---device cuda --skip-sklearn}"
  else
    read -r -a solver_args <<<"${GPU_CHECK_SOLVER_ARGS:---device cpu --skip-sklearn --n 200 --classes 10 --dims 16 --lambdas 1 --repeats 1}"
  fi
  stage solver "$t_solver" "$logs/solver.log" "$python" benchmarks/bench_solver.py "${solver_args[@]}"
else
  say "solver: benchmarks/bench_solver.py is absent, skipped"
fi

say "total $(( $(date +%s) - started ))s; $([ "$failed" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED')"
[ -n "${OUT:-}" ] && say "copying the logs, the page and logs.tar.gz to $OUT"
collect
exit "$failed"
