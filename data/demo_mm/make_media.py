"""Write the media of the multimodal demo set (data/demo_mm/): tiny images and short clips.

    python data/demo_mm/make_media.py      # rewrites data/demo_mm/media/ (deterministic)

Written for this project, like the dialogues in train.jsonl: no real person is shown. Each picture
is a simple drawn face whose mouth and colours hint at a mood; each clip (MPEG-4, 10 fps, 64 px,
written with PyAV, the decoder the pipeline reads video with) moves a face across a coloured
background, so sampled frames differ. They stand in for MEDIC's counselling-session clips.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 64
FPS = 10

# name: (background RGB, mouth curve: +1 smile, 0 flat, -1 frown)
FACES = {
    "tearful": ((70, 90, 140), -1),
    "tense": ((150, 80, 60), 0),
    "hopeful": ((230, 200, 120), 1),
}
CLIPS = {"pacing": ((90, 90, 110), 0, 3.0), "slumped": ((60, 70, 100), -1, 2.0)}


def face(background, mouth: int, dx: int = 0) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    cx = SIZE // 2 + dx
    d.ellipse([cx - 20, 10, cx + 20, 54], fill=(240, 210, 180))
    for ex in (cx - 8, cx + 8):
        d.ellipse([ex - 3, 24, ex + 3, 30], fill=(40, 40, 40))
    if mouth == 0:
        d.line([cx - 8, 42, cx + 8, 42], fill=(120, 40, 40), width=2)
    else:
        box = [cx - 9, 36, cx + 9, 48] if mouth > 0 else [cx - 9, 40, cx + 9, 52]
        start, end = (20, 160) if mouth > 0 else (200, 340)
        d.arc(box, start, end, fill=(120, 40, 40), width=2)
    return img


def write_clip(path: Path, background, mouth: int, seconds: float) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        n = round(seconds * FPS)
        for i in range(n):
            dx = round(10 * np.sin(2 * np.pi * i / n))
            frame = av.VideoFrame.from_image(face(background, mouth, dx))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main() -> None:
    media = HERE / "media"
    media.mkdir(exist_ok=True)
    for name, (background, mouth) in FACES.items():
        face(background, mouth).save(media / f"{name}.png")
    for name, (background, mouth, seconds) in CLIPS.items():
        write_clip(media / f"{name}.mp4", background, mouth, seconds)
    print(f"wrote {len(FACES)} images and {len(CLIPS)} clips into {media}")


if __name__ == "__main__":
    main()
