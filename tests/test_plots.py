"""msn.plots draws the curves of real run directories."""

import json

from msn.plots import main, plot_runs


def test_plot_runs_writes_png(tmp_path):
    for run, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / "metrics.jsonl", "w") as stream:
            for step in (10, 20, 30):
                stream.write(json.dumps({"step": step, "loss": scale * 5 / step, "ce": 4 / step, "memax": 0.1, "entropy": 5.0,
                                         "np": 100, "max_t": 0.2, "min_t": 0.05, "lr": 1e-3, "wd": 0.04,
                                         "momentum": 0.996, "img_per_s": 50.0}) + "\n")
    path = plot_runs([tmp_path / "a", tmp_path / "b"])
    assert path == tmp_path / "a" / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert main([str(tmp_path / "missing")]) == 2
