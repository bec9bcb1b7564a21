"""peftlab.analysis.plots: the learn-vs-forget point of a result and its plot."""
from __future__ import annotations

import pytest

from peftlab.analysis import learn_forget_point, plot_learn_vs_forget

from analysis_support import _seed  # noqa: E402,F401  (a fixture)

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


def test_learn_vs_forget_point_and_plot(tmp_path):
    def result(name, r, forgetting, before, after):
        return {"method": {"name": name, "config": {"r": r} if r else {}}, "forgetting": {"mean": forgetting},
                "metrics": {"before": {"test": {"accuracy": before}}, "after": {"test": {"accuracy": after}}}}

    rows = [result("lora", 8, 0.05, 0.5, 0.8), result("lora", 64, 0.1, 0.5, 0.85), result("full", None, 0.3, 0.5, 0.9)]
    point = learn_forget_point(rows[0])
    assert point == {"method": "lora", "rank": 8, "forgetting": 0.05, "gain": pytest.approx(0.3), "metric": "accuracy"}
    assert learn_forget_point(rows[2], higher_is_better=False)["gain"] == pytest.approx(-0.4)
    plot_learn_vs_forget(rows, tmp_path / "learn_forget.png")
    assert (tmp_path / "learn_forget.png").stat().st_size > 0
