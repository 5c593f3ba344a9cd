#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that the lent GPU machine lacks, so that
# scripts/gpu_check.sh can install them there without a network:
#   hydra-core, omegaconf and antlr4-python3-runtime (the version omegaconf pins), at the
#   versions installed in .venv. PyYAML, packaging and everything else msn needs (torch,
#   torchvision, timm, safetensors, numpy, pillow, tqdm, matplotlib, pytest, and transformers
#   for benchmarks/bench_features.py) are already in
#   that machine's image (docs: the device tool's KINDS.md); wandb is not needed there (it is
#   imported only when logging.wandb != disabled). WITH_PYYAML=1 adds a cp312 PyYAML wheel.
#
# Usage: bash scripts/gpu_wheels.sh        (make gpu-wheels); then the device call carries
# them: run(command="bash scripts/gpu_check.sh", carry=[".whl"]) (scripts/gpu_check.sh).
# The target machine: Python 3.12, x86-64 Linux. Rerunning keeps wheels already present.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
dest=${WHEEL_DIR:-.whl}
mkdir -p "$dest"

installed_version() {  # the version of a distribution installed in $python's environment
  "$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

#: the target interpreter and platforms (manylinux tags are matched exactly by pip)
target=(--python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

names=(hydra-core omegaconf antlr4-python3-runtime)
if [ "${WITH_PYYAML:-0}" = 1 ]; then names+=(PyYAML); fi

# one version of each package in $dest: a second one would stop the whole install there
normalise() { echo "$1" | tr 'A-Z-.' 'a-z__'; }

for name in "${names[@]}"; do
  version=$(installed_version "$name")
  stem=$(normalise "$name")
  have=""
  for file in "$dest"/*.whl; do
    [ -e "$file" ] || continue
    base=$(basename "$file")
    file_stem=$(normalise "${base%%-*}")
    [ "$file_stem" = "$stem" ] || continue
    file_version=$(echo "$base" | cut -d- -f2)
    if [ "$file_version" = "$version" ]; then
      have=$file
    else
      echo "[gpu-wheels] removing $base (not the installed $name $version)"
      rm -f "$file"
    fi
  done
  if [ -n "$have" ]; then
    echo "[gpu-wheels] $name $version: $(basename "$have") already there"
    continue
  fi
  echo "[gpu-wheels] $name $version: downloading a wheel"
  if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: "${target[@]}" -d "$dest" "$name==$version" 2>/dev/null; then
    # no wheel on the registry (antlr4-python3-runtime 4.9.3 is an sdist only): build one here;
    # only pure-Python packages can be built this way for another interpreter
    echo "[gpu-wheels] $name $version: no wheel published, building one from the sdist"
    "$python" -m pip wheel --quiet --no-deps --no-binary "$name" -w "$dest" "$name==$version"
  fi
done

# a built wheel must be pure Python to install on the other machine's Python 3.12
for file in "$dest"/*.whl; do
  case "$(basename "$file")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "[gpu-wheels] error: $(basename "$file") will not install on CPython 3.12 x86-64" >&2; exit 1 ;;
  esac
done
echo "[gpu-wheels] $dest:"
ls -l "$dest"/*.whl | awk '{printf "  %8d  %s\n", $5, $NF}'
