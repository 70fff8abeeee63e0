"""m2clip-fast: a fast, dependable M²-CLIP for video action recognition.

Public API (kept stable): create_model, M2CLIP, M2CLIPConfig, TEDAdapter, FusedTEDAdapter, TextAdapter,
TemporalAdapter.
"""
from .adapters import TEDAdapter, TemporalAdapter, TextAdapter
from .model import M2CLIP, create_model
from .presets import PRESETS, M2CLIPConfig, resolve_config

__version__ = "0.1.0"

__all__ = ["create_model", "M2CLIP", "M2CLIPConfig", "PRESETS", "resolve_config", "TEDAdapter",
           "FusedTEDAdapter", "TextAdapter", "TemporalAdapter"]


def __getattr__(name):
    # The fused adapter pulls in the kernels and the C++ extension: load it only when asked for.
    if name == "FusedTEDAdapter":
        from .fused import FusedTEDAdapter
        return FusedTEDAdapter
    raise AttributeError(f"module 'm2clip_fast' has no attribute {name!r}")
