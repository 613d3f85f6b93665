"""The plots: which are made, and the Pareto frontier."""

from __future__ import annotations

from loralab.report.plots import pareto_front


def test_files_and_plots(built):
    for name in ("report.md", "report.html", "results.csv"):
        assert (built / name).stat().st_size > 0
    plots = sorted(p.name for p in (built / "plots").glob("*.png"))
    assert plots == ["loss_curves.png", "pareto.png", "peak_memory.png", "train_time.png",
                     "trainable_params.png"]
    for p in (built / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    pts = [(0, 30.0), (10, 20.0), (100, 25.0), (1000, 19.0)]
    assert pareto_front(pts, lower_better=True) == [(0, 30.0), (10, 20.0), (1000, 19.0)]
    acc = [(0, 0.5), (10, 0.8), (100, 0.7), (1000, 0.9)]
    assert pareto_front(acc, lower_better=False) == [(0, 0.5), (10, 0.8), (1000, 0.9)]
