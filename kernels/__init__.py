"""Triton kernels, installed as ``m2clip_fast.kernels``. Import submodules explicitly
(``from m2clip_fast.kernels import ted``): importing this package alone must not import triton,
whose interpreter-vs-compiler choice is fixed by TRITON_INTERPRET at its first import."""
