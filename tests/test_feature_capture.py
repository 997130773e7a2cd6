"""The feature capture's bookkeeping, isolated from vLLM: which rows of a step's hidden states
belong to which request and token index. (`test_teacher_cache_engine.py` runs it inside the real
engine and checks the pooled features against transformers.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from empathy_distill.stage1_teacher.teacher_cache import FEATURE_KEY, ReplyFeatures

HIDDEN = 4


class FakeRunner:
    """The parts of vLLM's V1 model runner the capture reads: the batch layout of the step."""

    def __init__(self, prompts: dict[str, tuple[int, str | None]]):
        self.requests = {
            req_id: SimpleNamespace(
                num_prompt_tokens=n,
                sampling_params=SimpleNamespace(extra_args={FEATURE_KEY: key} if key else None),
            )
            for req_id, (n, key) in prompts.items()
        }
        self.input_batch = SimpleNamespace(num_reqs=0, req_ids=[], num_computed_tokens_cpu=None)
        self.query_start_loc = SimpleNamespace(np=None)
        self.hidden = None

    def _model_forward(self, **kwargs):
        return self.hidden


class FakeWorker(ReplyFeatures):
    def __init__(self, runner):
        self.model_runner = runner


def state(req_id: str, index: int, version: int = 0) -> torch.Tensor:
    """A distinct hidden state for each request, token index (and recomputation)."""
    gen = torch.Generator().manual_seed(hash((req_id, index, version)) % 2**31)
    return torch.randn(HIDDEN, generator=gen)


def step(runner: FakeRunner, scheduled: list[tuple[str, int, int]], version: int = 0) -> None:
    """One forward: (request, tokens computed before it, tokens scheduled now) per request, and
    two padding rows at the end, as a CUDA-graph batch would have."""
    rows = [state(r, c + j, version) for r, c, n in scheduled for j in range(n)]
    runner.hidden = torch.stack(rows + [torch.full((HIDDEN,), 99.0)] * 2)
    runner.input_batch.num_reqs = len(scheduled)
    runner.input_batch.req_ids = [r for r, _, _ in scheduled]
    runner.input_batch.num_computed_tokens_cpu = np.array([c for _, c, _ in scheduled])
    runner.query_start_loc.np = np.cumsum([0] + [n for _, _, n in scheduled] + [0, 0])
    assert runner._model_forward() is runner.hidden  # the engine gets its output unchanged


def test_capture_keeps_the_tagged_requests_states_from_the_last_prompt_token_on():
    # "a": a 5-token prompt, tagged; "b": untagged (an improve-mode earlier turn, say).
    runner = FakeRunner({"a": (5, "ex-a"), "b": (3, None)})
    worker = FakeWorker(runner)
    worker.start_reply_capture()
    worker.start_reply_capture()  # idempotent: not wrapped twice

    step(runner, [("a", 0, 3), ("b", 0, 3)])  # chunked prefill: no kept position yet for "a"
    step(runner, [("a", 3, 2), ("b", 3, 1)])  # the rest of the prompt: index 4 predicts token 1
    step(runner, [("b", 4, 1), ("a", 5, 1)])  # decode steps, requests in another order
    step(runner, [("a", 5, 2)], version=1)  # preempted and recomputed: the new states win
    assert set(runner.reply_states) == {"ex-a"}
    assert sorted(runner.reply_states["ex-a"]) == [4, 5, 6]

    pooled = worker.pool_reply_features({"ex-a": (4, 7)})
    expected = torch.stack([state("a", 4), state("a", 5, version=1), state("a", 6, version=1)])
    expected = torch.nn.functional.normalize(expected, dim=-1).mean(0)
    assert torch.allclose(torch.tensor(pooled["ex-a"]), expected, atol=1e-6)
    assert runner.reply_states == {}  # forgotten once fetched


def test_pooling_forgets_the_pooled_and_dropped_states_only():
    """Requests still running keep their states: stage one pools a unit's rows while the next
    unit's requests are in the engine, and drops the attempts the gate turned down."""
    runner = FakeRunner({"a": (2, "ex-a/0"), "b": (2, "ex-b/0"), "c": (2, "ex-c/1")})
    worker = FakeWorker(runner)
    worker.start_reply_capture()
    step(runner, [("a", 0, 2), ("b", 0, 2), ("c", 0, 2)])
    pooled = worker.pool_reply_features({"ex-a/0": (1, 2)}, ["ex-c/1"])
    assert torch.allclose(torch.tensor(pooled["ex-a/0"]), F.normalize(state("a", 1), dim=0))
    assert set(runner.reply_states) == {"ex-b/0"}


def test_a_span_with_a_missing_state_pools_to_none():
    runner = FakeRunner({"a": (2, "ex-a")})
    worker = FakeWorker(runner)
    worker.start_reply_capture()
    step(runner, [("a", 0, 2)])
    assert worker.pool_reply_features({"ex-a": (1, 3), "ex-z": (0, 1)}) == {
        "ex-a": None,
        "ex-z": None,
    }


def test_engine_context_is_capped_at_the_model_and_dp_is_refused(tmp_path, capsys):
    """A model with fewer positions than teacher.engine.max_model_len: capped with a note (vLLM
    would refuse to start); data_parallel_size inside one engine: one readable line."""
    from transformers import LlamaConfig

    from empathy_distill.shared.config import PipelineConfig
    from empathy_distill.shared.errors import PipelineError
    from empathy_distill.stage1_teacher import teacher_cache

    LlamaConfig(max_position_embeddings=1024).save_pretrained(tmp_path)
    cfg = PipelineConfig()
    cfg.teacher.model = tmp_path
    assert teacher_cache.context_length(cfg) == 1024
    assert "max_model_len 2048 > the model's 1024 positions" in capsys.readouterr().out
    cfg.teacher.engine = {**cfg.teacher.engine, "data_parallel_size": 2}
    with pytest.raises(PipelineError, match="data_parallel_size"):
        teacher_cache.start_engine(cfg)
