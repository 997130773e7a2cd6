"""`pipeline evaluate` through the real vLLM engine (marked `engine`).

A 2-layer random model with the real SmolLM2 tokenizer plays both models and the judge: the
figures are noise, what is checked is that every stage runs and every number is in range.
"""

import json

import pytest
from conftest import DATA, ENGINE, make_cache, tiny_llama

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


def test_weights_swapped_into_a_running_engine_answer_as_a_new_engine(
    tiny_teacher, embedded_teacher, tmp_path
):
    """Two models of one architecture (tied embeddings, as SmolLM2's): the second is served
    from the first one's engine with its weights swapped in, and answers token for token as a
    new engine on it does. (On CPU a tied head keeps a packed copy of the old embedding unless
    it is processed again: this test fails without `WeightSwap`'s second step.)"""
    from empathy_distill.evaluation.evaluate import main

    other = tiny_llama(
        tmp_path / "other",
        embedded_teacher,
        hidden_size=128,
        num_attention_heads=2,
        head_dim=64,
        max_len=2048,
        seed=1,
    )
    answers = {}
    for reuse in (True, False):
        out = tmp_path / f"eval-{reuse}"
        cfg = PipelineConfig.model_validate(
            {
                "teacher": {"model": str(tiny_teacher), "engine": ENGINE},
                "evaluate": {
                    "inputs": [str(DATA / "ed_sample.csv")],
                    "output": str(out),
                    "limit": 3,
                    "models": [f"first={tiny_teacher}", f"second={other}"],
                    "judge": str(other),
                    "max_new_tokens": 12,
                    "judge_check_pairs": 0,
                    "reuse_engine": reuse,
                },
            }
        )
        main(cfg)
        m = json.loads((out / "metrics.json").read_text())
        assert [r["engine_reused"] for r in m["models"].values()] == [False, reuse]
        rows = [json.loads(x) for x in (out / "replies.jsonl").read_text().splitlines()]
        answers[reuse] = [  # replies, emotions, and the judge's verdicts (the second judges)
            {n: (r["models"][n]["reply"], r["models"][n]["emotion"]) for n in ("first", "second")}
            | {"judged": r["models"]["second"]["judge"]}
            for r in rows
        ]
    assert answers[True] == answers[False]
    assert any(a["first"] != a["second"] for a in answers[True])  # the swap changed something
