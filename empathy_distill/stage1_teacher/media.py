"""Media for a vision-language teacher: image files and video clips, loaded as RGB frames.

    frames = load_media(example.media, frames=8, image_size=448)   # list of PIL images

An image entry gives one frame; a video entry gives `frames` frames sampled evenly over its
optional [start, end] span (seconds), decoded with PyAV (the ffmpeg libraries ship in its wheel).
Frame i is the first decoded frame at or after the centre of the i-th of `frames` equal slices of
the span, so a clip shorter than `frames` frames repeats frames instead of failing. Every frame is
handed to the teacher as an image (vLLM's multi-image input), the way LLaVA-style models read video.

Every failure (missing file, unsupported format, corrupt bytes, a span outside the clip) raises
`MediaError` whose message is the reason written to `rejects.jsonl`: one bad file rejects its
example, never the run. Paths are the absolute ones `shared.readers` resolved and checked (they do
not leave the JSONL file's folder).
"""

from __future__ import annotations

from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")


class MediaError(Exception):
    """A media entry that cannot be used; str(error) is the reject reason."""


def load_media(media: list[dict], frames: int = 8, image_size: int | None = None) -> list:
    """All frames of one example's media entries, in order (an image = one frame)."""
    out = []
    for n, entry in enumerate(media, 1):
        try:
            if entry["type"] == "image":
                out.append(load_image(Path(entry["path"]), image_size))
            else:
                out += load_video(
                    Path(entry["path"]), frames, entry.get("start"), entry.get("end"), image_size
                )
        except MediaError as err:
            raise MediaError(f"media {n}: {err}") from None
    return out


def image_suffixes() -> set[str]:
    from PIL import Image

    return {s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def load_image(path: Path, image_size: int | None = None):
    """One RGB image; the longer side is scaled down to `image_size` pixels when it is larger."""
    from PIL import Image

    _check_file(path)
    if path.suffix.lower() not in image_suffixes():
        raise MediaError(
            f"unsupported image format {path.suffix or '(no extension)'!r}: {path.name}"
        )
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes (OSError, SyntaxError, ...)
        raise MediaError(f"cannot decode image {path.name}: {_first_line(err)}") from None
    return _fit(rgb, image_size)


SPAN_SLACK = 0.05  # seconds


def load_video(
    path: Path,
    frames: int,
    start: float | None = None,
    end: float | None = None,
    image_size: int | None = None,
) -> list:
    """`frames` RGB frames sampled evenly over [start, end] seconds (default: the whole clip)."""
    import av

    _check_file(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise MediaError(
            f"unsupported video format {path.suffix or '(no extension)'!r}: {path.name} "
            f"(use one of {', '.join(VIDEO_SUFFIXES)})"
        )
    if frames < 1:
        raise MediaError(f"frames must be at least 1, got {frames}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {path.name}")
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            t0 = 0.0 if start is None else float(start)
            t1 = duration if end is None else min(float(end), duration)
            if t0 < 0 or (end is not None and float(end) <= t0):
                raise MediaError(f"time span [{start}, {end}] is empty or negative")
            if t0 >= duration:
                raise MediaError(f"start {t0:g} s is past the end of {path.name} ({duration:g} s)")
            # A span outside the clip is a reject (as the README says), not silently shortened;
            # SPAN_SLACK allows for the rounding of a duration written by hand.
            if end is not None and float(end) > duration + SPAN_SLACK:
                raise MediaError(
                    f"end {float(end):g} s is past the end of {path.name} ({duration:g} s)"
                )
            targets = [t0 + (i + 0.5) * (t1 - t0) / frames for i in range(frames)]
            if t0 > 0:
                container.seek(int(t0 / stream.time_base), stream=stream, backward=True)
            picked, last = [], None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                last = frame
                while len(picked) < frames and frame.time >= targets[len(picked)] - 1e-6:
                    picked.append(frame.to_image())
                if len(picked) == frames:
                    break
            if last is None or last.time < t0 - 1e-6:
                raise MediaError(f"no frame decoded in [{t0:g}, {t1:g}] s of {path.name}")
            while len(picked) < frames:  # the span's tail has no later frame: repeat the last
                picked.append(last.to_image())
    except MediaError:
        raise
    except Exception as err:  # av.FFmpegError and friends: corrupt or truncated files
        raise MediaError(f"cannot decode video {path.name}: {_first_line(err)}") from None
    return [_fit(img.convert("RGB"), image_size) for img in picked]


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # microseconds (av.time_base)
    raise MediaError("the clip has no duration")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(f"file not found: {path}")


def _fit(img, image_size: int | None):
    if image_size and max(img.size) > image_size:
        img = img.copy()
        img.thumbnail((image_size, image_size))
    return img


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
