"""Stage one with a vision-language teacher on the real vLLM engine (CPU): images and video frames.

The teacher is a tiny random LLaVA built here (shared.models.build_tiny_vlm: CLIP tower on 32 px
images, 2-layer Llama, SmolLM2's tokenizer plus `<image>`), so no download; the video is written
with PyAV, the decoder the pipeline reads it with. Needs torchvision beside torch (vLLM's LLaVA
imports it): the CPU set-up installs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ENGINE, assert_features_match, write_image, write_video

from empathy_distill.shared.config import PipelineConfig
from empathy_distill.shared.models import (
    TINY_VLM_NAME,
    build_tiny_vlm,
    load_processor,
    load_tokenizer,
    media_token_ids,
    tokenizer_fingerprint,
)
from empathy_distill.shared.schema import read_rows, verify_cache
from empathy_distill.stage1_teacher import quality

FRAMES = 3
IMAGE_TOKENS = 16  # (32 px / 8 px patches)^2 per image or frame
TEXT_VOCAB = 49152  # SmolLM2's; the tiny VLM's <image> is id 49152


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory, embedded_teacher) -> Path:
    folder = tmp_path_factory.mktemp("vlm") / TINY_VLM_NAME
    build_tiny_vlm(embedded_teacher, folder)
    return folder


def mm_inputs(folder: Path) -> Path:
    """Three usable examples (image; video span; image + video), a corrupt image and a missing
    file."""
    media = folder / "media"
    media.mkdir()
    write_image(media / "face.png")
    write_video(media / "clip.mp4", seconds=2.0)
    (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    turn = [{"role": "speaker", "text": "I keep crying since my dog died."}]
    analysis = {"expert_analysis": "Grief; tearful; no risk expressed."}
    records = [
        {
            "dialogue": turn,
            "privileged": analysis,
            "media": [{"type": "image", "path": "media/face.png"}],
        },
        {
            "dialogue": [{"role": "speaker", "text": "Exams next week, my chest is tight."}],
            "privileged": {"expert_analysis": "Anticipatory anxiety."},
            "media": [{"type": "video", "path": "media/clip.mp4", "start": 0.5, "end": 1.5}],
        },
        {
            "dialogue": [{"role": "speaker", "text": "I got the job but I feel like a fraud."}],
            "media": [
                {"type": "image", "path": "media/face.png"},
                {"type": "video", "path": "media/clip.mp4"},
            ],
        },
        {"dialogue": turn, "media": [{"type": "image", "path": "media/broken.png"}]},
        {"dialogue": turn, "media": [{"type": "image", "path": "media/gone.png"}]},
    ]
    path = folder / "mm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_cfg(model: Path, inputs: Path, out: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "teacher": {"model": str(model), "max_new_tokens": 12, "engine": ENGINE},
            "teacher_cache": {
                "inputs": [str(inputs)],
                "output": str(out),
                "top_k": 5,
                "shard_size": 2,
                "media": {"frames": FRAMES},
                # the random tiny VLM writes noise: its gate is off (see test_quality.py)
                "quality": {check: "off" for check in quality.CHECKS},
            },
        }
    )


@pytest.mark.slow  # builds the tiny VLM (~20 s)
def test_text_fingerprint_ignores_the_image_token(tiny_vlm, embedded_teacher):
    vlm_tok, text_tok = load_tokenizer(tiny_vlm), load_tokenizer(embedded_teacher)
    processor = load_processor(tiny_vlm)
    assert len(vlm_tok) == TEXT_VOCAB + 1 and len(text_tok) == TEXT_VOCAB
    assert media_token_ids(processor) == {TEXT_VOCAB}
    assert tokenizer_fingerprint(vlm_tok) != tokenizer_fingerprint(text_tok)
    fingerprint = tokenizer_fingerprint(vlm_tok, media_token_ids(processor))
    assert fingerprint == tokenizer_fingerprint(text_tok)
    assert tokenizer_fingerprint(text_tok) == tokenizer_fingerprint(text_tok)


@pytest.mark.engine
def test_images_and_video_frames_through_vllm(tiny_vlm, embedded_teacher, tmp_path, monkeypatch):
    from empathy_distill.stage1_teacher import teacher_cache

    out = tmp_path / "cache"
    inputs = mm_inputs(tmp_path)
    summary = teacher_cache.main(make_cfg(tiny_vlm, inputs, out))
    assert summary["examples_read"] == 5 and summary["rejected"] == 2
    assert summary["new_examples"] == 3 and summary["new_shards"] == 2

    reasons = [json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert any("file not found" in r for r in reasons)  # the reader's check
    assert any(r.startswith("media 1: cannot decode image broken.png") for r in reasons)

    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for e in manifest["shards"] for r in read_rows(out / e["file"])]
    by_images = {len(r["media"]): r for r in rows}
    assert sorted(len(r["media"]) for r in rows) == [1, 1, 2]
    for r in rows:
        n_frames = sum(1 if m["type"] == "image" else FRAMES for m in r["media"])
        ctx = r["teacher_context_token_ids"]
        # the context is what vLLM saw: one expanded placeholder run per image / frame
        assert ctx.count(TEXT_VOCAB) == IMAGE_TOKENS * n_frames
        assert r["response_token_ids"] and max(r["response_token_ids"]) < TEXT_VOCAB
        assert r["topk_token_ids"].shape[1] == 5 and r["topk_token_ids"].max() < TEXT_VOCAB
        assert len(r["teacher_features"]) == 128
        assert all(Path(m["path"]).is_file() for m in r["media"])  # references kept
    video = next(r for r in rows if r["media"][0]["type"] == "video")
    assert video["media"][0]["start"] == 0.5 and video["media"][0]["end"] == 1.5
    assert by_images[2]["privileged"] == []

    # The student (SmolLM2's tokenizer, 49,152 ids) passes the consumer's check.
    student_fp = tokenizer_fingerprint(load_tokenizer(embedded_teacher))
    checked = verify_cache(out, tokenizer_fingerprint=student_fp, vocab_size=TEXT_VOCAB, top_k=5)
    assert checked["settings"]["media"] == {"frames": FRAMES, "image_size": None}
    check_against_transformers(tiny_vlm, rows)
    # `pipeline inspect --rescore` re-scores the rows with their frames (the recorded settings)
    from empathy_distill.stage1_teacher.inspect_cache import Tolerance, rescore

    text, ok = rescore(out, 3, Tolerance())
    assert ok and "skipped" not in text, text

    # A rerun has nothing to do: no engine, the same rejects once each.
    def no_engine(*args, **kwargs):
        raise AssertionError("a rerun with nothing new must not start the engine")

    monkeypatch.setattr(teacher_cache, "start_engine", no_engine)
    again = teacher_cache.main(make_cfg(tiny_vlm, inputs, out))
    assert again["new_examples"] == 0 and again["already_cached"] == 3 and again["rejected"] == 2
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2


def check_against_transformers(model_dir: Path, rows: list[dict]) -> None:
    """The stored log-probabilities and features are the teacher's given the images: transformers'
    LLaVA on the stored context ids plus the same frames agrees (float32, 1e-3; the features within
    their int8 code step), and other pixels would have given other log-probabilities."""
    from transformers import LlavaForConditionalGeneration

    from empathy_distill.stage1_teacher.media import load_media

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)
    for r in rows:
        frames = load_media(r["media"], frames=FRAMES)
        pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
        ctx, reply = r["teacher_context_token_ids"], r["response_token_ids"]
        ids = torch.tensor([ctx + reply])
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
            blank = model(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        for t, token in enumerate(reply):
            assert abs(logp[len(ctx) + t - 1, token].item() - r["target_logprob"][t]) < 1e-3
        assert (torch.log_softmax(blank[0], dim=-1) - logp).abs().max() > 1e-3  # images matter
        states = torch.nn.functional.normalize(out.hidden_states[-1][0], dim=-1)
        span = states[len(ctx) - 1 : len(ctx) - 1 + len(reply)]  # predicting the reply tokens
        assert_features_match(span.mean(0), r["teacher_features"])
