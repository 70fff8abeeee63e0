"""Videos given on a command line, and a dataset that decodes their test views without replacing bad ones.

``collect_videos`` turns files, folders (searched recursively), glob patterns and list files (``@list.txt`` or a
``.txt``/``.lst`` file: one path per line, optionally followed by a label) into an ordered list of video paths.
:class:`VideoViews` decodes the CLIPSxCROPS test views of a whole video or of a frame range of it, as evaluation
does; an unreadable video is an item with an ``error`` instead of a replacement by another video, because here
every prediction belongs to one named file.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .data.decode import num_frames as video_num_frames
from .data.frames import decode_frames
from .data.robust import SAMPLE_ERRORS, skip_reason
from .data.sampling import sample_indices
from .data.transforms import views_from_clips
from .errors import MissingFileError

__all__ = ["VIDEO_EXTENSIONS", "collect_videos", "Clip", "VideoViews", "collate_views", "views_loader"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".3gp", ".ogv")
LIST_SUFFIXES = (".txt", ".lst", ".list")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _from_folder(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and _is_video(p))


def _from_list(list_file: Path) -> List[str]:
    """Paths of a list file, relative ones taken from the list's folder; a trailing integer label is dropped."""
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, tail = line.rpartition(" ")
        path = head if head and tail.lstrip("-").isdigit() else line
        paths.append(path if os.path.isabs(path) else str(list_file.parent / path))
    return paths


def collect_videos(inputs: Sequence[str]) -> List[str]:
    """Video paths from ``inputs`` in the order given, each path once.

    A file with a video extension is taken as is (readable or not: decoding reports it), a folder contributes
    every video file below it (sorted), ``@F`` or a ``.txt``/``.lst``/``.list`` file is a list of paths, and
    anything else is a glob pattern. An input that matches nothing raises ``MissingFileError`` naming it.
    """
    out: List[str] = []
    for item in inputs:
        path = Path(item[1:] if item.startswith("@") else item)
        if item.startswith("@") or (path.is_file() and path.suffix.lower() in LIST_SUFFIXES):
            if not path.is_file():
                raise MissingFileError(f"list file {path} not found")
            found = _from_list(path)
        elif path.is_dir():
            found = _from_folder(path)
        elif path.is_file() or _is_video(path) and not glob.has_magic(item):
            found = [str(path)]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file() and _is_video(Path(p)))
        if not found:
            what = "folder" if path.is_dir() else "list file" if path.is_file() else "input"
            raise MissingFileError(f"{what} {item} holds no video files ({', '.join(VIDEO_EXTENSIONS[:5])}, ...)")
        out.extend(found)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Clip:
    """One prediction's worth of video: ``path``, frames ``[start, stop)`` (``stop`` None: to the end)."""

    path: str
    start: int = 0
    stop: Optional[int] = None


class VideoViews(Dataset):
    """Test views of ``clips``: item ``i`` is ``{"video": float32 (V, T, 3, size, size) or None, "index": i,
    "error": None or the reason the video could not be read}``, ``V = num_clips * num_crops`` clip-major.

    Frames are sampled inside each clip's range as evaluation samples a whole video (``sampling``, ``stride``;
    a range shorter than the clip span repeats its last frame)."""

    def __init__(self, clips: Sequence[Clip], *, num_frames: int, size: int, sampling: str, stride: int,
                 num_clips: int = 1, num_crops: int = 1):
        self.clips = list(clips)
        self.num_frames, self.size, self.sampling, self.stride = num_frames, size, sampling, stride
        self.num_clips, self.num_crops = num_clips, num_crops

    def __len__(self) -> int:
        return len(self.clips)

    def frame_indices(self, clip: Clip) -> torch.Tensor:
        """int64 (num_clips, num_frames) frame numbers of the video that ``clip``'s views show."""
        stop = video_num_frames(clip.path) if clip.stop is None else clip.stop
        indices = sample_indices(self.sampling, stop - clip.start, self.num_frames, train=False,
                                 stride=self.stride, num_clips=self.num_clips)
        return torch.from_numpy(indices) + clip.start

    def views(self, clip: Clip) -> torch.Tensor:
        indices = self.frame_indices(clip)
        frames = decode_frames(clip.path, indices.reshape(-1).tolist())
        clips = frames.view(indices.shape[0], self.num_frames, *frames.shape[1:])
        return views_from_clips(list(clips), size=self.size, num_crops=self.num_crops)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        try:
            return {"video": self.views(self.clips[i]), "index": i, "error": None}
        except SAMPLE_ERRORS as exc:  # the file's fault: reported and skipped (anything else is a bug)
            return {"video": None, "index": i, "error": skip_reason(exc)}


def collate_views(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``video`` float32 (B, V, T, 3, S, S) of the readable items (None if there is none), ``index`` int64 (B,)
    their clip numbers, ``failed``: ``[(clip number, reason)]`` of the others."""
    good = [item for item in items if item["error"] is None]
    return {"video": torch.stack([item["video"] for item in good]) if good else None,
            "index": torch.tensor([item["index"] for item in good], dtype=torch.int64),
            "failed": [(item["index"], item["error"]) for item in items if item["error"] is not None]}


def views_loader(dataset: VideoViews, batch_size: int, workers: int) -> DataLoader:
    """Batches of :func:`collate_views` in order, decoded in ``workers`` DataLoader worker processes."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_views, pin_memory=torch.cuda.is_available())


def clip_sampling(config_train: Dict[str, Any]) -> Tuple[str, int]:
    """``(sampling, stride)`` a model was trained with (its config's ``train`` section), as evaluation uses."""
    return config_train.get("sampling", "dense"), config_train.get("stride", 8)
