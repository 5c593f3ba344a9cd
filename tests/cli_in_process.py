"""``python train.py ARGS`` (or ``eval_lowshot.py``) run inside the test process: the script
itself (``runpy``), its exit status, stdout and stderr, without a fresh interpreter's seconds
of imports. For tests of what a command does and prints; signals, kill -9, loader workers and
hangs still need a real process (:func:`conftest.run_script`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from conftest import ROOT

#: Signals whose handlers a run may leave installed (the preemption flag of train.py).
_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def run_in_process(script: str, *overrides: str, cwd: Path = ROOT,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``ROOT/script overrides...`` as ``__main__`` here, as :func:`conftest.run_script`
    runs it in a child: same environment variables, working directory and arguments. The
    status is what the process would exit with (``sys.exit``'s code, 1 for an exception, whose
    traceback goes to stderr); the process's state (signal handlers, logging handlers,
    Hydra's global state and job config, the environment, the working directory) is restored
    afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    saved_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    saved_logging = {logger: (logger.level, list(logger.handlers), logger.propagate, logger.disabled)
                     for logger in loggers if isinstance(logger, logging.Logger)}
    out, err, status = io.StringIO(), io.StringIO(), 0
    os.environ.update({"HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", **(env or {})})
    sys.argv = [str(ROOT / script), *overrides]
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # a fresh interpreter's filters, printed to stderr
            warnings.showwarning = warnings._showwarning_orig
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as stop:
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                status = 1
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # a later run_training outside Hydra must not see this run's
        for logger in {*saved_logging, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))}:
            if not isinstance(logger, logging.Logger):
                continue
            level, handlers, propagate, disabled = saved_logging.get(logger, (logging.NOTSET, [], True, False))
            for handler in [h for h in logger.handlers if h not in handlers]:
                handler.close()  # the run's log file and console
            logger.handlers[:] = handlers  # Hydra's dictConfig took the root's (pytest's capture) away
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        for sig, handler in saved_handlers.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return subprocess.CompletedProcess([sys.executable, script, *overrides], status, out.getvalue(), err.getvalue())
