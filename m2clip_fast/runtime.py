"""The process a command runs in: torch.distributed set-up and teardown, the cross-process gathers,
seeding and RNG state, and precision (autocast, backbone dtype)."""
from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .errors import UsageError

# ------------------------------------------------------------------------------------------ distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed() -> bool:
    """Whether torch.distributed has a process group."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device_arg: str) -> Tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU) and pick the device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:  # before the process group, so that NCCL's communicator is created on this rank's GPU
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", **({"device_id": device} if use_cuda else {}))
    return info, device


def distributed_model(model, device: torch.device, world_size: int):
    """``model`` (an M2CLIP) in DistributedDataParallel when ``world_size`` > 1, else None. DDP is told to look
    for parameters without a gradient exactly when the configuration built has some (a zero-weight head, the
    class-token-only last block's D branch: ``model.unused_parameters()``); otherwise it would wait for their
    gradients and fail at the next step ("Expected to have finished reduction in the prior iteration")."""
    if world_size <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(model.unused_parameters()))


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every process, in rank order (``[obj]`` when not distributed)."""
    if not distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherRows(torch.autograd.Function):
    """All processes' x (equal shapes) concatenated along dim 0; backward sums every process's
    gradient of the whole result and keeps this process's rows. all_reduce rather than
    reduce_scatter, which gloo (CPU) lacks; torch.distributed.nn's all_gather is deprecated."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (world·B, ...): x of all processes concatenated (differentiable); x itself when not
    distributed.

    Every process then computes the same global loss; the gather's backward sums the gradients
    of each process's own rows, and DDP's average turns that into the single-process gradient."""
    if not distributed() or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


# ------------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """The state of every global generator this process draws from (python, numpy, torch, CUDA), as
    tensors and plain Python values only, so that a checkpoint holding it loads with ``weights_only=True``."""
    state = {"python": random.getstate(), "numpy": numpy_state(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_state(legacy: tuple) -> Dict[str, Any]:
    """numpy's legacy ``get_state()`` tuple ``('MT19937', uint32 (624,), pos, has_gauss, cached_gaussian)``
    as a dict whose key words are an int64 (624,) tensor."""
    name, words, pos, has_gauss, cached = legacy
    return {"name": str(name), "words": torch.from_numpy(np.asarray(words, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["words"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------- precision


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' → bf16 on CUDA, none on CPU; 'bf16' / 'fp16' / 'none' as named (fp16 only on CUDA)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in ("none", "fp32", None):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UsageError("fp16 autocast needs CUDA; use amp=bf16 on CPU")
        return torch.float16
    raise UsageError(f"unknown amp {amp!r}; expected auto, none, bf16 or fp16")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def place_model(model, device: torch.device, amp: str):
    """Move ``model`` to ``device`` and return its autocast dtype (None: fp32). On CUDA under autocast the
    frozen backbone is stored in that half precision (the tuned weights keep their fp32 masters); on the
    CPU the backbone stays fp32, as autocast there casts per op anyway."""
    model.to(device)
    amp_dtype = resolve_amp(amp, device)
    if device.type == "cuda" and amp_dtype is not None:
        model.set_backbone_dtype(amp_dtype)
    return amp_dtype
