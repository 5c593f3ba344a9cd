"""msn.runtime: the one device resolver and autocast rule of training, evaluation and benchmarks."""

import pytest
import torch

from msn.runtime import autocast, autocast_dtype, resolve_device

@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, also on a GPU machine (the answers below are the CPU-only ones)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_devices_on_a_machine_without_cuda(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="^device: .*CUDA is not available"):
            resolve_device(name)


def test_the_evaluator_reports_a_bad_device_as_a_config_error(no_cuda):
    from msn.config import ConfigError
    from msn.eval.lowshot import resolve_device as eval_device

    with pytest.raises(ConfigError, match="^device: 'cuda:0' requested"):
        eval_device("cuda:0")


def test_autocast_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("fp64", cuda) is None
    with autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_loader_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    import os

    from msn.runtime import MAX_DEFAULT_WORKERS, loader_workers

    assert loader_workers(3) == 3 and loader_workers(0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(None) == 2  # a 2-core machine: 2, not 8 (torch warned about 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_workers(None) == MAX_DEFAULT_WORKERS
