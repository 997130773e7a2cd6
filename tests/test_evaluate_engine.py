"""`pipeline evaluate` through the real vLLM engine (marked `engine`: two engine starts).

A 2-layer random model with the real SmolLM2 tokenizer plays both models and the judge: the
figures are noise, what is checked is that every stage runs and every number is in range.
"""

import json

import pytest
from conftest import DATA, ENGINE, make_cache

from empathy_distill.shared.config import PipelineConfig

pytestmark = pytest.mark.engine


def test_evaluate_two_models_and_the_judge(tiny_teacher, tmp_path):
    from empathy_distill.evaluation.evaluate import main
    from empathy_distill.shared.models import load_tokenizer
    from empathy_distill.shared.readers import ED_EMOTIONS

    out = tmp_path / "eval"
    held_out = tmp_path / "held-out-cache"  # synthetic teacher rows in the model's vocabulary
    make_cache(held_out, load_tokenizer(tiny_teacher), shards=1, rows=5)
    cfg = PipelineConfig.model_validate(
        {
            "teacher": {"model": str(tiny_teacher), "engine": ENGINE},
            "evaluate": {
                "inputs": [str(DATA / "ed_sample.csv")],
                "output": str(out),
                "limit": 4,
                "models": [f"base={tiny_teacher}", f"other={tiny_teacher}"],
                "judge": "teacher",
                "max_new_tokens": 12,
                "judge_check_data": str(DATA / "wp_sample.csv"),
                "judge_check_pairs": 3,
                "report_examples": 2,
                "teacher_cache": str(held_out),
            },
        }
    )
    summary = main(cfg)

    assert summary["evaluated"] == 4 and summary["rejected"] == 8
    m = json.loads((out / "metrics.json").read_text())
    assert m["baseline"] == "base" and list(m["models"]) == ["base", "other"]
    for r in m["models"].values():
        for key in ("bertscore_f1", "bleu4", "rouge_l", "distinct_1", "distinct_2"):
            assert 0.0 <= r[key] <= 1.0, key
        assert 0.0 <= r["emotion_accuracy"] <= 1.0 and r["with_gold_emotion"] == 4
        assert 0.0 <= r["emotion_macro_f1"] <= 1.0
        picked = [p for c in r["emotion_confusion"].values() for p in c]
        assert picked and set(picked) <= set(ED_EMOTIONS)  # constrained to the label set
        fid = r["teacher_fidelity"]
        assert fid["replies"] == 5 and fid["tokens"] > 0 and fid["reply_logprob"] < 0
        assert fid["kl_teacher_student"] > 0 and fid["kl_student_teacher"] > 0
        assert 0.0 <= r["gate"]["passed"] <= 1.0
        assert r["parameters"] > 0 and r["generated_tokens"] > 0 and r["tokens_per_second"] > 0
        assert r["peak_engine_rss_mib"] > 100
    assert m["models"]["base"]["teacher_fidelity"] == m["models"]["other"]["teacher_fidelity"]
    # The same greedy model twice: identical replies, so every pair is a tie without asking.
    assert m["models"]["base"]["judge_vs_baseline"] is None
    win = m["models"]["other"]["judge_vs_baseline"]
    assert win["pairs"] == 4 and win["ties"] == 4
    check = m["judge_check"]
    assert check["pairs"] == 3 and 0.0 <= check["agreement"] <= 1.0
    assert 0.0 <= check["picks_a_rate"] <= 1.0 and 0.0 <= check["debiased_agreement"] <= 1.0
    rows = [json.loads(x) for x in (out / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]["models"]) == {"base", "other"}
    assert rows[0]["models"]["other"]["judge"]["debiased"] == "tie"
    text = (out / "report.md").read_text()
    assert "## Quality" in text and "**Judge check**" in text and "### 2." in text
    assert "## Teacher fidelity" in text and "KL(teacher‖model)" in text
    for name in ("quality.png", "win_rate.png", "cost.png", "emotion.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "resolved_config.yaml").exists()
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 8
