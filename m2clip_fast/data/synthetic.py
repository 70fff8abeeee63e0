"""A real, encoded synthetic action dataset whose classes exist only in the motion.

Every video shows one textured two-colour bar on a smooth random background. The class is the
*motion* of the bar: moving left / right / up / down, rotating clockwise / anticlockwise,
growing / shrinking. Per-frame appearance is drawn from the same distribution for every class:

* translation wraps around the frame edges (toroidal), so the bar's position in any single frame
  is uniform over the frame whatever the direction;
* the bar of every class has a uniformly random orientation and position; its size follows a
  random growth track, played forwards (growing), backwards (shrinking) or frozen at a random
  moment (all other classes), so the size in one frame has the same distribution for every class;
* colours, background, speed and a little per-frame noise are random per video.

So a single frame carries no label; two frames a few steps apart do. Horizontal flipping swaps
left/right and clockwise/anticlockwise: train on this set with ``flip=False``.

Run ``python -m m2clip_fast.data.synthetic --out DIR`` to write ``DIR/videos/<class>/*.mp4``,
``DIR/train.txt`` and ``DIR/val.txt`` (mmaction2 list format, paths relative to ``DIR``),
``DIR/classes.txt`` and ``DIR/meta.json`` (the generation parameters, so a reader such as the demo
can tell which set a folder holds). :func:`write_video` and :func:`write_broken_video` are reused by
the tests and benchmarks.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import av
import numpy as np

from ..errors import UsageError

__all__ = [
    "CLASSES",
    "CODECS",
    "BROKEN_KINDS",
    "write_video",
    "write_broken_video",
    "render_clip",
    "textured_frames",
    "make_dataset",
    "dataset_meta",
    "read_meta",
    "main",
]

CLASSES = (
    "moving_left",
    "moving_right",
    "moving_up",
    "moving_down",
    "rotating_clockwise",
    "rotating_anticlockwise",
    "growing",
    "shrinking",
)

# codec key -> (FFmpeg encoder, file extension, default number of B-frames)
CODECS: Dict[str, tuple] = {
    "h264": ("libx264", ".mp4", 2),
    "vp9": ("libvpx-vp9", ".webm", 0),
    "mpeg4": ("mpeg4", ".avi", 0),
}

BROKEN_KINDS = ("truncated", "garbage", "zero_frames", "empty", "no_video_stream")

PathLike = Union[str, os.PathLike]


def _encoder_options(codec: str, gop: int, bframes: int, quality: Optional[int]) -> Dict[str, str]:
    if codec == "h264":
        crf = 18 if quality is None else quality
        # scenecut=0 and min-keyint=keyint make the keyframe interval exactly `gop`, which the
        # tests and benchmarks rely on ("short" vs "long" GOP); 'veryfast' keeps B-frames, unlike
        # 'ultrafast'.
        return {
            "preset": "veryfast",
            "crf": str(crf),
            "bf": str(bframes),
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}",
        }
    if codec == "vp9":
        crf = 32 if quality is None else quality
        return {
            "deadline": "realtime",
            "cpu-used": "8",
            "crf": str(crf),
            "b": "0",
            "keyint_min": str(gop),
            "row-mt": "1",
        }
    if codec == "mpeg4":
        return {"bf": str(bframes)}
    raise UsageError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")


def _rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H * 3 // 2, W) planar YUV 4:2:0, BT.601 limited range.

    Chroma is taken from the mean colour of each 2x2 block.
    """
    rgb = image.astype(np.float32)
    h, w = rgb.shape[:2]
    y = 16 + rgb @ np.array([65.481, 128.553, 24.966], np.float32) / 255
    block = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u = 128 + block @ np.array([-37.797, -74.203, 112.0], np.float32) / 255
    v = 128 + block @ np.array([112.0, -93.786, -18.214], np.float32) / 255
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(
    path: PathLike,
    frames_uint8,
    fps: int = 25,
    codec: str = "h264",
    gop: int = 12,
    *,
    bframes: Optional[int] = None,
    quality: Optional[int] = None,
    faststart: bool = False,
    threads: int = 1,
) -> Path:
    """Encode ``frames_uint8`` (uint8 array/tensor (T, H, W, 3), RGB, H and W even) to ``path``.

    ``codec`` is ``"h264"`` (libx264, use .mp4/.mkv/.avi), ``"vp9"`` (libvpx-vp9, .webm/.mkv) or
    ``"mpeg4"`` (MPEG-4 Part 2, .avi/.mp4). ``gop`` is the keyframe interval in frames,
    ``bframes`` the number of consecutive B-frames (default: 2 for h264, 0 otherwise),
    ``quality`` the codec's crf (h264/vp9) or qscale (mpeg4). ``faststart`` puts the mp4 index at
    the front of the file (as web-downloaded Kinetics clips have). ``threads``: encoder threads
    (0: FFmpeg chooses). RGB is converted to YUV 4:2:0 here with BT.601 limited-range
    coefficients, the matrix decoders assume for untagged video. Note: libx264 and libvpx do not
    reproduce their bitstreams exactly across processes, so the decoded pixels of two runs can
    differ by a few levels even though the rendered frames are identical. Returns the path.
    """
    if codec not in CODECS:
        raise UsageError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("cannot encode zero frames; use write_broken_video(kind='zero_frames')")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    encoder, _, default_bf = CODECS[codec]
    bframes = default_bf if bframes is None else int(bframes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_count = threads
        if codec == "mpeg4":
            stream.codec_context.max_b_frames = bframes
            stream.codec_context.bit_rate = max(200_000, 8 * w * h * fps // 10)
            if quality is not None:
                stream.codec_context.qscale = quality
        stream.options = _encoder_options(codec, gop, bframes, quality)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(image), format="yuv420p")
            frame.pts = i  # in 1/fps units, the stream's codec time base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_broken_video(path: PathLike, kind: str, *, seed: int = 0) -> Path:
    """Write a deliberately unusable video file for tests.

    ``kind``: ``"truncated"`` (a valid h264 mp4 with its index at the front, cut in half),
    ``"garbage"`` (random bytes), ``"zero_frames"`` (an AVI with a video stream and no frame),
    ``"empty"`` (0 bytes), ``"no_video_stream"`` (an mp4 container without any stream).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "truncated":
        frames = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
        write_video(path, frames, codec="h264", gop=8, faststart=True)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_frames":
        # AVI writes its header (and thus the stream) without any packet; mp4/webm would not.
        if path.suffix.lower() != ".avi":
            raise ValueError("kind='zero_frames' needs an .avi path")
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            container.start_encoding()
    elif kind == "no_video_stream":
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            container.start_encoding()
    else:
        raise ValueError(f"unknown broken kind {kind!r}; expected one of {BROKEN_KINDS}")
    return path


# --------------------------------------------------------------------------------------------
# rendering


def textured_frames(n: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """uint8 (n, height, width, 3): a blocky random texture scrolling diagonally over a moving
    gradient, plus a little noise. Every frame differs from every other one (so a wrong frame is
    detectable) and the content costs a codec about what real footage does. Used by the decoder
    tests and benchmarks.
    """
    rng = np.random.default_rng(seed)
    block = 8
    tex = rng.integers(0, 256, size=(height // block + 1, width // block + 1, 3)).astype(np.int16)
    tex = np.repeat(np.repeat(tex, block, 0), block, 1)[:height, :width]
    noise = rng.integers(-4, 5, size=(7, height, width, 1), dtype=np.int16)
    ramp = np.arange(width, dtype=np.int16)[None, :, None]
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for t in range(n):
        moved = np.roll(tex, (t, 2 * t), axis=(0, 1)) * 3 // 5
        gradient = (ramp + 3 * t) % 96
        out[t] = np.clip(moved + gradient + noise[t % 7] + 30, 0, 255)
    return out


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (size, size, 3) in [0, 255]: a random gradient plus upsampled low-frequency noise."""
    base = rng.uniform(40, 215, size=3)
    gradient = rng.uniform(-40, 40, size=(2, 3))
    coarse = rng.normal(0.0, 18.0, size=(5, 5, 3))
    axis = np.linspace(0.0, 1.0, size)
    # bilinear upsampling of the 5x5 noise grid to size x size, one axis at a time
    pos = np.linspace(0.0, 4.0, size)
    i0 = np.minimum(pos.astype(int), 3)
    frac = (pos - i0)[:, None, None]
    rows = coarse[i0] * (1 - frac) + coarse[i0 + 1] * frac  # (size, 5, 3)
    noise = rows[:, i0] * (1 - frac[None, :, :, 0]) + rows[:, i0 + 1] * frac[None, :, :, 0]
    bg = base + axis[:, None, None] * gradient[0] + axis[None, :, None] * gradient[1] + noise
    return np.clip(bg, 0, 255)


def _distinct_colours(rng: np.random.Generator, background_mean: np.ndarray, n: int) -> np.ndarray:
    """``n`` random RGB colours far enough from the background and each other to stay visible."""
    colours = []
    while len(colours) < n:
        c = rng.uniform(0, 255, size=3)
        if np.abs(c - background_mean).max() < 90:
            continue
        if any(np.abs(c - o).max() < 90 for o in colours):
            continue
        colours.append(c)
    return np.stack(colours)


def render_clip(label: int, rng: np.random.Generator, *, frames: int = 32, size: int = 64) -> np.ndarray:
    """Render one clip of class ``label`` (index into :data:`CLASSES`): uint8 (frames, size, size, 3)."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    name = CLASSES[label]
    bg = _smooth_background(rng, size)
    c_head, c_tail = _distinct_colours(rng, bg.mean(axis=(0, 1)), 2)

    t = np.arange(frames, dtype=np.float64)
    cx = np.full(frames, rng.uniform(0, size))
    cy = np.full(frames, rng.uniform(0, size))
    angle = np.full(frames, rng.uniform(0, 2 * np.pi))
    # Bar half-length (pixels): a growth track from a random start, seen forwards (growing),
    # backwards (shrinking) or frozen at one random moment (every other class), so the size in a
    # single frame has the same distribution for every class.
    lo, hi = 0.12 * size, 0.34 * size
    ratio = rng.uniform(1.7, 2.2)  # total scale change over the clip
    start = np.exp(rng.uniform(np.log(lo), np.log(hi / ratio)))
    track = start * ratio ** (t / max(frames - 1, 1))
    half_len = np.full(frames, track[rng.integers(frames)])

    if name.startswith("moving"):
        speed = rng.uniform(1.5, 2.5) * size / 64.0  # pixels per frame
        dx, dy = {"moving_left": (-1, 0), "moving_right": (1, 0), "moving_up": (0, -1),
                  "moving_down": (0, 1)}[name]
        cx = cx + dx * speed * t
        cy = cy + dy * speed * t
    elif name.startswith("rotating"):
        # radians per frame: < 90 degrees between frames 5 apart, so the demo's every-4th-frame
        # sampling never aliases a turn into its reverse
        omega = np.deg2rad(rng.uniform(11.0, 16.0))
        # image y grows downwards, so a clockwise turn on screen is a positive angle here
        sign = 1.0 if name == "rotating_clockwise" else -1.0
        angle = angle + sign * omega * t
    else:
        half_len = track if name == "growing" else track[::-1].copy()

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        # wrap-around offsets so a translating bar is never clipped by the border and its
        # position is uniformly distributed in every frame
        ox = (xs - cx[k] + size / 2) % size - size / 2
        oy = (ys - cy[k] + size / 2) % size - size / 2
        ca, sa = np.cos(angle[k]), np.sin(angle[k])
        along = ca * ox + sa * oy  # coordinate along the bar's long axis, in pixels
        across = -sa * ox + ca * oy
        half_w = 0.42 * half_len[k]
        # signed distance (pixels) to the bar's rectangle gives a 1-pixel anti-aliased edge
        dist = np.maximum(np.abs(along) - half_len[k], np.abs(across) - half_w)
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
        # two colours split along the bar plus stripes: the texture breaks the 180-degree
        # symmetry so clockwise and anticlockwise turns look different
        head = (along > 0)[..., None]
        stripes = (np.floor(across / max(half_w / 2, 1.0)) % 2)[..., None]
        colour = np.where(head, c_head, c_tail) * (0.8 + 0.2 * stripes)
        noise = rng.normal(0.0, 4.0, size=(size, size, 3))
        img = bg * (1 - alpha) + colour * alpha + noise
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# Bumped whenever rendering or the folder layout changes, so that a set written by an older version no
# longer matches the parameters a reader asks for (see meta.json).
SET_VERSION = 1
GENERATOR = "m2clip_fast.data.synthetic"


def _check_parameters(codec: str, per_class: int, val_per_class: int, frames: int, size: int, gop: int,
                      fps: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    for name, value, low in (("per_class", per_class, 1), ("val_per_class", val_per_class, 0), ("frames", frames, 1),
                             ("size", size, 2), ("gop", gop, 1), ("fps", fps, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if size % 2:
        raise UsageError(f"size must be even (yuv420p), got {size}")


def _remove_earlier_set(out: Path) -> None:
    """Delete what an earlier :func:`make_dataset` wrote to ``out`` (recognised by its file names only), so
    the folder ends up holding exactly the new set: a smaller count or another codec leaves no stray videos."""
    for name in ("meta.json", "train.txt", "val.txt"):
        (out / name).unlink(missing_ok=True)
    for name in CLASSES:
        for split in ("train", "val"):
            for ext in {entry[1] for entry in CODECS.values()}:
                for stale in (out / "videos" / name).glob(f"{split}_{name}_[0-9][0-9][0-9][0-9]{ext}"):
                    stale.unlink()


def make_dataset(
    out: PathLike,
    *,
    codec: str = "h264",
    per_class: int = 48,
    val_per_class: int = 12,
    frames: int = 32,
    size: int = 64,
    gop: int = 12,
    fps: int = 25,
    seed: int = 0,
) -> Dict[str, Path]:
    """Write the synthetic dataset under ``out``; returns the paths of train/val lists, classes and meta.

    The rendered frames are deterministic from ``seed`` (each video has its own generator seeded
    by ``(seed, split, class, index)``, so adding classes or videos leaves the others unchanged);
    the encoded bytes may vary slightly between runs (see :func:`write_video`).
    ``val_per_class=0`` writes no ``val.txt`` (and the result has no "val" entry). A set written
    earlier to ``out`` is replaced: its lists and videos are deleted first (only files with this
    generator's names). ``meta.json`` holds every parameter above plus the generator's version; it is
    written last, so a folder without it holds no complete set. Raises ValueError for bad parameters.
    """
    _check_parameters(codec, per_class, val_per_class, frames, size, gop, fps)
    out = Path(out)
    _remove_earlier_set(out)
    ext = CODECS[codec][1]
    lists = {}
    for split_id, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        if count == 0:
            continue  # an empty list file would only fail later, in train, as "no usable samples"
        lines = []
        for label, name in enumerate(CLASSES):
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, label, i])
                clip = render_clip(label, rng, frames=frames, size=size)
                rel = f"videos/{name}/{split}_{name}_{i:04d}{ext}"
                write_video(out / rel, clip, fps=fps, codec=codec, gop=gop)
                lines.append(f"{rel} {label}")
        lists[split] = out / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    lists["classes"] = out / "classes.txt"
    lists["classes"].write_text("\n".join(CLASSES) + "\n")
    meta = dataset_meta(codec=codec, per_class=per_class, val_per_class=val_per_class, frames=frames, size=size,
                        gop=gop, fps=fps, seed=seed)
    lists["meta"] = out / "meta.json"
    lists["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return lists


def dataset_meta(**params: Any) -> Dict[str, Any]:
    """What ``make_dataset(out, **params)`` stores in meta.json: every parameter, defaults filled in, plus
    the generator's name and version. Compare it with :func:`read_meta` to tell whether a folder holds
    that set. Raises TypeError for a name make_dataset does not take."""
    bound = inspect.signature(make_dataset).bind(None, **params)
    bound.apply_defaults()
    return {"generator": GENERATOR, "version": SET_VERSION, **bound.kwargs}


def read_meta(out: PathLike) -> Optional[Dict[str, Any]]:
    """The parameters :func:`make_dataset` stored in ``out/meta.json``; None when the folder has no
    complete set written by this generator (no file, unreadable, or another program's JSON)."""
    try:
        meta = json.loads((Path(out) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == GENERATOR else None


PROG = "python -m m2clip_fast.data.synthetic"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; bad options exit 2 with argparse's usage line, other user errors with one line."""
    from ..cli import int_at_least, run_main

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a real encoded synthetic action dataset (classes only visible in motion).",
    )
    parser.add_argument("--out", required=True, help="output directory (a set written there earlier is replaced)")
    parser.add_argument("--codec", default="h264", choices=sorted(CODECS))
    parser.add_argument("--per-class", type=int_at_least(1), default=48, help="training videos per class (>= 1)")
    parser.add_argument("--val-per-class", type=int_at_least(0), default=12,
                        help="validation videos per class; 0 writes no val.txt")
    parser.add_argument("--frames", type=int_at_least(1), default=32, help="frames per video (>= 1)")
    parser.add_argument("--size", type=int_at_least(2, even=True), default=64, help="frame width and height (even)")
    parser.add_argument("--gop", type=int_at_least(1), default=12, help="keyframe interval in frames")
    parser.add_argument("--fps", type=int_at_least(1), default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_main(lambda: _write(args), PROG)


def _write(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    paths = make_dataset(
        args.out, codec=args.codec, per_class=args.per_class, val_per_class=args.val_per_class,
        frames=args.frames, size=args.size, gop=args.gop, fps=args.fps, seed=args.seed,
    )
    n = len(CLASSES) * (args.per_class + args.val_per_class)
    lists = ", ".join(str(paths[k]) for k in ("train", "val") if k in paths)
    print(f"wrote {n} videos ({len(CLASSES)} classes, codec {args.codec}) to {args.out} "
          f"in {time.perf_counter() - start:.1f}s; lists: {lists}{'' if 'val' in paths else ' (no validation set)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
