"""``pip install .`` gives working commands from any directory: a wheel built from the
repository, installed into a fresh virtual environment, trains, evaluates, exports and
plots with the Hydra configs it carries (every file of ``configs/``, as ``msn/configs/``), run
from outside the repository.

The fresh environment has no packages of its own: a ``.pth`` file lends it this
interpreter's dependencies (torch, Hydra, ...; installing torch again would take minutes and
gigabytes). A ``.pth`` line only adds a folder to ``sys.path``, so the editable install of
``msn`` in that folder (activated by its own ``.pth`` file) stays off: the test checks that
``msn`` is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile

import pytest

from conftest import ROOT, TINY_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin folder, environment)`` of a fresh venv holding only the wheel of this repository."""
    base = tmp_path_factory.mktemp("packaging")
    source, wheels = base / "source", base / "wheels"
    # a copy of what a wheel is built from, so that setuptools' build/ folder lands there
    for folder in ("msn", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300,
                           cwd=base)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("msn-*.whl")
    from msn.version import __version__
    assert wheel.name.startswith(f"msn-{__version__}-"), f"{wheel.name}: not the version of msn/version.py"
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name.removeprefix("msn/") for name in names if name.startswith("msn/configs/")}
    assert shipped == {str(path.relative_to(ROOT)) for path in (ROOT / "configs").rglob("*.yaml")}
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lent = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "lent_dependencies.pth"), "w") as stream:
        stream.write("\n".join(lent) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300, cwd=base)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    return env_dir / "bin", env, base


def _run(installed, *command, timeout=300):
    bin_dir, env, base = installed
    work = base / "elsewhere"
    work.mkdir(exist_ok=True)
    return subprocess.run([str(bin_dir / command[0]), *command[1:]], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_pyproject_lists_every_package_and_config_folder():
    """A mapped folder (``configs/`` -> ``msn.configs``) rules out package discovery: every
    folder of ``msn/`` holding modules and every folder of ``configs/`` must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "msn").rglob("*.py")}
    configs = {".".join(("msn", *path.relative_to(ROOT).parts)) for path in [ROOT / "configs", *(ROOT / "configs").rglob("*")]
               if path.is_dir() and path.name != "__pycache__"}
    assert listed == code | configs, f"pyproject.toml [tool.setuptools] packages: {sorted(listed ^ (code | configs))}"


def test_msn_is_imported_from_the_wheel(installed):
    bin_dir, env, base = installed
    where = _run(installed, "python", "-c", "import msn, msn.config_files as c; print(msn.__file__); print(c.CONFIG_DIR)")
    assert where.returncode == 0, where.stderr[-2000:]
    module, configs = where.stdout.split()
    assert module.startswith(str(base / "venv")) and configs.startswith(str(base / "venv")), where.stdout
    assert not module.startswith(str(ROOT))


def test_installed_commands_train_evaluate_export_and_plot_outside_the_repository(installed):
    """msn-train (tiny run, packaged configs and an experiment preset), msn-eval-lowshot on
    its checkpoint, msn-export to transformers' format, msn-plot of its curves."""
    _, _, base = installed
    out = base / "run"
    train = _run(installed, "msn-train", *TINY_OVERRIDES, "train.max_steps=4", f"output_dir={out}")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "train.log").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    preset = _run(installed, "msn-train", "experiment=fmnist_demo", "--cfg", "job")
    assert preset.returncode == 0 and "name: fmnist_demo" in preset.stdout, preset.stderr[-2000:]
    bad = _run(installed, "msn-train", *TINY_OVERRIDES, "mask.ratio=1.5", f"output_dir={base / 'bad'}")
    assert bad.returncode == 2 and "mask.ratio" in bad.stderr

    evaluation = _run(installed, "msn-eval-lowshot", f"backbone={out / 'checkpoints' / 'latest.pt'}", "data=synthetic",
                      "data.synthetic_size=64", "data.synthetic_classes=4", "shots=[1]", "splits=1",
                      "lambd=0.1", f"output_dir={base / 'eval'}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    results = json.loads((base / "eval" / "results.json").read_text())
    assert results["schema"] == "msn-lowshot-results" and 0 <= results["shots"]["1"]["mean"] <= 100

    export = _run(installed, "msn-export", str(out / "checkpoints" / "latest.pt"), "--format", "hf",
                  "--output", str(base / "hf"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (base / "hf" / "config.json").is_file() and (base / "hf" / "model.safetensors").is_file()

    plot = _run(installed, "msn-plot", str(out))
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
