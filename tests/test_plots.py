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


def test_every_run_gets_its_own_colour_and_style_and_the_reference_stands_out():
    from msn.plots import run_styles

    styles = run_styles(18, reference=0)
    looks = {(s["color"], s["linestyle"]) for s in styles}
    assert len(looks) == 18  # 18 ablation runs: no two drawn alike (a 10-colour cycle repeated 8)
    assert styles[0]["color"] == "black" and styles[0]["linewidth"] > max(s["linewidth"] for s in styles[1:])
    assert len(run_styles(45)) == len({(s["color"], s["linestyle"]) for s in run_styles(45)})


def test_a_run_with_one_point_is_refused_with_one_line(tmp_path, capsys):
    run = tmp_path / "short"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 5.0}) + "\n")
    assert main([str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run}: 1 logged point(s) in metrics.jsonl; a curve needs two "
                                               "(train longer or lower train.log_every)")
    assert not (run / "training_curves.png").exists()


def test_the_rank_is_drawn_as_a_panel_beside_np_and_max_t(tmp_path, monkeypatch):
    """The ``rank`` of each record (None where a record has none, as in runs logged before it
    existed) is one panel, next to the other collapse monitors."""
    import matplotlib.pyplot as plt

    from msn.plots import PANELS

    run = tmp_path / "run"
    run.mkdir()
    ranks = [None, 12.5, 9.0, 3.5]
    with open(run / "metrics.jsonl", "w") as stream:
        for i, rank in enumerate(ranks):
            stream.write(json.dumps({"step": 10 * (i + 1), "loss": 5.0, "np": 100, "max_t": 0.2, "rank": rank}) + "\n")
    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: drawn.append(fig) or close(fig))
    plot_runs([run])
    names = [panel for panel, _, _ in PANELS]
    assert names.index("rank") == names.index("max_t") + 1
    (axis,) = [a for a in drawn[0].axes if a.get_title() == "effective rank of the target embeddings (RankMe)"]
    (line,) = axis.get_lines()
    assert list(line.get_xdata()) == [10, 20, 30, 40]
    values = [float(v) for v in line.get_ydata()]
    assert values[0] != values[0] and values[1:] == [12.5, 9.0, 3.5]  # NaN: a gap, not a point
