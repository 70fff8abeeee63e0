"""What a checkpoint holds, in one place: :func:`build_checkpoint` writes it, :func:`read_checkpoint` reads
it (upgrading older formats), :func:`atomic_save` stores it; plus what decides whether ``train --resume``
may continue from it (the run settings, the backbone file it was trained on, the position in the run).

Layout (``format_version`` 2), one flat dict:

* model: ``config`` (M2CLIPConfig as a dict), ``class_names``, ``pretrained`` (open_clip tag, absolute
  path of a local file, or None for a random backbone), ``pretrained_size`` (bytes of that local file),
  ``model`` (the tuned weights; every weight when ``pretrained`` is None);
* training (only in ``train``'s checkpoints): the fields of :class:`TrainingState`.

Every piece is a tensor or a plain Python value, so checkpoints load with ``weights_only=True``: loading
one runs no code from the file. Files without ``format_version`` are version 1 (written before it existed);
:func:`_upgrade_v1` fills in what its variants lack, so that nothing else in the package probes for keys.
Version-1 training checkpoints pickle numpy's RNG state, so they load only in full: ``python -m
m2clip_fast.checkpoint upgrade OLD NEW --trust-checkpoint`` rewrites one as version 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .errors import UserError
from .runtime import numpy_state

FORMAT_VERSION = 2


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable, of another kind, or that does not fit the run."""


@dataclass
class TrainingState:
    """What ``train`` needs besides the model to continue exactly where it stopped.

    ``epoch``: the epoch (0-based) the checkpoint was written in; ``batches_done`` of its batches were run,
    ``epoch_done`` tells whether that was all of them. ``rng``: one :func:`runtime.rng_state` per process.
    ``best``: the best validation top-1 so far (-1 without validation); ``metrics``: the last evaluation's
    record; ``run``: ``preset``, ``config_file``, ``settings`` (:func:`run_settings`), ``batches_per_epoch``.
    """

    optimizer: Dict[str, Any]
    scaler: Dict[str, Any]
    epoch: int
    batches_done: int
    epoch_done: bool
    step: int
    rng: List[Dict[str, Any]]
    best: float
    metrics: Dict[str, Any]
    run: Dict[str, Any]


TRAINING_KEYS = tuple(f.name for f in fields(TrainingState))

# ------------------------------------------------------------------------------------------------ writing


def backbone_source(pretrained: Optional[str]) -> Optional[str]:
    """``pretrained`` as a checkpoint stores it: a local file as its absolute path (so the checkpoint
    works from any directory), an open_clip tag or None unchanged."""
    if pretrained is not None and Path(pretrained).is_file():
        return os.path.abspath(pretrained)
    return pretrained


def build_checkpoint(model, pretrained: Optional[str], training: Optional[TrainingState] = None) -> Dict[str, Any]:
    """The checkpoint of ``model`` built on backbone ``pretrained`` (and of a training run's ``training``).

    A randomly initialised backbone (pretrained=None) cannot be re-created, so its weights are stored too.
    A local backbone file is stored as its absolute path and its size, which :func:`checkpoint_backbone`
    compares to notice a replaced file.
    """
    state = model.state_dict() if pretrained is None else model.tunable_state_dict()
    source = backbone_source(pretrained)
    size = os.path.getsize(source) if source is not None and Path(source).is_file() else None
    ckpt = {"format_version": FORMAT_VERSION, "config": asdict(model.config), "class_names": model.class_names,
            "pretrained": source, "pretrained_size": size,
            "model": {k: v.detach().cpu() for k, v in state.items()}}
    if training is not None:
        ckpt.update(asdict(training))
    return ckpt


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file.

    The file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask), not
    mkstemp's private 0o600, so others in a shared group can read checkpoints.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = _full_disk(exc)
        if full is not None:
            kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint was there"
            raise CheckpointError(f"{full} while writing {path}; {kept}") from exc
        raise


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for the file-size limit"}


def _full_disk(exc: BaseException) -> Optional[str]:
    """What a failed write says, when it failed for want of space: torch.save's zip writer reports only
    "[enforce fail at inline_container.cc] unexpected pos", with the OSError (ENOSPC, EDQUOT, EFBIG) that
    caused it as its context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return _FULL[exc.errno]
        exc = exc.__cause__ or exc.__context__
    return None


# ------------------------------------------------------------------------------------------------ reading


# The globals an official m2clip checkpoint holds besides tensors and containers: its training arguments.
SAFE_GLOBALS = (argparse.Namespace,)

TRUST_HELP = ("unpickle checkpoint files in full instead of loading only tensors and plain values: DANGEROUS, a "
              "checkpoint can then run any code on this machine; only for files you trust (e.g. to upgrade one "
              "written by an earlier m2clip-fast)")

UPGRADE_COMMAND = "python -m m2clip_fast.checkpoint upgrade OLD NEW --trust-checkpoint"


def load_checkpoint_file(path: Union[str, Path], what: str = "checkpoint", map_location: Any = "cpu",
                         trust: bool = False) -> Any:
    """torch.load of a file we expect to be a checkpoint, with errors that say what is wrong with it.

    Loads with ``weights_only=True`` (tensors, containers, plain values and :data:`SAFE_GLOBALS`: no code in
    the file runs); a file that needs any other global is refused, naming it. ``trust`` (the commands'
    --trust-checkpoint) unpickles it in full instead, which runs whatever code the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsupported_global(str(exc))
        if unsafe is None:
            raise _unreadable(path, what, exc) from exc
        raise CheckpointError(
            f"{what} {path} needs {unsafe} to load, which a checkpoint loaded safely may not hold (unpickling it "
            f"could run code). A checkpoint of an earlier m2clip-fast: convert it once with {UPGRADE_COMMAND}; a "
            f"file you trust otherwise: pass --trust-checkpoint") from None
    except Exception as exc:  # the unpickler fails on junk with KeyError, EOFError, RuntimeError, ...
        raise _unreadable(path, what, exc) from exc


def _unsupported_global(message: str) -> Optional[str]:
    """The global torch's weights-only unpickler refused (named in its message), or None for other errors."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return match.group(1) if match else None


def _unreadable(path: Path, what: str, exc: BaseException) -> CheckpointError:
    text = str(exc).strip()
    first = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, or another kind of "
                           f"file?): {first}")


def read_checkpoint(path: Union[str, Path], what: str = "checkpoint", *, training: bool = False,
                    map_location: Any = "cpu", trust: bool = False) -> Dict[str, Any]:
    """The checkpoint at ``path`` in the current layout (see the module docstring). ``training``: it must
    hold a training run's state (for ``train --resume``), not just a model. ``trust``: see
    :func:`load_checkpoint_file`."""
    path = Path(path)
    ckpt = load_checkpoint_file(path, what, map_location=map_location, trust=trust)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an m2clip-fast checkpoint (no 'config'/'model' entries)")
    version = ckpt.get("format_version", 1)
    if version == 1:
        _upgrade_v1(ckpt)
    elif version != FORMAT_VERSION:
        raise CheckpointError(f"{what} {path} has format_version {version}; this m2clip-fast reads versions 1 to "
                              f"{FORMAT_VERSION}: upgrade m2clip-fast")
    if training:
        lacking = [k for k in TRAINING_KEYS if k not in ckpt]
        if lacking:
            raise CheckpointError(f"--resume: {path} is not a checkpoint of m2clip_fast.train (it lacks "
                                  f"{', '.join(lacking)}): --resume continues a training run from its "
                                  f"checkpoints/last.pt")
    return ckpt


def _upgrade_v1(ckpt: Dict[str, Any]) -> None:
    """Version 1 in place → version 2. Its variants lack the backbone size and, in training checkpoints,
    the position in the epoch (they were written at an epoch's end, or at a --max-steps stop whose epoch the
    code that wrote them did not finish either: both continue at the next epoch), the run settings (then
    compared as the flattened config and backbone source) and the last metrics."""
    ckpt.setdefault("pretrained_size", None)
    if "optimizer" in ckpt:
        for state in ckpt.get("rng", []):
            if isinstance(state.get("numpy"), tuple):  # numpy's own tuple, pickled with its ndarray
                state["numpy"] = numpy_state(state["numpy"])
        ckpt.setdefault("metrics", {})
        ckpt.setdefault("batches_done", 0)
        ckpt.setdefault("epoch_done", True)
        run = ckpt.setdefault("run", {})
        run.setdefault("batches_per_epoch", None)
        if "settings" not in run:
            old = json.loads(json.dumps(ckpt["config"], default=str))
            old.update({f"train.{k}": v for k, v in old.pop("train", {}).items()})
            run["settings"] = {**old, "--pretrained": ckpt["pretrained"]}
    ckpt["format_version"] = FORMAT_VERSION


# ------------------------------------------------------------------------------------- rebuilding the model


def checkpoint_backbone(ckpt: Dict[str, Any], pretrained: Optional[str] = None) -> Optional[str]:
    """The backbone weights to build a checkpoint's model on: ``pretrained`` when given (the user's
    override), else the checkpoint's own source. A stored local file must still exist (else a
    CheckpointError naming --pretrained); a size that changed since training is warned about."""
    if pretrained is not None:
        return pretrained
    source = ckpt["pretrained"]
    if source is None or not _looks_like_file(source, ckpt):
        return source
    if not Path(source).is_file():
        raise CheckpointError(f"the checkpoint's backbone weights file {source} was not found; pass --pretrained "
                              f"with the file's new location")
    size = ckpt["pretrained_size"]
    if size is not None and os.path.getsize(source) != size:
        print(f"warning: backbone weights file {source} is {os.path.getsize(source)} bytes, but was {size} bytes "
              f"when the checkpoint was written: replaced by another file? (the frozen backbone is not in the "
              f"checkpoint)", file=sys.stderr)
    return source


def _looks_like_file(pretrained: str, ckpt: Dict[str, Any]) -> bool:
    # open_clip tags are bare words ("openai", "laion2b_s34b_b79k"); a stored size or a path shape means a file
    return (ckpt["pretrained_size"] is not None or os.sep in pretrained or "/" in pretrained
            or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))


def stores_whole_model(ckpt: Dict[str, Any]) -> bool:
    """Whether the checkpoint holds every weight (its backbone was random, so it cannot be re-created)."""
    return ckpt["pretrained"] is None


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def whole_model_follows(whole: bool = True):
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building a model
    whose every weight is loaded from a checkpoint next (``whole``: a random backbone is stored whole);
    with ``whole`` False, nothing is silenced."""
    if not whole:
        yield
        return
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)  # open_clip logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(quiet)


def check_weights(model, weights: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights whose shapes differ from the model's (load_state_dict's "size mismatch" RuntimeError
    otherwise) or that hold NaN/inf (a diverged run: training from it, or evaluating it, gives nothing)."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: {len(wrong)} weight(s) of another shape than the model's: "
                              f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''} (another config?)")
    nonfinite = [k for k, v in weights.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                 and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{where}: {len(nonfinite)} weight(s) hold NaN or inf ({', '.join(nonfinite[:3])}): "
                              f"written by a run that diverged")


def load_weights(model, weights: Dict[str, torch.Tensor], whole: bool, where: str) -> None:
    """Load a checkpoint's weights into ``model``. ``whole`` (a checkpoint of a random backbone): every key of
    the model is required; else every tuned parameter is. Keys the model doesn't have are always an error."""
    check_weights(model, weights, where)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    required = set(missing) if whole else {n for n, p in model.named_parameters() if p.requires_grad} & set(missing)
    if unexpected or required:
        kind = "weights" if whole else "tuned weights"
        raise CheckpointError(f"{where}: checkpoint does not match the model ({len(required)} missing {kind} "
                              f"{sorted(required)[:5]}, {len(unexpected)} unexpected {sorted(unexpected)[:5]})")


def load_model_checkpoint(path: Union[str, Path], map_location="cpu", pretrained: Optional[str] = None,
                          trust: bool = False, **overrides):
    """Rebuild an M2CLIP from a checkpoint written by ``train`` (or ``convert``). ``pretrained`` replaces the
    checkpoint's backbone source (e.g. when its weights file moved); ``trust``: see :func:`load_checkpoint_file`.
    Returns ``(model, checkpoint dict)``."""
    from .model import create_model
    from .presets import M2CLIPConfig

    ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
    config = M2CLIPConfig(**{k: tuple(v) if k == "templates" else v for k, v in ckpt["config"].items()})
    source = checkpoint_backbone(ckpt, pretrained)
    whole = stores_whole_model(ckpt)
    with whole_model_follows(whole):
        model = create_model(config, pretrained=source, class_names=ckpt["class_names"], **overrides)
    load_weights(model, ckpt["model"], whole, str(path))
    return model, ckpt


# ------------------------------------------------------------------------------------------- resuming

# Keys a resumed run may change: they leave the meaning of the checkpoint's state intact (fused and attention
# pick kernels for the same weights; more epochs extend the schedule; the rest is loading and evaluation).
RESUMABLE_KEYS = frozenset({"fused", "attention", "train.epochs", "train.workers", "train.eval_every",
                            "train.views", "train.max_bad_fraction", "train.log_every"})
# Training keys added after checkpoints were first written, each with the value that reproduces what runs did
# before it existed: a checkpoint that doesn't record one was trained with this value, and is compared so.
LEGACY_TRAIN_SETTINGS: Dict[str, Any] = {
    "train.global_batch": None, "train.no_decay": "1d", "train.resize": "short_side_jitter",
    "train.scale_range": [1.0, 1.15], "train.rand_augment": None,
}


def run_settings(cfg, pretrained: Optional[str], seed: int, processes: int) -> Dict[str, Any]:
    """What a resumed run must share with its checkpoint: every config key (``train.*`` flattened), the
    backbone source, the seed and the number of processes; plain lists, so that it compares with a loaded one."""
    config = asdict(cfg)
    flat = {k: v for k, v in config.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in config["train"].items()})
    flat.update({"--pretrained": backbone_source(pretrained), "--seed": seed, "processes": processes})
    return json.loads(json.dumps(flat, default=str))  # tuples → lists, as a checkpoint round-trip gives


def check_same_run(ckpt: Dict[str, Any], path: Path, settings: Dict[str, Any], preset: Optional[str]) -> None:
    """Raise, listing every difference, when the checkpoint was trained with other settings (keys an older
    checkpoint doesn't record are compared with their :data:`LEGACY_TRAIN_SETTINGS` value, or not at all)."""
    run = ckpt["run"]
    old = {**LEGACY_TRAIN_SETTINGS, **run["settings"]}
    keys = sorted(k for k in settings if k in old and k not in RESUMABLE_KEYS and old[k] != settings[k])
    if "--pretrained" in keys and same_backbone_file(old["--pretrained"], settings["--pretrained"], ckpt):
        keys.remove("--pretrained")
    if not keys:
        return
    lines = "".join(f"\n  {k}: {_short(old[k])} in the checkpoint, {_short(settings[k])} now" for k in keys)
    was = run.get("preset")  # absent in version-1 checkpoints of the oldest kind
    presets = f" (and preset {was} then, {preset} now)" if "preset" in run and was != preset else ""
    raise CheckpointError(f"--resume: {path} was trained with other settings{presets}; {len(keys)} difference(s):"
                          f"{lines}\nresume with the checkpoint's settings, or start a new run (another "
                          f"--output-dir, or --overwrite)")


def same_backbone_file(recorded: Optional[str], given: Optional[str], ckpt: Dict[str, Any]) -> bool:
    """Whether ``--pretrained given`` (absolute, as :func:`backbone_source` gives it) is the local
    backbone file the checkpoint recorded as ``recorded``, though the paths differ: an older checkpoint's
    relative path that names it from here, or the same file moved (same name, and the size recorded)."""
    if not recorded or not given or not os.path.isfile(given):
        return False
    if os.path.isfile(recorded):
        return os.path.samefile(recorded, given)  # also a relative path (checkpoints before absolute paths)
    size = ckpt["pretrained_size"]
    return size is not None and Path(recorded).name == Path(given).name and os.path.getsize(given) == size


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str):
        return text  # a path in full: its end is what tells two apart
    return text if len(text) <= 60 else text[:57] + "..."


def resume_position(ckpt: Dict[str, Any]) -> Tuple[int, int]:
    """``(epoch, batches)``: the epoch to run next (0-based) and how many of its batches are already done.
    A checkpoint written in the middle of an epoch (--max-steps) continues that epoch."""
    if ckpt["epoch_done"]:
        return ckpt["epoch"] + 1, 0
    return ckpt["epoch"], ckpt["batches_done"]


# ------------------------------------------------------------------------------------------- the command


def upgrade(old: Union[str, Path], new: Union[str, Path], trust: bool) -> Dict[str, Any]:
    """Rewrite checkpoint ``old`` (any version; a version-1 one needs ``trust``) as a version-2 file ``new``
    that loads with ``weights_only=True``. Returns the checkpoint written."""
    ckpt = read_checkpoint(old, "checkpoint", trust=trust)
    atomic_save(ckpt, Path(new))
    return ckpt


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import run_main

    p = argparse.ArgumentParser(prog="python -m m2clip_fast.checkpoint",
                                description="Checkpoint tools. upgrade: rewrite a checkpoint of an earlier "
                                            "m2clip-fast in the current format (safe to load)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="OLD → NEW in the current format")
    up.add_argument("old")
    up.add_argument("new")
    up.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = p.parse_args(argv)

    def run() -> int:
        ckpt = upgrade(args.old, args.new, args.trust_checkpoint)
        print(f"wrote {args.new} (format_version {ckpt['format_version']})")
        return 0

    return run_main(run, "python -m m2clip_fast.checkpoint")


if __name__ == "__main__":
    sys.exit(main())
