"""Media loading for the multimodal teacher: images (PIL) and video clips (PyAV), every failure a
reason string. The test clips are written here with PyAV itself: frame i is a flat grey of
brightness 12 * i, so a sampled frame tells which frame of the clip it is."""

from __future__ import annotations

import json

import pytest

from empathy_distill.shared.readers import read_examples
from empathy_distill.stage1_teacher.media import MediaError, load_image, load_media, load_video

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

from conftest import STEP, write_image, write_video  # noqa: E402  (after importorskip)


def frame_index(img) -> int:
    return round(float(np.asarray(img, dtype=np.float32).mean()) / STEP)


def test_image_loads_as_rgb_and_is_downscaled(tmp_path):
    path = write_image(tmp_path / "face.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (48, 24)
    assert load_image(path, image_size=32).size == (32, 16)  # longer side fits, aspect kept
    gray = tmp_path / "gray.jpg"
    Image.new("L", (8, 8), 100).save(gray)
    assert load_image(gray).mode == "RGB"


def test_corrupt_missing_and_unsupported_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    with pytest.raises(MediaError, match="cannot decode image broken.png"):
        load_image(bad)
    with pytest.raises(MediaError, match="file not found"):
        load_image(tmp_path / "nope.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(MediaError, match="unsupported image format '.txt'"):
        load_image(notes)
    clip = tmp_path / "clip.gifv"
    clip.write_bytes(b"x")
    with pytest.raises(MediaError, match="unsupported video format '.gifv'"):
        load_video(clip, 4)


def test_video_sampled_to_n_frames(tmp_path):
    clip = write_video(tmp_path / "clip.mp4")  # 20 frames, 2 s
    frames = load_video(clip, 4)
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    # centres of four 0.5 s slices: 0.25, 0.75, 1.25, 1.75 s -> frames 3, 8, 13, 18
    assert [frame_index(f) for f in frames] == [3, 8, 13, 18]
    assert len(load_video(clip, 30)) == 30  # more frames than the clip has: frames repeat
    assert [f.size for f in load_video(clip, 2, image_size=16)] == [(16, 16)] * 2


def test_video_time_span(tmp_path):
    clip = write_video(tmp_path / "clip.mp4")
    # [1.0, 2.0] s in two slices: centres 1.25 and 1.75 s -> frames 13 and 18
    assert [frame_index(f) for f in load_video(clip, 2, start=1.0, end=2.0)] == [13, 18]
    assert [frame_index(f) for f in load_video(clip, 2, start=0.5, end=1.0)] == [7, 9]
    assert len(load_video(clip, 3, start=1.5, end=2.02)) == 3  # rounding: within SPAN_SLACK
    with pytest.raises(MediaError, match="end 60 s is past the end of clip.mp4"):
        load_video(clip, 3, start=1.5, end=60)  # a span outside the clip is a reject
    with pytest.raises(MediaError, match="past the end"):
        load_video(clip, 2, start=5.0)
    with pytest.raises(MediaError, match="empty or negative"):
        load_video(clip, 2, start=1.5, end=1.0)


def test_corrupt_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 200)
    with pytest.raises(MediaError, match="cannot decode video bad.mp4"):
        load_video(bad, 4)
    half = tmp_path / "half.mp4"
    half.write_bytes(write_video(tmp_path / "full.mp4").read_bytes()[:300])
    with pytest.raises(MediaError, match="half.mp4"):
        load_video(half, 4)


def test_load_media_numbers_the_failing_entry(tmp_path):
    image, clip = write_image(tmp_path / "a.png"), write_video(tmp_path / "b.mp4")
    media = [
        {"type": "image", "path": str(image), "start": None, "end": None},
        {"type": "video", "path": str(clip), "start": 0.0, "end": 1.0},
    ]
    assert len(load_media(media, frames=3)) == 1 + 3
    broken = tmp_path / "c.png"
    broken.write_bytes(b"nope")
    with pytest.raises(MediaError, match=r"^media 3: cannot decode image c.png"):
        load_media([*media, {"type": "image", "path": str(broken)}], frames=3)


def test_reader_rejects_paths_leaving_the_folder_and_bad_spans(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_image(tmp_path / "outside.png")
    write_image(data / "inside.png")
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    turn = [{"role": "speaker", "text": "Look."}]
    records = [
        {"dialogue": turn, "media": [{"type": "image", "path": "inside.png"}]},
        {"dialogue": turn, "media": [{"type": "image", "path": "../outside.png"}]},
        {"dialogue": turn, "media": [{"type": "image", "path": "link.png"}]},
        {"dialogue": turn, "media": [{"type": "image", "path": "inside.png", "start": 1}]},
        {
            "dialogue": turn,
            "media": [{"type": "video", "path": "inside.png", "start": 2, "end": 1}],
        },
        {"dialogue": turn, "media": [{"type": "video", "path": "inside.png", "start": -1}]},
    ]
    path = data / "mm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, rejects = read_examples(path)
    assert len(examples) == 1 and len(rejects) == 5
    reasons = [r.reason for r in rejects]
    assert "leaves the folder" in reasons[0] and "leaves the folder" in reasons[1]
    assert "start/end apply to videos only" in reasons[2]
    assert all("empty or negative" in r for r in reasons[3:])
