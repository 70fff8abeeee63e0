"""``python -m m2clip_fast.export``: a checkpoint's inference graph as ONNX (and, optionally, a torch.export .pt2).

``--checkpoint F --out model.onnx [--frames T] [--batch B]`` exports ``video`` float32 (batch, T, 3, S, S), CLIP-
normalised frames, to the class probabilities ``fused``, ``vc`` and ``text`` (batch, C) of the checkpoint's
classes; the class text embeddings are computed once and folded in as a constant, and the TED adapters are the
pure-PyTorch reference ones (the Triton / C++ kernels are not ONNX operators; the weights are the same). The
batch axis is dynamic. The file is then run with onnxruntime on random input and compared with the PyTorch model
(``model.predict``, fused kernels and all): the largest difference per output is printed, and the export fails
if one exceeds ``--tolerance``.

Zero-shot needs the text side: ``--text-out text.onnx`` exports the text encoder, token ids int64 (N, 77) → unit
embeddings (N, D). Tokenising (open_clip's BPE, ``model.prompts``) and the prompt ensemble (mean over templates,
renormalised) stay outside the graph: the tokenizer is Python string processing, not a tensor program.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import TRUST_HELP, load_model_checkpoint
from .cli import int_at_least, run_main
from .errors import UsageError, UserError

PROG = "python -m m2clip_fast.export"
OUTPUTS = ("fused", "vc", "text")
# ONNX's protobuf holds at most 2 GiB: larger models keep their weights in PATH.data beside the graph
ONE_FILE_LIMIT = 1_800_000_000
TOLERANCE = 1e-4  # probabilities: float32 graphs that differ only in operator order agree to ~1e-7


class ExportCheckError(UserError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance asked for."""


class VideoClassifier(nn.Module):
    """video float32 (B, T, 3, S, S) → (fused, vc, text) class probabilities, each (B, C), with the class text
    embeddings (C, D) a constant buffer: ``model.predict`` without the text side."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("class_text", model.encode_text().float().detach().clone())

    def forward(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frames, pooled = self.model.encode_frames(video)
        text = self.model._similarity_logits(frames.mean(dim=1), self.class_text).softmax(dim=-1)
        vc = self.model.vc_head(pooled).float().softmax(dim=-1)
        return 0.5 * (text + vc), vc, text


class TextEncoder(nn.Module):
    """token ids int64 (N, L) → unit-norm text embeddings (N, D): frozen text blocks, text adapters, end-of-text
    pooling and projection, one prompt per row (``model.encode_text`` of one template, before ensembling)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        hidden = m._adapted_text(m._text_blocks(m._embed_tokens(tokens), 0, m.frozen_text_layers))
        return F.normalize(m._project_text(hidden, tokens), dim=-1)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_names: Tuple[str, ...], pt2: Optional[Path] = None) -> None:
    """torch.export ``module`` with a dynamic first axis, write it as ONNX to ``path`` (and the exported program
    to ``pt2``)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    for target in (path, pt2):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
    if pt2 is not None:
        torch.export.save(program, str(pt2))
    quiet = logging.getLogger("onnxscript")  # its optimizer logs notes on constant folding it skipped
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        torch.onnx.export(program, (example,), str(path), input_names=[input_name], output_names=list(output_names),
                          dynamo=True, verbose=False, external_data=_weight_bytes(module) > ONE_FILE_LIMIT)
    finally:
        quiet.setLevel(level)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def onnx_outputs(path: Path, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def check_video_graph(path: Path, model, frames: int, size: int, batches: Tuple[int, ...], seed: int = 0):
    """``{output: largest |onnx - model.predict|}`` over random videos of each batch size in ``batches``."""
    worst = dict.fromkeys(OUTPUTS, 0.0)
    generator = torch.Generator().manual_seed(seed)
    for b in batches:
        video = torch.randn(b, frames, 3, size, size, generator=generator)
        expected = model.predict(video)
        for name, got in zip(OUTPUTS, onnx_outputs(path, {"video": video.numpy()})):
            worst[name] = max(worst[name], float(np.abs(got - expected[name].numpy()).max()))
    return worst


def check_text_graph(path: Path, model) -> float:
    """Largest |onnx - model.encode_text| over the checkpoint's class prompts, template by template."""
    worst = 0.0
    for template in model.config.templates:
        tokens = model.prompts(model.class_names, template).tokens
        (got,) = onnx_outputs(path, {"tokens": tokens.numpy()})
        worst = max(worst, float(np.abs(got - model.encode_text(templates=[template]).numpy()).max()))
    return worst


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by m2clip_fast.train or convert")
    p.add_argument("--pretrained", default=None, help="backbone weights instead of the checkpoint's own source")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--out", required=True, help="the video graph's .onnx file")
    p.add_argument("--frames", type=int_at_least(1), default=None,
                   help="frames per clip T (default: the checkpoint's; the adapters' weights do not depend on T)")
    p.add_argument("--size", type=int_at_least(1), default=None,
                   help="frame size S; must be the backbone's (its positional embedding is fixed)")
    p.add_argument("--batch", type=int_at_least(1), default=2, help="batch of the example input and the check "
                                                                         "(the batch axis stays dynamic)")
    p.add_argument("--text-out", default=None, help="also export the text encoder (tokens → embeddings) here")
    p.add_argument("--pt2", default=None, help="also save the torch.export program (.pt2) of the video graph")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest allowed |onnx - pytorch| per probability (default {TOLERANCE:g})")
    return p.parse_args(argv)


def export(args: argparse.Namespace) -> Dict[str, float]:
    """Write the files asked for and return the checks' largest differences."""
    overrides = {} if args.frames is None else {"num_frames": args.frames}
    source = {"pretrained": args.pretrained, "trust": args.trust_checkpoint, **overrides}
    model, _ = load_model_checkpoint(Path(args.checkpoint), **source)
    size = model.crop_size
    if args.size is not None and args.size != size:
        raise UsageError(f"--size {args.size}: this backbone takes {size}px frames (its positional embedding has a "
                         f"fixed number of patches)")
    # the graph is traced from the reference adapters; the check compares it with the model as it runs here
    reference, _ = load_model_checkpoint(Path(args.checkpoint), fused=False, **source)
    model.eval(), reference.eval()
    frames = model.num_frames
    example = torch.randn(args.batch, frames, 3, size, size)
    start = time.perf_counter()
    export_onnx(VideoClassifier(reference), example, Path(args.out), "video", OUTPUTS,
                Path(args.pt2) if args.pt2 else None)
    result = {f"max_abs_diff_{k}": v for k, v in
              check_video_graph(Path(args.out), model, frames, size, (args.batch, args.batch + 1)).items()}
    if args.text_out:
        tokens = reference.prompts(reference.class_names, reference.config.templates[0]).tokens
        export_onnx(TextEncoder(reference), tokens, Path(args.text_out), "tokens", ("text_embedding",))
        result["max_abs_diff_text_encoder"] = check_text_graph(Path(args.text_out), model)
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: Optional[List[str]] = None) -> int:
    def run() -> int:
        args = parse_args(argv)
        with torch.no_grad():
            result = export(args)
        print(f"wrote {args.out}" + (f", {args.text_out}" if args.text_out else "")
              + (f", {args.pt2}" if args.pt2 else "") + f" in {result.pop('seconds'):.1f} s")
        print(f"onnxruntime vs PyTorch (model.predict) on random input, largest |difference| (tolerance "
              f"{args.tolerance:g}):")
        for name, value in result.items():
            print(f"  {name[len('max_abs_diff_'):]:<13} {value:.3g}")
        over = {k: v for k, v in result.items() if not v <= args.tolerance}
        if over:
            raise ExportCheckError(f"the exported graph differs from PyTorch beyond --tolerance {args.tolerance:g}: "
                             f"{', '.join(f'{k[13:]} {v:.3g}' for k, v in over.items())}")
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
