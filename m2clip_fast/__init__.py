"""m2clip-fast: a fast, dependable M²-CLIP for video action recognition."""
__version__ = "0.1.0"
