"""Stage one's whole main (plan, prompts, gate and retries, shards, manifest, rejects, rerun) in
the quick suite, on a fake engine with canned answers. The real vLLM engine is covered by the
`engine` tests (test_teacher_cache_engine.py); this one isolates the job's own logic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from empathy_distill.shared.config import PipelineConfig
from empathy_distill.shared.schema import bucket_kl, read_rows, verify_cache

K, LOOP = 5, "LOOPING"  # a dialogue holding LOOP gets a looping reply on every attempt
WORDS = "garden kettle ladder window river pencil basket candle mirror ticket lantern meadow"
WORDS = WORDS.split()


class FakeLLM:
    """What stage one asks of vLLM's offline engine: `enqueue` and `llm_engine.step` (the
    analysis turn under structured outputs, the reply turn with top-k log-probabilities) and
    `collective_rpc` (the kept features). Replies are canned, distinct per prompt and per seed
    (a retry gets another), and end with the end-of-turn token; the generated token is always
    the top-1. A step finishes at most `per_step` requests, the latest first: the loop must
    not depend on requests finishing in the order they were asked. A request whose output kind
    was set to stream (`output_processor.request_states`) instead gets its output so far, 10
    more tokens after every step, until it finishes or is aborted."""

    def __init__(self, tokenizer, feature_dim: int, per_step: int = 2):
        self.tok, self.dim, self.per_step = tokenizer, feature_dim, per_step
        self.features: dict[str, list[float]] = {}  # what pool_reply_features answered
        self.queue: list[list] = []  # [id, request, params, tokens streamed so far]
        self.most_in_flight = self.asked = 0
        self.aborted: list[str] = []
        self.llm_engine = SimpleNamespace(
            step=self._step,
            abort_request=self._abort,
            output_processor=SimpleNamespace(request_states={}),
            vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256)),
        )

    def enqueue(self, requests, params, use_tqdm=False):
        from vllm.sampling_params import RequestOutputKind

        ids = []
        for request, p in zip(requests, params, strict=True):
            self.asked += 1
            ids.append(f"{self.asked}-abcd1234")
            self.queue.append([str(self.asked), request, p, 0])
            states = self.llm_engine.output_processor.request_states
            # vLLM's: the top-k entries' text comes from the logprobs processor's tokenizer
            topk = SimpleNamespace(tokenizer=self.tok) if p.logprobs else None
            states[ids[-1]] = SimpleNamespace(
                output_kind=RequestOutputKind.FINAL_ONLY, logprobs_processor=topk
            )
        self.most_in_flight = max(self.most_in_flight, len(self.queue))
        return ids

    def _abort(self, ids):
        self.aborted += ids
        self.queue = [q for q in self.queue if q[0] not in ids]

    def _step(self):
        from vllm.sampling_params import RequestOutputKind

        states = self.llm_engine.output_processor.request_states
        streamed = [
            e
            for e in self.queue
            if states[f"{e[0]}-abcd1234"].output_kind == RequestOutputKind.CUMULATIVE
        ]
        done = [e for e in self.queue if e not in streamed][-self.per_step :]
        outs = self.generate([e[1] for e in done], [e[2] for e in done])
        for (request_id, *_), out in zip(done, outs, strict=True):
            out.request_id, out.finished = request_id, True
        for entry in streamed:
            [out] = self.generate([entry[1]], [entry[2]])
            entry[3] += 10
            c = out.outputs[0]
            out.request_id, out.finished = entry[0], entry[3] >= len(c.token_ids)
            if out.finished:
                done.append(entry)
            else:
                c.token_ids, c.finish_reason = c.token_ids[: entry[3]], None
                c.text = self.tok.decode(c.token_ids, skip_special_tokens=True)
            outs.append(out)
        self.queue = [e for e in self.queue if e not in done]
        return outs

    def _reply(self, prompt: str, seed) -> str:
        if LOOP in prompt:
            return "I'm so sorry. I'm so sorry. I'm so sorry. I'm so sorry."
        h = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
        a, b, c = (WORDS[x % len(WORDS)] for x in h[:3])
        return (
            f"{a.title()}, {b} and {c}: tell me about them. That sounds really hard, and it "
            "makes sense to feel this way."
        )

    def generate(self, requests, params, use_tqdm=False):
        outs = []
        for request, p in zip(requests, params, strict=True):
            prompt = self.tok.decode(request["prompt_token_ids"])
            if p.structured_outputs is not None:  # the analysis turn
                text = " sad\nFeelings: They feel let down and tired.\nSituation: A hard week."
                ids, logprobs = self.tok.encode(text, add_special_tokens=False), None
            else:
                ids = self.tok.encode(self._reply(prompt, p.seed), add_special_tokens=False)
                ids.append(self.tok.eos_token_id)
                logprobs = [self._topk(t, p.logprobs) for t in ids] if p.logprobs else None
            text = self.tok.decode(ids, skip_special_tokens=True)
            choice = SimpleNamespace(
                token_ids=ids, text=text, finish_reason="stop", logprobs=logprobs
            )
            outs.append(
                SimpleNamespace(outputs=[choice], prompt_token_ids=request["prompt_token_ids"])
            )
        return outs

    @staticmethod
    def _topk(token: int, k: int) -> dict:
        others = [t for t in range(100, 100 + k + 1) if t != token][: k - 1]
        lps = -0.1 - 1.5 * np.arange(k)
        return {
            t: SimpleNamespace(logprob=float(lp), rank=r + 1)
            for r, (t, lp) in enumerate(zip([token, *others], lps, strict=True))
        }

    def collective_rpc(self, method: str, args=()):
        assert method == "pool_reply_features"
        spans, _ = args
        answer = {}
        for key in spans:
            v = np.random.default_rng(abs(hash(key)) % 2**32).normal(size=self.dim)
            answer[key] = self.features[key] = list(v / np.linalg.norm(v))
        return [answer]


@pytest.fixture
def fake_engine(monkeypatch, tiny_teacher):
    from empathy_distill.shared.models import load_tokenizer
    from empathy_distill.stage1_teacher import teacher_cache

    starts = []
    llm = FakeLLM(load_tokenizer(tiny_teacher), feature_dim=128)

    def start_engine(cfg, *args, **kwargs):
        starts.append(cfg.teacher.model)
        return llm

    monkeypatch.setattr(teacher_cache, "start_engine", start_engine)
    return llm, starts


def dialogues(folder: Path, n: int) -> Path:
    path = folder / "train.jsonl"
    lines = []
    for i in range(n):
        text = f"My week {i} went badly and I lost my keys twice."
        if i == 2:
            text += f" {LOOP}"
        lines.append(
            json.dumps(
                {
                    "dialogue": [{"role": "speaker", "text": text}],
                    "privileged": {"situation": f"Week {i} at a new job."},
                    "emotion": "sad",
                    "reference": "That sounds exhausting.",
                }
            )
        )
    lines.append("{not json")  # a malformed record: set aside by the reader, counted
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stage_one_main_on_a_fake_engine(tmp_path, tiny_teacher, fake_engine):
    from empathy_distill.stage1_teacher import teacher_cache

    llm, starts = fake_engine
    out = tmp_path / "cache"
    cfg = PipelineConfig.model_validate(
        {
            "teacher": {"model": str(tiny_teacher), "max_new_tokens": 64},
            "teacher_cache": {
                "inputs": [str(dialogues(tmp_path, 7))],
                "output": str(out),
                "top_k": K,
                "shard_size": 3,
                "in_flight": 4,  # more than a shard: the shards overlap
                "quality": {"retries": 2},
            },
        }
    )
    summary = teacher_cache.main(cfg)

    # accounting: 7 dialogues + 1 malformed line; the looping one rejected after its retries
    assert summary["examples_read"] == 8 and summary["accepted"] == 6
    assert summary["rejected"] == 2 and summary["rejected_repetition"] == 1
    assert summary["accepted_first_try"] == 6 and len(starts) == 1
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    looped = [r for r in rejects if r.get("example_id")]
    assert len(rejects) == 2 and len(looped) == 1
    assert "repeats a" in looped[0]["reason"] and "attempt 2:" in looped[0]["reason"]
    # each looping attempt was stopped at its second sentence, not generated to its end
    assert summary["attempts_stopped_early"] == 3 and len(llm.aborted) == 3
    assert looped[0]["reason"].count("(stopped at token") == 3

    # the shards hold exactly the accepted replies, with their top-k and features
    manifest = verify_cache(out, top_k=K)
    rows = [r for e in manifest["shards"] for r in read_rows(out / e["file"])]
    assert len(rows) == 6 and not any(LOOP in r["dialogue"][0]["text"] for r in rows)
    for r in rows:
        assert r["teacher_response"].endswith("it makes sense to feel this way.")
        assert r["teacher_emotion"] == "sad" and r["teacher_parse_ok"]
        reply = np.asarray(r["response_token_ids"])
        assert reply[-1] == llm.tok.eos_token_id  # the end of turn is kept: the student stops
        assert r["topk_token_ids"].shape == (len(reply), K)
        assert (r["topk_token_ids"][:, 0] == reply).all()
        assert np.allclose(r["target_logprob"], -0.1)
        exact = np.tile(-0.1 - 1.5 * np.arange(K), (len(reply), 1))
        assert bucket_kl(exact, r["topk_logprobs"]).mean() <= 1e-3
        given = llm.features[f"{r['example_id']}/{r['teacher_attempt']}"]  # the kept attempt's
        stored, given = np.asarray(r["teacher_features"]), np.asarray(given)
        assert stored @ given / np.linalg.norm(stored) >= 0.999
    assert len({r["teacher_response"] for r in rows}) == 6  # the generic check saw no copies
    assert llm.most_in_flight == 4  # `in_flight` examples at a time, kept full
    # no top-k entry was decoded to text: the cache keeps ids
    states = llm.llm_engine.output_processor.request_states.values()
    topk = [s.logprobs_processor for s in states if s.logprobs_processor is not None]
    assert topk and all(p.tokenizer is None for p in topk)

    # the same command again: nothing to do, no engine
    again = teacher_cache.main(cfg)
    assert again["new_shards"] == 0 and again["already_cached"] == 6 and len(starts) == 1
    assert again["accepted"] == 6 and again["rejected"] == 2  # the looping one stays set aside
