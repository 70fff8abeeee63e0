"""Build script: the pure-Python package, the Triton kernels (top-level ``kernels/`` installed as
``m2clip_fast.kernels``) and the optional C++ extension ``m2clip_fast._C``.

The extension is optional by design: when it cannot be compiled (no compiler, no torch headers)
the package still installs and ``FusedTEDAdapter`` falls back to the reference path.
Set ``M2CLIP_NO_EXT=1`` to skip it.
"""
import glob
import os
import sys

from setuptools import setup, find_packages

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("M2CLIP_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(
            CppExtension(
                "m2clip_fast._C",
                sources,
                extra_compile_args=["-O3", "-march=x86-64-v2", *openmp] if "x86" in os.uname().machine
                else ["-O3", *openmp],
                extra_link_args=openmp,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
    except ImportError:  # torch not importable at build time: ship without the extension
        print("m2clip-fast: torch not found at build time, building without m2clip_fast._C")

packages = find_packages(include=["m2clip_fast", "m2clip_fast.*"]) + ["m2clip_fast.kernels"]

setup(
    name="m2clip-fast",
    version="0.1.0",
    description="Fast, dependable M2-CLIP (multimodal multi-task CLIP adapters for video action recognition)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"m2clip_fast.kernels": "kernels"},
    package_data={"m2clip_fast": ["assets/*.txt", "assets/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "open_clip_torch>=2.24",
        "av>=17",  # VideoReformatter.reformat(threads=) (m2clip_fast.data.decode)
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",  # the demo's training-curve PNG, predict's timelines, the evaluation report's confusion matrix
        "pillow",  # predict --annotate draws labels on frames
        "safetensors",  # extract's embedding shards
        "timm",  # RandAugment for clips (m2clip_fast.data.randaugment); open_clip depends on it as well
    ],
    extras_require={
        # DALI's build for the pinned torch's CUDA 13 (a CUDA 12 torch wants nvidia-dali-cuda120 instead). It is in
        # the test extra so that CI runs its CPU (VP9) tests; it ships x86-64 / aarch64 Linux wheels only.
        # torchcodec too (--decoder torchcodec); it needs FFmpeg's shared libraries, which scripts/install.sh
        # installs with apt-get where they are missing
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "tensorboard", "onnx", "onnxruntime",
                 "onnxscript", "torchcodec",
                 "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'"],
        "dali": ["nvidia-dali-cuda130"],
        "torchcodec": ["torchcodec"],
        # python -m m2clip_fast.export: torch's ONNX exporter needs onnx and onnxscript, the check onnxruntime
        "export": ["onnx", "onnxruntime", "onnxscript"],
        "xformers": ["xformers"],
        "train": ["matplotlib", "tensorboard"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
