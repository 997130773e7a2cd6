"""benchmarks/ablation.py's table: mean and spread over seeds, read from evaluate's metrics."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_and_spread_over_seeds(ablation, tmp_path):
    def entry(kl, acc):
        return {"teacher_fidelity": {"kl_teacher_student": kl}, "emotion_accuracy": acc}

    models = {
        "teacher": entry(0.5, 0.25),
        "pride-s0": entry(1.0, 0.5),
        "pride-s1": entry(2.0, None),  # a figure one seed lacks is left out of its mean
    }
    table = ablation.aggregate(models, {"teacher": ["teacher"], "pride": ["pride-s0", "pride-s1"]})
    kl = "teacher_fidelity.kl_teacher_student"
    assert table["pride"][kl] == {"mean": 1.5, "spread": 0.5, "n": 2}
    assert table["pride"]["emotion_accuracy"] == {"mean": 0.5, "spread": 0.0, "n": 1}
    assert table["teacher"]["distinct_2"] is None
    text = ablation.markdown(table, "note")
    assert "| **pride** | 1.500 ± 0.500 |" in text and "| **teacher** | 0.500 |" in text
    ablation.chart(table, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
