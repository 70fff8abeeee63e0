"""Data layer: annotation readers, frame samplers, sparse video decoding, clip transforms and the
DataLoader for Kinetics-400, Something-Something-V2, UCF101 and HMDB51.

DALI support (:mod:`.dali`, :mod:`.dali_loader`) imports NVIDIA DALI only when used, and the torchcodec
backend (:mod:`.torchcodec_backend`) torchcodec, so the package works without either.
"""
from .datasets import (
    DatasetError,
    Sample,
    check_samples,
    read_class_names,
    read_hmdb51,
    read_kinetics_csv,
    read_list_file,
    read_ssv2_json,
    read_ucf101,
)
from .decode import DecodeStats, VideoIndex, clear_index_cache, decode_all_frames, get_index, num_frames, process_stats
from .errors import VideoDecodeError
from .frames import decode_frames, decode_sampled
from .loader import ClipLoader, DecodeTally, VideoClipDataset, build_loader, collate, decode_stats_line
from .sampling import dense_indices, sample_indices, uniform_indices
from .transforms import CLIP_MEAN, CLIP_STD, test_transform, train_transform

__all__ = [
    "DatasetError",
    "Sample",
    "check_samples",
    "read_class_names",
    "read_hmdb51",
    "read_kinetics_csv",
    "read_list_file",
    "read_ssv2_json",
    "read_ucf101",
    "DecodeStats",
    "VideoDecodeError",
    "VideoIndex",
    "clear_index_cache",
    "decode_all_frames",
    "decode_frames",
    "decode_sampled",
    "get_index",
    "num_frames",
    "process_stats",
    "ClipLoader",
    "DecodeTally",
    "decode_stats_line",
    "VideoClipDataset",
    "build_loader",
    "collate",
    "dense_indices",
    "sample_indices",
    "uniform_indices",
    "CLIP_MEAN",
    "CLIP_STD",
    "test_transform",
    "train_transform",
]
