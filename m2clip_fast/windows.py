"""Long videos: the sliding windows ``predict --window`` predicts over, their timeline plot, and an annotated copy
of the video.

``predict --window W --stride S`` cuts each video into windows of ``round(W * fps)`` frames every
``round(S * fps)`` frames (fps: the stream's average frame rate); the last window ends at the video's last frame,
so together they cover every frame exactly once or more, and a video shorter than one window is one window.
Each window is predicted like a whole video (its own CLIPSxCROPS views, sampled inside it).
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .data.decode import get_index
from .inputs import Clip

__all__ = ["plan_windows", "video_rate", "windows_of", "window_row", "output_names", "write_jsonl", "timeline_png",
           "annotate_video"]


def plan_windows(total: int, window: int, stride: int) -> List[Tuple[int, int]]:
    """Frame ranges ``[start, stop)`` of the windows over ``total`` frames: starts 0, stride, 2·stride, ... while a
    whole window fits, then one more ending at ``total`` if frames are left; a window longer than the video is
    the whole video. Needs ``1 <= stride <= window``, so no frame falls between windows."""
    if total < 1:
        raise ValueError(f"cannot cut windows from a video with {total} frames")
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window frames, got stride {stride}, window {window}")
    window = min(window, total)
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)
    return [(s, s + window) for s in starts]


def video_rate(path: str) -> Tuple[int, Fraction]:
    """``(frame count, frames per second)`` of a video; the rate from its timestamps when the stream has none."""
    index = get_index(path)
    rate = index.average_rate
    if not rate and index.num_frames > 1:
        span = Fraction(int(index.pts[-1] - index.pts[0])) * index.time_base
        rate = Fraction(index.num_frames - 1) / span if span else None
    return index.num_frames, Fraction(rate) if rate else Fraction(25)


def windows_of(path: str, window_s: float, stride_s: float) -> Tuple[List[Clip], Fraction]:
    total, fps = video_rate(path)
    window = max(1, round(window_s * fps))
    stride = min(window, max(1, round(stride_s * fps)))
    return [Clip(path, s, e) for s, e in plan_windows(total, window, stride)], fps


def window_row(clip: Clip, fps: Fraction, predictions: Dict[str, Any]) -> Dict[str, Any]:
    return {"file": clip.path, "start": float(clip.start / fps), "end": float(clip.stop / fps),
            "start_frame": clip.start, "end_frame": clip.stop, "predictions": predictions}


def output_names(paths: Sequence[str]) -> List[str]:
    """A file-name stem for each video, made unique by a number where two videos share one."""
    seen: Dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------- timeline


def timeline_png(path: Path, rows: Sequence[Dict[str, Any]], probs: np.ndarray, class_names: Sequence[str],
                 head: str, title: str, classes: int = 5) -> None:
    """Probabilities over time of the ``classes`` classes with the highest peak probability (a class that leads
    only a short stretch of a long video still shows): one point per window at its centre (``probs`` float (W, C),
    one row per window of ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = np.argsort(-probs.max(axis=0), kind="stable")[:classes]
    starts = np.array([r["start"] for r in rows])
    ends = np.array([r["end"] for r in rows])
    centres = (starts + ends) / 2
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    for c in top:
        ax.plot(centres, probs[:, c], marker="o", markersize=3, label=class_names[c])
    ax.set_xlim(float(starts.min()), float(ends.max()))
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s), at the centre of each window")
    ax.set_ylabel(f"probability ({head} head)")
    ax.set_title(Path(title).name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- annotation


def frame_windows(total: int, rows: Sequence[Dict[str, Any]]) -> np.ndarray:
    """int64 (total,): for each frame, the row of the window whose centre is nearest (the current prediction)."""
    centres = np.array([(r["start_frame"] + r["end_frame"]) / 2 for r in rows])
    frames = np.arange(total) + 0.5
    return np.abs(frames[:, None] - centres[None, :]).argmin(axis=1)


def _draw_label(image: np.ndarray, text: str, font) -> np.ndarray:
    """uint8 (H, W, 3) with ``text`` in white on a black box in its top-left corner."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((2, 1), text, font=font)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def _fitting_font(labels: Sequence[str], width: int, height: int):
    """Pillow's default font at 1/18 of the frame height, smaller (down to 6 px) until the longest label fits."""
    from PIL import Image, ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest = max(labels, key=len)
    size = max(8, height // 18)
    while size > 6 and draw.textlength(longest, font=ImageFont.load_default(size=size)) > width - 4:
        size -= 1
    return ImageFont.load_default(size=size)


def _even(image: np.ndarray) -> np.ndarray:
    """Pad to even height and width (YUV 4:2:0 needs them) by repeating the last row / column."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else image


def annotate_video(src: str, dst: str, rows: Sequence[Dict[str, Any]], head: str) -> None:
    """Write ``dst`` (H.264 via PyAV, the source's frame rate; no audio): every frame of ``src`` with the top
    label and score of its current window (:func:`frame_windows`) drawn on it."""
    import av

    total, fps = video_rate(src)
    current = frame_windows(total, rows)
    labels = [f"{r['predictions'][head][0]['label']} {100 * r['predictions'][head][0]['score']:.0f}%" for r in rows]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with av.open(src) as source, av.open(dst, "w") as out:
        stream_in = source.streams.video[0]
        font = _fitting_font(labels, stream_in.width, stream_in.height)
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = stream_in.width + stream_in.width % 2, stream_in.height + stream_in.height % 2
        stream.pix_fmt = "yuv420p"
        for n, frame in enumerate(source.decode(stream_in)):
            image = _draw_label(frame.to_ndarray(format="rgb24"), labels[current[min(n, total - 1)]], font)
            picture = av.VideoFrame.from_ndarray(_even(image), format="rgb24")
            picture.pts = n
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
