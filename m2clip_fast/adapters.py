"""Reference adapters in pure PyTorch: TEDAdapter (vision), TemporalAdapter (per-frame embeddings),
TextAdapter (text encoder).

Every op here is out of place: the official release adds into the residual stream in place
(``x_id[:, 1:, :] += x``), which breaks autograd when the input is needed for backward. These
modules are the correctness oracle for the fused kernels, so they favour clarity over speed.

Token layout shared by all vision adapters: ``x`` is (B·T, L, C) with L = 1 + h·w, the class token
first and the patch grid row-major, frames of one clip contiguous (clip b, frame t is row b·T + t).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Grid = Tuple[int, int]


def ted_param_shapes(dim: int, bottleneck: int, temporal_kernel: int = 3,
                     spatial_kernel: int = 3) -> Dict[str, Tuple[int, ...]]:
    """The shape of each of a :class:`TEDAdapter`'s 12 parameters, by state_dict key, for width C = ``dim`` and
    bottleneck r: the E branch down (r, C), depthwise temporal conv (r, 1, kt), up (C, r); the D branch the
    same with a depthwise spatial conv (r, 1, ks, ks); biases (r,) or (C,)."""
    r, c = bottleneck, dim
    return {
        "down_e.weight": (r, c), "down_e.bias": (r,), "conv_e.weight": (r, 1, temporal_kernel), "conv_e.bias": (r,),
        "up_e.weight": (c, r), "up_e.bias": (c,),
        "down_d.weight": (r, c), "down_d.bias": (r,), "conv_d.weight": (r, 1, spatial_kernel, spatial_kernel),
        "conv_d.bias": (r,), "up_d.weight": (c, r), "up_d.bias": (c,),
    }


def kernel_name(key: str) -> str:
    """The fused kernels' argument name of a state_dict key: 'down_e.weight' → 'down_e_w'."""
    module, kind = key.split(".")
    return f"{module}_{kind[0]}"


def check_kernel_params(params: Dict[str, torch.Tensor], dim: int, note: str) -> int:
    """Check the fused kernels' parameters (by :func:`kernel_name`; any subset of the 12) against
    :func:`ted_param_shapes` with kernel size 3, r read off ``down_e_w``; returns r. ``note`` ends the
    ValueError's message (what the kernel covers)."""
    r = params["down_e_w"].shape[0]
    for key, shape in ted_param_shapes(dim, r).items():
        name = kernel_name(key)
        if name in params and tuple(params[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(params[name].shape)}, expected {shape} (C = {dim}, r = {r}; "
                             f"{note})")
    return r


def token_layout(x: torch.Tensor, num_frames: int, grid: Optional[Grid] = None) -> Tuple[int, int, int, int]:
    """Validate a vision token tensor and return (B, T, h, w).

    Raises ValueError naming the problem: wrong rank, non-floating dtype, a batch that is not a
    multiple of ``num_frames``, or a patch count that is not h·w (a non-square count needs ``grid``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of tokens, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"expected tokens of shape (B*T, 1+h*w, C), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point tokens, got dtype {x.dtype}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    bt, length, _ = x.shape
    if bt % num_frames:
        raise ValueError(f"batch dimension {bt} is not a multiple of num_frames={num_frames}")
    patches = length - 1
    if grid is None:
        side = math.isqrt(max(patches, 0))
        if patches < 1 or side * side != patches:
            raise ValueError(
                f"{patches} patch tokens do not form a square grid; pass grid=(h, w) for non-square inputs"
            )
        grid = (side, side)
    h, w = grid
    if h * w != patches:
        raise ValueError(f"grid {h}x{w} = {h * w} patches, but the tokens have {patches} (L = {length})")
    return bt // num_frames, num_frames, h, w


def frame_difference(patches: torch.Tensor) -> torch.Tensor:
    """(B, T, N, C) → d with d_t = x_t − x_{t−1} and d_0 = 0 (as the official OffsetAdapter)."""
    previous = torch.cat([patches[:, :1], patches[:, :-1]], dim=1)
    return patches - previous


def temporal_conv(z: torch.Tensor, conv: nn.Conv1d, batch: int, frames: int) -> torch.Tensor:
    """Depthwise conv over T for every token: z (B·T, L, r) → (B·T, L, r)."""
    _, length, r = z.shape
    z = z.reshape(batch, frames, length, r).permute(0, 2, 3, 1).reshape(batch * length, r, frames)
    z = conv(z)
    return z.reshape(batch, length, r, frames).permute(0, 3, 1, 2).reshape(batch * frames, length, r)


class TEDAdapter(nn.Module):
    """Temporal Enhancement and Difference adapter (reference implementation).

    out = x + E(x) + [0; D(x)] where, with bottleneck r,
      E (all tokens):    down_e (C→r) → depthwise Conv1d over T (k, pad k//2) → up_e (r→C)
      D (patch tokens):  d_t = x_t − x_{t−1}, d_0 = 0 → down_d → depthwise k×k Conv2d on the h×w grid
                         (pad k//2) → up_d; the class-token row of D is zero.

    Convs start at zero, so a fresh adapter is exactly the identity. The state_dict
    (``down_e, conv_e, up_e, down_d, conv_d, up_d`` × ``weight, bias``) is shared with
    ``FusedTEDAdapter``: either loads into the other.

    Args:
        dim: token width C.
        bottleneck: r.
        num_frames: T, overridable per call.
        grid: (h, w) of the patch grid; None means square, h = w = √(L−1).
        temporal_kernel / spatial_kernel: odd kernel sizes of the E and D convs.
        enhance / difference: turn a branch off (TE-only / TD-only ablations).
    Shapes: forward(x (B·T, 1+h·w, C)) → (B·T, 1+h·w, C), same dtype.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 384,
        num_frames: int = 8,
        grid: Optional[Grid] = None,
        temporal_kernel: int = 3,
        spatial_kernel: int = 3,
        enhance: bool = True,
        difference: bool = True,
    ):
        super().__init__()
        if not (enhance or difference):
            raise ValueError("a TEDAdapter needs at least one branch (enhance or difference)")
        for name, k in (("temporal_kernel", temporal_kernel), ("spatial_kernel", spatial_kernel)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be odd and positive, got {k}")
        self.dim, self.bottleneck, self.num_frames = dim, bottleneck, num_frames
        self.grid = tuple(grid) if grid is not None else None
        self.temporal_kernel, self.spatial_kernel = temporal_kernel, spatial_kernel
        self.enhance, self.difference = enhance, difference
        if enhance:
            self.down_e = nn.Linear(dim, bottleneck)
            self.conv_e = nn.Conv1d(bottleneck, bottleneck, temporal_kernel, padding=temporal_kernel // 2,
                                    groups=bottleneck)
            self.up_e = nn.Linear(bottleneck, dim)
        if difference:
            self.down_d = nn.Linear(dim, bottleneck)
            self.conv_d = nn.Conv2d(bottleneck, bottleneck, spatial_kernel, padding=spatial_kernel // 2,
                                    groups=bottleneck)
            self.up_d = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights keep PyTorch's default init; biases and convs start at zero (identity)."""
        for name in ("down_e", "up_e", "down_d", "up_d"):
            layer = getattr(self, name, None)
            if layer is not None:
                layer.reset_parameters()
                nn.init.zeros_(layer.bias)
        for name in ("conv_e", "conv_d"):
            conv = getattr(self, name, None)
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def extra_repr(self) -> str:
        branches = "+".join(b for b, on in (("E", self.enhance), ("D", self.difference)) if on)
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, num_frames={self.num_frames}, "
                f"grid={self.grid}, branches={branches}")

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B·T, 1+h·w, C) → residual + E(x) + [0; D(x)]; ``residual`` defaults to x.

        ``residual`` lets a caller add the adapter's update to a different tensor than the one it
        reads (the model uses it to place a pre-MLP adapter inside an unmodified open_clip block).
        x (B·T, 1, C), class tokens alone (a last block whose patch outputs nobody reads): the same
        rows of the full result, residual + E(x), since the D branch writes only patch rows.
        """
        frames = num_frames or self.num_frames
        base = x if residual is None else residual
        if base.shape != x.shape:
            raise ValueError(f"residual shape {tuple(base.shape)} != input shape {tuple(x.shape)}")
        if x.dim() == 3 and x.shape[1] == 1:
            return self._class_tokens_only(x, base, frames)
        batch, frames, h, w = token_layout(x, frames, self.grid)
        update = self._enhance_update(x, batch, frames) if self.enhance else None
        if self.difference:
            n, c, r = h * w, x.shape[-1], self.bottleneck
            diff = frame_difference(x[:, 1:].reshape(batch, frames, n, c)).reshape(batch * frames, n, c)
            z = self.down_d(diff).transpose(1, 2).reshape(batch * frames, r, h, w)
            z = self.conv_d(z).reshape(batch * frames, r, n).transpose(1, 2)
            d_update = F.pad(self.up_d(z), (0, 0, 1, 0))  # zero row for the class token
            update = d_update if update is None else update + d_update
        return base + update

    def _enhance_update(self, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """The E branch: up_e(temporal conv(down_e(x))) on every row of x (B·T, L, C)."""
        return self.up_e(temporal_conv(self.down_e(x), self.conv_e, batch, frames))

    def _class_tokens_only(self, x: torch.Tensor, base: torch.Tensor, frames: int) -> torch.Tensor:
        if x.shape[0] % frames:
            raise ValueError(f"batch dimension {x.shape[0]} is not a multiple of num_frames={frames}")
        return base + self._enhance_update(x, x.shape[0] // frames, frames) if self.enhance else base


class TemporalAdapter(nn.Module):
    """Adapter over time on per-frame embeddings (the official ``t_adapter``).

    x (B·T, D) → x + up(depthwise Conv1d_T(down(x))), D→r→D, conv zero-initialised (identity).
    """

    def __init__(self, dim: int, bottleneck: int, num_frames: int, kernel_size: int = 3):
        super().__init__()
        self.num_frames = num_frames
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv1d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        for layer in (self.down, self.up, self.conv):
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        frames = num_frames or self.num_frames
        if x.dim() != 2 or x.shape[0] % frames:
            raise ValueError(f"expected (B*T, D) with T={frames}, got shape {tuple(x.shape)}")
        z = self.down(x)
        batch, r = x.shape[0] // frames, z.shape[-1]
        z = self.conv(z.reshape(batch, frames, r).transpose(1, 2)).transpose(1, 2).reshape(batch * frames, r)
        return x + self.up(z)


class TextAdapter(nn.Module):
    """x (..., D) → x + up(GELU(down(x))), default 512→384→512; biases start at zero."""

    def __init__(self, dim: int = 512, bottleneck: int = 384):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = x if residual is None else residual
        return base + self.up(F.gelu(self.down(x)))
