"""benchmarks/limits.py: the benchmarks' FLOP counts against hand counts (CPU attention included)."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from limits import count_flops  # noqa: E402


def test_linear_forward_and_backward_counted_by_hand():
    rows, cin, cout = 40, 16, 24
    layer = torch.nn.Linear(cin, cout)
    x = torch.randn(rows, cin, requires_grad=True)
    counted = count_flops(lambda: layer(x).sum().backward())
    gemm = 2 * rows * cin * cout  # one multiply-add per (row, in, out); forward, dX and dW are one GEMM each
    assert counted.total == 3 * gemm
    assert counted.gemm_share == 1.0


def test_cpu_sdpa_counted_forward_and_backward():
    b, h, length, d = 2, 3, 20, 8
    q = torch.randn(b, h, length, d, requires_grad=True)
    counted = count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    forward = 2 * (2 * b * h * length * length * d)  # Q·Kᵀ and P·V
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu"] == forward
    # backward: dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q (PyTorch's formula: 2.5x the forward)
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * forward // 2
    assert counted.gemm_share == 0.0



def test_depthwise_conv_backward_counted_by_hand():
    """A depthwise (groups = channels) conv: one multiply-add per output element and tap, forward; its
    backward computes the input's and the weight's gradient, each the same work (not C times it)."""
    n, c, length, k = 3, 12, 10, 3
    conv = torch.nn.Conv1d(c, c, k, padding=1, groups=c)
    x = torch.randn(n, c, length, requires_grad=True)
    counted = count_flops(lambda: conv(x).sum().backward())
    forward = 2 * n * c * length * k
    assert counted.by_op["convolution"] == forward
    assert counted.by_op["convolution_backward"] == 2 * forward
    frozen_input = torch.randn(n, c, length)  # no input gradient asked for: the weight's only
    assert count_flops(lambda: conv(frozen_input).sum().backward()).by_op["convolution_backward"] == forward
