"""``python -m m2clip_fast.train``: train M²-CLIP on a video dataset (single process or torchrun/DDP).

Outputs in ``--output-dir``: ``metrics.jsonl`` (one JSON object per epoch: its evaluation, if any, and
``decode_stats``, the decoder and how its training clips were decoded), ``train_log.csv`` (one row per
optimizer step, written every train.log_every steps: see :class:`LossWindow`), TensorBoard events when
tensorboard is installed, ``skipped.jsonl`` (bad videos: file and reason), ``checkpoints/{last,best}.pt``
(written atomically), ``config.json``, ``.lock`` (one run at a time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import run_dir, runtime
from .checkpoint import (TRUST_HELP, CheckpointError, TrainingState, atomic_save, build_checkpoint, check_same_run,
                         load_weights, read_checkpoint, resume_position, run_settings, stores_whole_model,
                         whole_model_follows)
from .cli import add_data_args, int_at_least, run_main
from .data.datasets import DatasetError, annotation_root, load_samples
from .data.loader import DecodeTally, decode_stats_line
from .data.loader import batches_from, build_clip_loader, cpu_only_augment, parse_views, resolve_decoder
from .data.robust import check_bad_fraction
from .errors import UserError
from .evaluation import evaluate_loader, excluded_note, gather_skipped
from .model import M2CLIP, create_model
from .presets import PRESETS, ConfigError, parse_overrides, resolve_config
from .text import load_class_names

PRIMARY_HEAD = "fused"


class DivergedError(UserError, FloatingPointError):
    """The loss (or a weight) became NaN or infinite: the run stops before writing such a checkpoint."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--config", default=None, help="YAML file refining the preset (may name its preset)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. train.epochs=3 ted_bottleneck=64")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int_at_least(1), default=None,
                   help="with --resume, a larger value extends the run: the cosine schedule is stretched to the new "
                        "length, so the learning rate rises again")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="clips per process per step")
    p.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai) or local checkpoint; "
                                                          "default: the preset's backbone with random weights")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUTPUT/checkpoints/last.pt (or the given file), with the same configuration, "
                        "exactly where it stopped (also in the middle of an epoch, after --max-steps)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUTPUT that holds an earlier run: its checkpoints and logs are deleted")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help="stop after this many optimizer steps in all (smoke runs); the checkpoint then written "
                        "resumes exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-checkpoint", action="store_true", help=f"with --resume: {TRUST_HELP}")
    add_data_args(p, train=True)
    args = p.parse_args(argv)
    if args.preset is None and args.config is None:
        p.error("give --preset or --config")
    if not args.train_list:
        p.error("--train-list is required")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in OUTPUT, --overwrite replaces it: give one of them")
    return args


def build_config(args):
    overrides = parse_overrides(args.set)
    given = {key: getattr(args, key) for key in ("epochs", "batch_size", "workers") if getattr(args, key) is not None}
    if given and isinstance(overrides.get("train", {}), dict):  # (a train= that is no mapping: resolve_config says so)
        overrides["train"] = {**overrides.get("train", {}), **given}
    if args.class_names:
        overrides["class_names"] = args.class_names
    return resolve_config(args.preset, args.config, overrides)


NO_DECAY_RULES = {
    "1d": lambda name, p: p.ndim <= 1,  # biases and norm weights
    "bias": lambda name, p: ".bias" in name,  # the official main.py's rule (a norm's weight decays)
}


def param_groups(model: M2CLIP, lr: float, weight_decay: float, text_lr_scale: float,
                 no_decay: str = "1d") -> List[Dict[str, Any]]:
    """AdamW groups: text adapters at lr × text_lr_scale; no weight decay on the parameters ``no_decay``
    names: ``"1d"`` every 1-D tensor (biases and norms), ``"bias"`` names containing ".bias"."""
    exempt = NO_DECAY_RULES[no_decay]
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = name.startswith(("text_adapters.", "cmlm_adapter."))
        decay = not exempt(name, p)
        key = (is_text, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr * (text_lr_scale if is_text else 1.0),
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    for g in groups.values():
        g["base_lr"] = g["lr"]
    return list(groups.values())


def accumulation_steps(train: Dict[str, Any], world_size: int) -> int:
    """Micro-batches per optimizer step: ``train.accum_steps``, or with ``train.global_batch`` set,
    global_batch / (batch_size × world_size), which must be a whole number."""
    global_batch, per_step = train.get("global_batch"), train["batch_size"] * world_size
    if global_batch is None:
        return int(train["accum_steps"])
    if global_batch % per_step:
        fits = [b for b in range(1, global_batch // world_size + 1) if global_batch % (b * world_size) == 0]
        hint = (f"a train.batch_size that divides it over {world_size} process(es): {', '.join(map(str, fits))}"
                if fits else f"a train.global_batch that is a multiple of {per_step}")
        raise ConfigError(f"train.global_batch={global_batch} is not a multiple of train.batch_size="
                          f"{train['batch_size']} x {world_size} process(es) = {per_step}; use {hint}")
    return global_batch // per_step


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Per-step linear warmup from 0, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def position_text(epoch: int, batches: int, batches_per_epoch: Optional[int], epochs: int) -> str:
    """1-based, as the progress bar shows it: 'the end of epoch 2/5' or 'epoch 3/5 after batch 4/12'."""
    if batches == 0:
        return f"the end of epoch {epoch}/{epochs}"
    return f"epoch {epoch + 1}/{epochs} after batch {batches}/{batches_per_epoch or '?'}"


def interrupt_hint(progress: Dict[str, Any]) -> str:
    """What Ctrl-C tells: the last checkpoint written (or resumed from) and how to continue."""
    if "checkpoint" not in progress:
        return "no checkpoint was written yet: nothing to resume, start the run again"
    how = "the same command plus --resume"
    if progress.get("resume") not in (None, "auto") and Path(progress["resume"]) != Path(progress["checkpoint"]):
        how = f"the same command with --resume {progress['checkpoint']}"  # not the file this run started from
    elif progress.get("overwrite"):
        how += " instead of --overwrite"  # which would delete it
    return (f"the last checkpoint is {progress['checkpoint']} (step {progress['step']}, {progress['where']}); "
            f"continue from it with {how}")


# ------------------------------------------------------------------------------------------ start-up


@dataclass
class Start:
    """What the start-up decided before anything is built: the resolved config and class names, the process,
    and where the run begins (``ckpt``: the --resume checkpoint, read and checked, else None)."""

    args: argparse.Namespace
    cfg: Any
    info: runtime.DistInfo
    device: torch.device
    out: Path
    class_names: List[str]
    settings: Dict[str, Any]
    accum: int = 1  # micro-batches per optimizer step (accumulation_steps)
    ckpt: Optional[Dict[str, Any]] = None
    ckpt_path: Optional[Path] = None
    epoch: int = 0
    skip_batches: int = 0
    lock: Any = None  # run_dir.lock_output_dir's file, on the main process
    train_samples: List[Tuple[str, int]] = field(default_factory=list)
    val_samples: Optional[List[Tuple[str, int]]] = None
    dropped: List[Dict[str, str]] = field(default_factory=list)  # --skip-missing's missing files


def start(args: argparse.Namespace) -> Start:
    """Resolve and check the config, join the process group, lock and check OUTPUT, seed; with --resume, read
    the checkpoint and check that it continues this run. The lock is released when this raises."""
    cfg = build_config(args)
    info, device = runtime.init_distributed(args.device)
    out = Path(args.output_dir)
    lock = run_dir.lock_output_dir(out) if info.is_main else None
    try:
        if info.is_main:  # left by a killed run: its --overwrite half done, its checkpoint write torn
            run_dir.recover_asides(out)
            run_dir.clean_temp_files(out)
        st = _start_checks(args, cfg, info, device, out)
    except BaseException:
        run_dir.unlock_output_dir(lock)
        raise
    st.lock = lock
    return st


def _start_checks(args, cfg, info: runtime.DistInfo, device: torch.device, out: Path) -> Start:
    """The checks of :func:`start` made with OUTPUT locked; the resolved Start."""
    run_dir.check_output_dir(out, bool(args.resume), args.overwrite)
    accum = accumulation_steps(cfg.train, info.world_size)
    runtime.seed_everything(args.seed + info.rank)
    if cfg.class_names is None:
        raise DatasetError("no class names: pass --class-names FILE (one name per line, line i = label i)")
    class_names = load_class_names(cfg.class_names)
    cfg.class_names = tuple(class_names)  # as the model (and so the checkpoint) records them
    st = Start(args, cfg, info, device, out, class_names, run_settings(cfg, args.pretrained, args.seed,
                                                                       info.world_size), accum=accum)
    st.train_samples, st.val_samples, st.dropped = read_lists(args, class_names)
    # a resume at an epoch boundary would otherwise take another list silently (check_same_run compares it)
    st.settings["--train-list"] = list_fingerprint(st.train_samples, annotation_root(args.train_list, args.data_root))
    if args.resume:
        st.ckpt_path = run_dir.checkpoint_path(out) if args.resume == "auto" else Path(args.resume)
        st.ckpt = read_checkpoint(st.ckpt_path, "--resume checkpoint", training=True,
                                  trust=args.trust_checkpoint)
        check_same_run(st.ckpt, st.ckpt_path, st.settings, args.preset)
        st.epoch, st.skip_batches = resume_position(st.ckpt)
    return st


def read_lists(args: argparse.Namespace, class_names: List[str]):
    """The training and validation lists, each read and checked before either is reported (a wrong
    validation list is not found only once the training list is fixed): ``(train, val or None, dropped)``."""
    read, errors, dropped = {}, [], []
    for key, what in (("train", "training list"), ("val", "validation list")):
        path = getattr(args, f"{key}_list")
        if not path:
            continue
        try:
            read[key], missing = load_samples(path, args.data_root, class_names, train=key == "train",
                                              skip_missing=args.skip_missing, what=what)
            dropped += missing
        except DatasetError as exc:
            errors.append(exc)
    if errors:
        raise DatasetError("\n".join(str(e) for e in errors), [p for e in errors for p in e.problems])
    return read["train"], read.get("val"), dropped


def list_fingerprint(samples: List[Tuple[str, int]], root: str) -> str:
    """'N samples, sha256 …' of a list's (path relative to its root, label) pairs, in order: the same list
    read from a moved data root fingerprints the same."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode("utf-8", errors="surrogatepass"))
    return f"{len(samples)} samples, sha256 {digest.hexdigest()[:16]}"


def nothing_to_do(st: Start) -> bool:
    """Whether the resumed run is already at its end (--epochs, or --max-steps); says so."""
    epochs, step, max_steps = st.cfg.train["epochs"], st.ckpt["step"], st.args.max_steps
    if st.epoch < epochs and not (max_steps and step >= max_steps):
        return False
    if st.info.is_main:
        limit = f"epoch {st.epoch}/{epochs}" if st.epoch >= epochs else f"step {step} (--max-steps {max_steps})"
        print(f"{st.ckpt_path}: nothing to do: already at {limit}"
              + ("; pass a larger --epochs to train longer" if st.epoch >= epochs else ""))
    return True


# ------------------------------------------------------------------------------------------- the trainer


class LossWindow:
    """The optimizer steps since the last log point, kept without waiting for the device: each step's host-side
    fields (step, epoch, lr, clips/s) and its losses as one device tensor (heads,), the micro-batches' losses
    summed on the device. :meth:`rows` copies the whole window to the host at once (one sync), as one row per
    step with that step's own losses (the mean over its micro-batches), not a mean over the window."""

    def __init__(self):
        self.names: List[str] = []
        self.steps: List[Tuple[Dict[str, Any], torch.Tensor]] = []
        self.micro: Optional[torch.Tensor] = None  # (heads,) the current step's weighted sum so far

    def add(self, losses: Dict[str, torch.Tensor], weight: float) -> None:
        """One micro-batch's losses ``{name: 0-d tensor}`` (always the same names), times ``weight``."""
        self.names = list(losses)
        values = torch.stack([v.float() for v in losses.values()]) * weight
        self.micro = values if self.micro is None else self.micro + values

    def end_step(self, fields: Dict[str, Any]) -> None:
        """The optimizer step of the micro-batches added since the last call is done."""
        self.steps.append((fields, self.micro))
        self.micro = None

    def rows(self) -> List[Dict[str, Any]]:
        """The window's rows ``{**fields, name: float}``, oldest first; empties it."""
        if not self.steps:
            return []
        values = torch.stack([v for _, v in self.steps]).tolist()  # the window's one host sync
        rows = [{**fields, **dict(zip(self.names, v))} for (fields, _), v in zip(self.steps, values)]
        self.steps = []
        return rows


class Trainer:
    """The model, its loaders and optimizer, and the loop's state (``step``, ``best``, ``last_metrics``)."""

    def __init__(self, st: Start):
        args, tcfg, self.st = st.args, st.cfg.train, st
        self.tcfg, self.device, self.info, self.out = tcfg, st.device, st.info, st.out
        self.decode_stats: Dict[str, Any] = {}  # how the last epoch's training clips were decoded (DecodeTally)
        train_samples, val_samples, self.dropped = st.train_samples, st.val_samples, st.dropped
        self.whole = st.ckpt is not None and stores_whole_model(st.ckpt)
        with whole_model_follows(self.whole):  # a random backbone comes whole from the checkpoint
            self.model = create_model(st.cfg, pretrained=args.pretrained, class_names=st.class_names)
        self.amp_dtype = runtime.place_model(self.model, self.device, tcfg["amp"])
        self.decoder_choice = resolve_decoder(args.decoder, self.device, runtime.all_gather_objects,
                                              cpu_augment=cpu_only_augment(tcfg["resize"], tcfg["rand_augment"]))
        self.decoder = self.decoder_choice.name
        if self.info.is_main and self.decoder_choice.notice:
            print(self.decoder_choice.notice)
        self.train_loader, self.val_loader = self._loaders(train_samples, val_samples)
        self.num_train = len(train_samples)
        self.accum = st.accum
        self.global_batch = tcfg["batch_size"] * self.accum * self.info.world_size
        self.lr = tcfg["blr"] * self.global_batch / 256  # blr is per 256 clips of the global batch
        groups = param_groups(self.model, self.lr, tcfg["weight_decay"], tcfg["text_lr_scale"], tcfg["no_decay"])
        # fused=True: one kernel over all parameters (measured 135 ms vs 667 ms per step for K400's 16M on CPU)
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                           lr=self.lr, fused=True)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:  # (the loader has whole batches: the accumulation is what they miss)
            raise DatasetError(f"{len(train_samples)} training samples make no full optimizer step of global batch "
                               f"{self.global_batch} ({tcfg['batch_size']} per process x {self.info.world_size} "
                               f"process(es) x {self.accum} accumulation steps)")
        self.batches_per_epoch = self.steps_per_epoch * self.accum
        self.total_steps = self.steps_per_epoch * tcfg["epochs"]
        self.warmup_steps = int(round(tcfg["warmup_epochs"] * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp = runtime.distributed_model(self.model, self.device, self.info.world_size)
        self.step, self.best, self.last_metrics = 0, -1.0, {}
        self.run_info = {"preset": args.preset, "config_file": args.config, "settings": st.settings,
                         "batches_per_epoch": self.batches_per_epoch}
        self.logger: Optional[run_dir.Logger] = None
        self.aside: Optional[Path] = None  # the earlier run --overwrite replaces, until the first checkpoint
        self.nonfinite: Optional[str] = None  # this process's first non-finite loss: "loss nan at step 12 ..."
        self.window = LossWindow()  # the steps not yet logged, their losses on the device
        self.log_every = int(tcfg["log_every"])

    def _loaders(self, train_samples, val_samples):
        tcfg, per_process = self.tcfg, self.tcfg["batch_size"]
        common = dict(decoder=self.decoder, device=self.device,
                      workers=tcfg["workers"] if self.st.args.workers is None else self.st.args.workers,
                      num_frames=self.model.num_frames, size=self.model.crop_size, sampling=tcfg["sampling"],
                      stride=tcfg["stride"], seed=self.st.args.seed)
        train_loader = build_clip_loader(train_samples, train=True, batch_size=per_process, flip=tcfg["flip"],
                                         resize=tcfg["resize"], scale_range=tuple(tcfg["scale_range"]),
                                         rand_augment=tcfg["rand_augment"], **common)
        if len(train_loader) == 0:
            raise DatasetError(f"{len(train_samples)} training samples make no full batch of {per_process} per "
                               f"process")
        if not val_samples:
            return train_loader, None
        clips, crops = parse_views(tcfg["views"])
        return train_loader, build_clip_loader(val_samples, train=False, views=tcfg["views"],
                                               batch_size=max(1, per_process // (clips * crops)), **common)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Continue from a --resume checkpoint: weights, optimizer, scaler, RNG, step and best score."""
        st = self.st
        if st.skip_batches and ckpt["run"]["batches_per_epoch"] != self.batches_per_epoch:
            raise CheckpointError(
                f"--resume: the checkpoint stopped in epoch {st.epoch + 1} after batch {st.skip_batches} of "
                f"{ckpt['run']['batches_per_epoch']}, but this run has {self.batches_per_epoch} batches per epoch "
                f"(the training list changed?): that epoch can't be continued")
        load_weights(self.model, ckpt["model"], self.whole, f"--resume checkpoint {st.ckpt_path}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best, self.last_metrics = ckpt["step"], ckpt["best"], ckpt["metrics"]
        runtime.set_rng_state(ckpt["rng"][min(self.info.rank, len(ckpt["rng"]) - 1)])
        if self.info.is_main:
            print(f"resumed from {st.ckpt_path} at step {self.step}, {self.position(st.epoch, st.skip_batches)}")

    def position(self, epoch: int, batches: int) -> str:
        return position_text(epoch, batches, self.batches_per_epoch, self.tcfg["epochs"])

    def prepare_output(self) -> None:
        """Only now, with every start-up check passed, the folder changes: a start that fails (a wrong list, a
        refused checkpoint) leaves an earlier run's checkpoints and logs as they were, even with --overwrite."""
        st, out = self.st, self.out
        if self.info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if st.ckpt is not None:
                run_dir.truncate_logs(out, self.step)
            elif st.args.overwrite:  # kept until this run's first checkpoint exists (see save, undo_overwrite)
                self.aside = run_dir.set_aside(out)
                if self.aside is not None:
                    print(f"--overwrite: the earlier run is set aside in {self.aside}; it is deleted once this "
                          f"run's first checkpoint is written")
            else:
                run_dir.clear_run(out)  # logs of an earlier start that wrote no checkpoint
            if self.dropped:
                print(f"--skip-missing: dropped {len(self.dropped)} missing file(s)")
                for d in self.dropped:
                    run_dir.append_jsonl(out / "skipped.jsonl", {"epoch": None, "step": self.step, "phase": "start",
                                                                 **d})
            (out / "config.json").write_text(json.dumps({**asdict(st.cfg), "args": vars(st.args),
                                                          "global_batch": self.global_batch,
                                                          "accum_steps": self.accum, "lr": self.lr},
                                                         indent=2, default=str))
            print(f"training {self.num_train} clips, {len(st.class_names)} classes, device {self.device}, decoder "
                  f"{self.decoder_choice.description}")
            print(f"batch {self.tcfg['batch_size']} per process x {self.info.world_size} process(es) x "
                  f"{self.accum} accumulation step(s) = global batch {self.global_batch}, lr {self.lr:.2e}, "
                  f"{self.steps_per_epoch} steps/epoch")
        self.logger = run_dir.Logger(out, self.info.is_main, purge_step=self.step + 1 if st.ckpt is not None else None)

    def train_epoch(self, epoch: int, first: int) -> Tuple[int, bool]:
        """Run epoch ``epoch`` from batch ``first`` on (an interrupted run did the earlier ones); stops early at
        --max-steps. Returns ``(batches done, whether --max-steps was reached)``."""
        self.model.train()
        self.train_loader.set_epoch(epoch)
        bar = self._progress_bar(epoch, first)
        t0, clips_seen, skipped = time.perf_counter(), 0, []
        decoding = DecodeTally(self.decoder_choice.description)
        batches_done, max_steps = first, self.st.args.max_steps
        try:
            for i, batch in enumerate(batches_from(self.train_loader, first), start=first):
                if i >= self.batches_per_epoch:
                    break
                skipped.extend(batch["skipped"])
                decoding.add(batch)
                if batch["skipped"] and self.info.world_size == 1:  # (under DDP at the epoch's end, all at once)
                    self._stop_if_too_many_bad(epoch, skipped)
                final_micro = (i + 1) % self.accum == 0
                self.window.add(self._forward_backward(batch, final_micro), 1.0 / self.accum)
                clips_seen += batch["video"].shape[0] * self.info.world_size
                if not final_micro:
                    continue
                self._optimizer_step()
                batches_done = i + 1
                rate = clips_seen / (time.perf_counter() - t0)
                self.window.end_step({"step": self.step, "epoch": epoch,
                                      "lr": self.optimizer.param_groups[0]["lr"], "clips_per_s": rate})
                if bar is not None:
                    bar.update(1)
                if max_steps and self.step >= max_steps:
                    break
                if self.step % self.log_every == 0:
                    self._log_window(epoch, bar)
            self._log_window(epoch, bar)  # the epoch's last steps, before its checkpoint
        finally:
            if bar is not None:
                bar.close()
        self._report_skipped(epoch, skipped, "train")
        self.decode_stats = decoding.record(runtime.all_gather_objects)
        if self.info.is_main and decode_stats_line(self.decode_stats):
            print(f"epoch {epoch + 1}: {decode_stats_line(self.decode_stats)}")
        return batches_done, bool(max_steps and self.step >= max_steps)

    def _progress_bar(self, epoch: int, first: int):
        if not self.info.is_main or self.st.args.no_progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=first // self.accum, desc=f"epoch {epoch + 1}/"
                    f"{self.tcfg['epochs']}", dynamic_ncols=True, file=sys.stderr)

    def _forward_backward(self, batch: Dict[str, Any], final_micro: bool) -> Dict[str, torch.Tensor]:
        """One micro-batch: video (B, T, 3, H, W), labels (B,); gradients synchronised across processes only on
        the last micro-batch of an optimizer step. Returns the losses (0-d tensors, still on the device)."""
        video = batch["video"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        sync = self.ddp.no_sync() if self.ddp is not None and not final_micro else nullcontext()
        with sync:
            with runtime.autocast(self.device, self.amp_dtype):
                losses = (self.ddp or self.model)(video, labels)
            self.scaler.scale(losses["loss"] / self.accum).backward()
        return {k: v.detach() for k, v in losses.items()}

    def _optimizer_step(self) -> None:
        factor = lr_factor(self.step, self.warmup_steps, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        if self.tcfg["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _log_window(self, epoch: int, bar) -> None:
        """Copy the steps since the last log point to the host (one sync) and write their rows; a NaN/inf
        loss among them is remembered. One process stops here, before logging the bad step's row; DDP processes
        log it and stop at the agreed check before the next save (:meth:`_check_finite`). Either way the stop
        comes at a log point (every train.log_every steps, and at the epoch's end or a --max-steps stop), and
        no checkpoint is written after a bad step: every save follows a log point."""
        row = None
        for row in self.window.rows():
            if self.nonfinite is None and not math.isfinite(row["loss"]):
                self.nonfinite = f"loss {row['loss']} at step {row['step']} (epoch {epoch + 1})"
                if self.info.world_size == 1:
                    self._check_finite()
            self.logger.step(row)
        if bar is not None and row is not None:  # the bar shows one row: the newest
            bar.set_postfix(loss=f"{row['loss']:.3f}", clips_s=f"{row['clips_per_s']:.1f}")

    def _check_finite(self) -> None:
        """Before a checkpoint: every process's losses and the tuned weights finite, or a DivergedError on every
        process alike, so that no NaN checkpoint is written and the last good one stays."""
        seen = [s for s in runtime.all_gather_objects(self.nonfinite) if s is not None]
        if not seen:
            bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            seen = [f"non-finite weights ({', '.join(bad[:3])}) at step {self.step}"] if bad else []
        if not seen:
            return
        last = run_dir.checkpoint_path(self.out)
        kept = (f"the last good checkpoint {last} is kept" if last.is_file() and self.aside is None
                else "no checkpoint was written")
        raise DivergedError(f"training diverged: {seen[0]}; {kept}. A learning rate too high (train.blr="
                            f"{self.tcfg['blr']:g}, lr {self.lr:.3g})? Try a lower train.blr or train.grad_clip")

    def _report_skipped(self, epoch: int, skipped: List[Dict[str, Any]], phase: str) -> None:
        bad = gather_skipped(skipped)
        if self.info.is_main:
            run_dir.record_skipped(self.out, epoch, self.step, bad, phase)
        if phase == "train":
            check_bad_fraction(bad, self.num_train, self.tcfg["max_bad_fraction"],
                               f"training videos met in epoch {epoch + 1}")

    def _stop_if_too_many_bad(self, epoch: int, skipped: List[Dict[str, Any]]) -> None:
        """Mid-epoch, one process: report the unreadable videos and stop once they pass train.max_bad_fraction."""
        bad = {s["path"]: s["reason"] for s in skipped}
        if len(bad) > self.tcfg["max_bad_fraction"] * self.num_train:
            self._report_skipped(epoch, skipped, "train")

    def validate(self, epoch: int) -> None:
        """Score the validation list; the record goes to metrics.jsonl and becomes ``last_metrics``."""
        metrics, bad = evaluate_loader(self.model, self.val_loader, self.device, self.amp_dtype)
        record = {"epoch": epoch, "step": self.step, "top1": metrics[f"top1_{PRIMARY_HEAD}"],
                  "top5": metrics[f"top5_{PRIMARY_HEAD}"], **metrics, "decode_stats": self.decode_stats}
        self.last_metrics = record
        self._report_skipped(epoch, bad, "val")
        if self.info.is_main:
            run_dir.append_jsonl(self.out / "metrics.jsonl", record)
            self.logger.eval(record)
            heads = ", ".join(f"{h} {metrics[f'top1_{h}']:.1f}" for h in ("vc", "text", "fused"))
            note = excluded_note(metrics)
            print(f"epoch {epoch + 1}: top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}% ({heads})"
                  + (f"; {note}" if note else ""))

    def record_decoding(self, epoch: int) -> None:
        """metrics.jsonl's record of an epoch without evaluation: how its training clips were decoded."""
        if self.info.is_main:
            run_dir.append_jsonl(self.out / "metrics.jsonl",
                                 {"epoch": epoch, "step": self.step, "decode_stats": self.decode_stats})

    def save(self, epoch: int, batches_done: int) -> None:
        """checkpoints/last.pt (and best.pt when the validation score improved), written by the main process
        with every process's RNG state."""
        self._check_finite()
        rngs = runtime.all_gather_objects(runtime.rng_state())
        epoch_done = batches_done >= self.batches_per_epoch
        # an evaluation after a --max-steps stop in the middle of an epoch is recorded, but is no candidate for
        # best.pt: it scored a model the epoch's schedule had not finished with
        score = self.last_metrics.get("top1", -1.0) if self.val_loader is not None and epoch_done else -1.0
        if self.info.is_main:
            state = TrainingState(
                optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch,
                batches_done=batches_done, epoch_done=epoch_done, step=self.step,
                rng=rngs, best=max(self.best, score), metrics=self.last_metrics, run=self.run_info)
            ckpt = build_checkpoint(self.model, self.st.args.pretrained, state)
            atomic_save(ckpt, run_dir.checkpoint_path(self.out, "last"))
            if self.val_loader is not None and score > self.best:
                atomic_save(ckpt, run_dir.checkpoint_path(self.out, "best"))
            run_dir.drop_aside(self.aside)
            self.aside = None
        self.best = max(self.best, score)

    def undo_overwrite(self) -> None:
        """The run failed before its first checkpoint: the earlier run --overwrite set aside comes back."""
        if self.aside is None:
            return
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        run_dir.restore_aside(self.out, self.aside)
        print(f"--overwrite: this run stopped before its first checkpoint; the earlier run in {self.out} is "
              f"restored", file=sys.stderr)
        self.aside = None

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        runtime.barrier()


# -------------------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace, progress: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The training run ``args`` describe; returns the last evaluation's record. ``progress`` (a dict, if
    given) is kept up to date with the last checkpoint, for the Ctrl-C message."""
    progress = {} if progress is None else progress
    progress.update(resume=args.resume, overwrite=args.overwrite)
    st = start(args)
    try:
        return _train(st, progress)
    finally:
        run_dir.unlock_output_dir(st.lock)


def _train(st: Start, progress: Dict[str, Any]) -> Dict[str, Any]:
    epochs = st.cfg.train["epochs"]
    if st.ckpt is not None:
        where = position_text(st.epoch, st.skip_batches, st.ckpt["run"]["batches_per_epoch"], epochs)
        progress.update(checkpoint=st.ckpt_path, step=st.ckpt["step"], where=where)
        if nothing_to_do(st):
            return st.ckpt["metrics"]
    trainer = Trainer(st)
    if st.ckpt is not None:
        trainer.restore(st.ckpt)
    try:
        trainer.prepare_output()
        _epochs(trainer, st, progress)
    except BaseException:
        if st.info.is_main:
            trainer.undo_overwrite()
        raise
    trainer.close()
    return trainer.last_metrics


def _epochs(trainer: Trainer, st: Start, progress: Dict[str, Any]) -> None:
    epochs = st.cfg.train["epochs"]
    for epoch in range(st.epoch, epochs):
        batches_done, stop = trainer.train_epoch(epoch, st.skip_batches if epoch == st.epoch else 0)
        last = epoch == epochs - 1 or stop
        if trainer.val_loader is not None and ((epoch + 1) % st.cfg.train["eval_every"] == 0 or last):
            trainer.validate(epoch)
        else:
            trainer.record_decoding(epoch)
        trainer.save(epoch, batches_done)
        epoch_done = batches_done >= trainer.batches_per_epoch
        progress.update(checkpoint=run_dir.checkpoint_path(st.out), step=trainer.step,
                        where=trainer.position(epoch + epoch_done, 0 if epoch_done else batches_done))
        if stop:
            break


def main(argv=None) -> int:
    progress: Dict[str, Any] = {}

    def run() -> int:
        args = parse_args(argv)
        try:
            train(args, progress)
        finally:
            runtime.shutdown_distributed()
        return 0

    return run_main(run, "python -m m2clip_fast.train", on_interrupt=lambda: interrupt_hint(progress))


if __name__ == "__main__":
    sys.exit(main())
