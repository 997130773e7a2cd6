"""`distill.method: sft-dpo` (Xie et al.'s SFT then DPO) end to end on the tiny random Llama,
synthetic improve-mode shards (each row a preference pair) and the real DeepSpeed engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import losses_by_step, make_cache, run, settings_for, synthetic_row

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.schema import write_manifest, write_shard

DPO_KEYS = {"step", "dpo", "reward_margin", "reward_accuracy", "loss"}


def make_pair_cache(folder: Path, tokenizer, *, rows: int = 4) -> Path:
    """One shard of improve-mode rows: the teacher's reply improves `base_response`."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings_for(tokenizer)
    rng = np.random.default_rng(0)
    batch = []
    for i in range(rows):
        row = synthetic_row(i, rng)
        row["improvement_strategy"] = "all"
        row["base_response"] = ["Ok.", "Whatever, move on.", "Fine I guess.", "So?"][i % 4]
        batch.append(row)
    meta = {"pipeline_settings": json.dumps(settings)}
    entry = write_shard(batch, folder / "shard-00000.parquet", 4, metadata=meta)
    write_manifest(folder, {"settings": settings, "shards": [entry], "rows": rows})
    return folder


@pytest.fixture
def pairs(tmp_path, tiny_student) -> Path:
    from empathy_distill.shared.models import load_tokenizer

    return make_pair_cache(tmp_path / "pairs", load_tokenizer(tiny_student))


SETTINGS = {
    "method": "sft-dpo",
    "micro_batch_size": 4,
    "shuffle_buffer": 4,
    "lr": 1e-3,
    "dpo_beta": 0.5,
}


def test_sft_then_dpo_trains_both_steps_and_exports(tmp_path, tiny_student, pairs):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary = run(tmp_path, tiny_student, pairs, out, sft_steps=2, dpo_steps=6, **SETTINGS)
    assert summary["steps"] == "0 -> 8 (of 8)" and summary["sft / dpo steps"] == "2 / 6"
    steps = losses_by_step(out)
    assert set(steps[1]) == set(steps[2]) == {"step", "ce", "loss"}
    assert all(set(steps[s]) == DPO_KEYS for s in range(3, 9))
    # The first DPO step sees policy == reference (the SFT model): loss log 2, no margin.
    assert steps[3]["dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[3]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    # Overfitting four pairs: the loss falls, the chosen reply wins.
    assert steps[8]["dpo"] < math.log(2) - 0.05
    assert steps[8]["reward_accuracy"] == 1.0 and steps[8]["reward_margin"] > 0
    state = json.loads((out / "checkpoints" / "step0000002" / "run_state_rank0.json").read_text())
    assert state["phase"] == "dpo"  # the forced checkpoint at the switch
    assert (out / "sft_reference" / "config.json").exists() and (out / "loss.png").exists()
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    plain = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert set(final.state_dict()) == set(plain.state_dict())


def test_sft_on_originals_trains_on_both_replies(tmp_path, tiny_student, pairs):
    out = tmp_path / "out"
    settings = {**SETTINGS, "sft_steps": 1, "dpo_steps": 1, "sft_on_originals": True}
    run(tmp_path, tiny_student, pairs, out, **settings)
    steps = losses_by_step(out)
    assert set(steps[1]) == {"step", "ce", "loss"} and set(steps[2]) == DPO_KEYS


def test_resume_in_the_dpo_step_equals_uninterrupted(tmp_path, tiny_student, pairs, monkeypatch):
    """Checkpoints at 2 (the switch), 4, 6; stop after step 5, resume from 4 (inside DPO)."""
    from empathy_distill.stage2_distill import distill

    settings = {**SETTINGS, "sft_steps": 2, "dpo_steps": 4, "checkpoint_every": 2}
    run(tmp_path, tiny_student, pairs, tmp_path / "whole", **settings)
    original = distill.log_step

    def crash_after_step_5(record, *args):
        original(record, *args)
        if record["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "log_step", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_student, pairs, tmp_path / "split", **settings)
    monkeypatch.setattr(distill, "log_step", original)
    summary = run(tmp_path, tiny_student, pairs, tmp_path / "split", **settings)
    assert summary["resumed from"] == "step0000004"
    whole, split = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for step in whole:
        for key, value in whole[step].items():
            assert split[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_refuses_a_cache_without_pairs(tmp_path, tiny_student):
    from empathy_distill.shared.models import load_tokenizer

    answers = tmp_path / "answers"
    make_cache(answers, load_tokenizer(tiny_student), shards=1)
    with pytest.raises(PipelineError, match="no preference pairs") as err:
        run(tmp_path, tiny_student, answers, tmp_path / "out", method="sft-dpo")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "checkpoints").exists()
