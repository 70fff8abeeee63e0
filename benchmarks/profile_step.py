"""Where one training step's time goes: torch.profiler over a steady k400_b16_8f step, ops grouped by kind.

    python benchmarks/profile_step.py [--variant "ours fp32"] [--threads N] [--top 25]

Builds the training-step benchmark's worker (benchmarks/test_train_step.py: same model, batch, optimizer),
runs one warm-up step (text cache, optimizer state), then profiles one step on the CPU (record_shapes) and
prints the self CPU time of every op, grouped:
  GEMMs                     mm / addmm / bmm / baddbmm (and oneDNN matmuls)
  attention                 the sdpa kernels, softmax
  layernorm/gelu/elementwise  norms, activations (QuickGELU or its SiLU form), adds, multiplies, reductions,
                            the losses' elementwise work
  adapter stencil           the C++ TED stencil and its serial copies (m2clip_fast._C, wrapped here in
                            record_function labels: the profiler cannot see into the extension otherwise)
  convolutions              conv kernels (the patch embedding; the baseline's depthwise adapter convs)
  copies                    copy_ / cat / clone / contiguous / index / permute materialisations, fill and zero
  optimizer                 everything under AdamW.step
  other                     the rest (named in the top-op list)
"Self CPU" is time on the calling thread inside the op, excluding its child ops; OpenMP worker threads
are not added up, so the groups sum to (at most) the step's wall time; the remainder is Python and
autograd bookkeeping outside any op.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

GROUPS = ("GEMMs", "attention", "layernorm/gelu/elementwise", "adapter stencil", "convolutions", "copies",
          "optimizer", "other")
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
ATTENTION = ("flash_attention", "_softmax", "aten::softmax", "_safe_softmax")
CONV = ("conv",)  # convolution, mkldnn_convolution, slow_conv3d, conv_depthwise, their backward
COPIES = ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::index", "aten::index_select",
          "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_strided", "aten::new_zeros",
          "aten::index_add_", "aten::slice_backward", "aten::select_backward", "aten::stack", "aten::_to_copy",
          "aten::gather", "aten::scatter", "aten::embedding")
ELEMENTWISE = ("layer_norm", "gelu", "sigmoid", "silu", "aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg",
               "aten::sum", "aten::mean", "aten::exp", "aten::log", "aten::pow", "aten::sqrt", "aten::rsqrt",
               "aten::norm", "linalg_vector_norm", "aten::clamp", "aten::where", "aten::max", "aten::amax",
               "nll_loss", "aten::dropout", "aten::bernoulli", "aten::masked_fill", "aten::threshold",
               "aten::linalg", "aten::argmax", "aten::topk", "aten::lt", "aten::ge", "aten::eq",
               "aten::_log_softmax", "aten::kl_div", "aten::xlogy", "aten::abs", "aten::reciprocal")
STENCIL_LABEL = "m2clip_fast._C."


def label_extension_calls() -> None:
    """Wrap m2clip_fast._C's functions in record_function labels, so their time is attributed to them and not
    left outside every profiled op (the wrapper only names the call; arguments and results pass through)."""
    from m2clip_fast import ted_cpu

    for name in ("ted_stencil_forward", "ted_stencil_backward", "copy_serial_"):
        original = getattr(ted_cpu._C, name)

        @functools.wraps(original)
        def labelled(*args, _original=original, _name=name, **kwargs):
            with record_function(STENCIL_LABEL + _name):
                return _original(*args, **kwargs)

        setattr(ted_cpu._C, name, labelled)


def _ancestors(event) -> Iterable:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def group_of(event) -> str:
    names = [event.name] + [a.name for a in _ancestors(event)]
    if any(n.startswith("Optimizer.step") for n in names):
        return "optimizer"
    if any(n.startswith(STENCIL_LABEL) for n in names):
        return "adapter stencil"
    name = event.name
    for group, keys in (("GEMMs", GEMM), ("attention", ATTENTION), ("convolutions", CONV), ("copies", COPIES),
                        ("layernorm/gelu/elementwise", ELEMENTWISE)):
        if any(name == k or (not k.startswith("aten::") and k in name) or name.startswith(k + "_") for k in keys):
            return group
    return "other"


def grouped(events) -> Tuple[Dict[str, float], List[Tuple[str, str, float, int]]]:
    """({group: self CPU s}, [(op, group, self CPU s, calls)] by time) over every profiled event."""
    by_group: Dict[str, float] = defaultdict(float)
    by_op: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        seconds = event.self_cpu_time_total / 1e6
        group = group_of(event)
        by_group[group] += seconds
        by_op[(event.name, group)][0] += seconds
        by_op[(event.name, group)][1] += 1
    ops = sorted(((n, g, s, c) for (n, g), (s, c) in by_op.items()), key=lambda t: -t[2])
    return dict(by_group), ops


def print_group_shapes(events, groups=("copies", "layernorm/gelu/elementwise"), top: int = 12) -> None:
    """The (op, input shapes) that spend most self CPU time in each of the given groups."""
    sites: Dict[Tuple[str, str], float] = defaultdict(float)
    for event in events:
        group = group_of(event)
        if group in groups:
            sites[(group, f"{event.name} {event.input_shapes}"[:100])] += event.self_cpu_time_total / 1e6
    for group in groups:
        print(f"\n{group}: top ops by input shapes, self CPU s")
        rows = sorted(((k, v) for k, v in sites.items() if k[0] == group), key=lambda kv: -kv[1])[:top]
        for (_, op), seconds in rows:
            print(f"{seconds:8.3f}  {op}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="ours fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from test_train_step import PRESET, VARIANTS, Worker

    label_extension_calls()
    worker = Worker(VARIANTS[args.variant])
    worker.step()  # warm-up: text cache, optimizer state, first touch
    steady = worker.step()["seconds"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        worker.step()
        wall = time.perf_counter() - start
    groups, ops = grouped(prof.events())
    total = sum(groups.values())
    print(f"{PRESET} training step, {args.variant}, batch {worker.video.shape[0]}, {torch.get_num_threads()} threads: "
          f"unprofiled steady step {steady:.2f} s, profiled step {wall:.2f} s")
    print(f"{'group':28s} {'self CPU s':>10s} {'% of step':>9s}")
    for group in GROUPS:
        print(f"{group:28s} {groups.get(group, 0.0):10.2f} {100 * groups.get(group, 0.0) / wall:9.1f}")
    print(f"{'outside any op (Python, autograd)':28s} {wall - total:10.2f} {100 * (wall - total) / wall:9.1f}")
    print(f"\ntop {args.top} ops by self CPU time")
    print(f"{'op':60s} {'group':28s} {'self CPU s':>10s} {'calls':>6s}")
    for name, group, seconds, calls in ops[: args.top]:
        print(f"{name[:60]:60s} {group:28s} {seconds:10.3f} {calls:6d}")
    print_group_shapes(prof.events())
    print("\ntop ops by input shapes (self CPU time)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                               max_name_column_width=40, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
