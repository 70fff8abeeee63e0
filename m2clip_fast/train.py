"""``python -m m2clip_fast.train``: train M²-CLIP on a video dataset (single process or torchrun/DDP).

Outputs in ``--output-dir``: ``metrics.jsonl`` (one JSON object per epoch: its evaluation, if any, and
``decode_stats``, how its training clips were decoded), ``train_log.csv`` (one row per
optimizer step), TensorBoard events when tensorboard is installed, ``skipped.jsonl`` (bad videos: file and
reason), ``checkpoints/{last,best}.pt`` (written atomically), ``config.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import engine
from .cli import load_checkpoint_file, run_main
from .data import DatasetError, DecodeTally, decode_stats_line
from .model import M2CLIP, create_model
from .presets import PRESETS, parse_overrides, resolve_config
from .text import load_class_names

PRIMARY_HEAD = "fused"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--config", default=None, help="YAML file refining the preset (may name its preset)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. train.epochs=3 ted_bottleneck=64")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=engine.positive_int, default=None,
                   help="with --resume, a larger value extends the run: the cosine schedule is stretched to the new "
                        "length, so the learning rate rises again")
    p.add_argument("--batch-size", type=engine.positive_int, default=None, help="clips per process per step")
    p.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai) or local checkpoint; "
                                                          "default: the preset's backbone with random weights")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUTPUT/checkpoints/last.pt (or the given file), with the same configuration, "
                        "exactly where it stopped (also in the middle of an epoch, after --max-steps)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUTPUT that holds an earlier run: its checkpoints and logs are deleted")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=engine.positive_int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); the checkpoint then written "
                        "resumes exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine.add_data_args(p, train=True)
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
    train = overrides.setdefault("train", {})
    for key in ("epochs", "batch_size", "workers"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if args.class_names:
        overrides["class_names"] = args.class_names
    return resolve_config(args.preset, args.config, overrides)


def param_groups(model: M2CLIP, lr: float, weight_decay: float, text_lr_scale: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms (1-D tensors); text adapters at lr × text_lr_scale."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = name.startswith(("text_adapters.", "cmlm_adapter."))
        decay = p.ndim > 1
        key = (is_text, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr * (text_lr_scale if is_text else 1.0),
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    for g in groups.values():
        g["base_lr"] = g["lr"]
    return list(groups.values())


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Per-step linear warmup from 0, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Logger:
    """CSV + optional TensorBoard on the main process. ``purge_step``: on a resume, TensorBoard hides the
    events an interrupted run logged from that step on (train_log.csv is truncated by :func:`truncate_logs`)."""

    def __init__(self, out: Path, enabled: bool, purge_step: Optional[int] = None):
        self.enabled, self.out = enabled, out
        self.csv = None
        self.tb = None
        if not enabled:
            return
        self._csv_file = open(out / "train_log.csv", "a", newline="", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
        except ImportError:
            pass

    def step(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.csv is None:
            self.csv = csv.DictWriter(self._csv_file, fieldnames=list(record))
            if self._csv_file.tell() == 0:
                self.csv.writeheader()
        self.csv.writerow({k: record.get(k) for k in self.csv.fieldnames})
        self._csv_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def eval(self, record: Dict[str, float]) -> None:
        if self.enabled and self.tb is not None:
            for k, v in record.items():
                if k.startswith("top"):
                    self.tb.add_scalar(f"val/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._csv_file.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------------------------------- the output folder

RUN_LOGS = ("train_log.csv", "metrics.jsonl", "skipped.jsonl")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a fresh run into an OUTPUT holding checkpoints needs --overwrite."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {out} is a file, not a folder")
    earlier = [p for p in (out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt") if p.is_file()]
    if earlier and not resume and not overwrite:
        raise FileExistsError(f"{out} already holds a run ({earlier[0]}): pass --resume to continue it, --overwrite "
                              f"to replace it, or choose another --output-dir")


def run_outputs(out: Path) -> List[Path]:
    """What a run accumulates in ``out`` besides config.json (which every start rewrites): its checkpoints,
    logs and TensorBoard events."""
    return ([out / "checkpoints" / name for name in ("last.pt", "best.pt")] + [out / name for name in RUN_LOGS]
            + sorted((out / "tensorboard").glob("events.out.tfevents.*")))


def delete_files(paths: List[Path]) -> List[Path]:
    """Delete those of ``paths`` that exist as files; returns them."""
    removed = [p for p in paths if p.is_file()]
    for p in removed:
        p.unlink()
    return removed


def clear_run(out: Path) -> List[Path]:
    """Delete what an earlier run wrote to ``out`` (checkpoints, logs, TensorBoard events, config.json);
    returns what went."""
    return delete_files(run_outputs(out) + [out / "config.json"])


def truncate_logs(out: Path, step: int) -> None:
    """Before resuming from step ``step``: drop the log rows of later steps (an interrupted run logged them, and
    they are run again), so every step is logged once. skipped.jsonl also loses its start-up records, which
    every start writes afresh. Lines torn by a crash (cut short, NUL-filled, not UTF-8) are dropped too."""
    def keep_csv(n: int, line: str, header: List[str]) -> bool:
        if n == 0 or "step" not in header:
            return True  # the header, or a file this code didn't write: left alone
        fields = line.split(",")
        if len(fields) != len(header):
            return False  # a row cut short by the interruption
        try:
            return int(fields[header.index("step")]) <= step
        except ValueError:
            return False

    def keep_json(n: int, line: str, header: List[str]) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False  # a line torn by the interruption
        if not isinstance(record, dict):
            return False
        return record.get("phase") != "start" and (record.get("step") is None or record["step"] <= step)

    _keep_lines(out / "train_log.csv", keep_csv)
    for name in ("metrics.jsonl", "skipped.jsonl"):
        _keep_lines(out / name, keep_json)


def _keep_lines(path: Path, keep: Callable[[int, str, List[str]], bool]) -> None:
    """Rewrite ``path`` (atomically) with the lines ``keep(number, line, header fields)`` accepts; also when
    its last line lacks its newline, so that the next appended record starts a line of its own."""
    if not path.is_file():
        return
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip("\x00 \t\r\n")]
    header = lines[0].split(",") if lines else []
    kept = [line for n, line in enumerate(lines) if keep(n, line, header)]
    if len(kept) == len(lines) == len(text.splitlines()) and (not text or text.endswith("\n")):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def report_skipped(out: Path, epoch: int, step: int, skipped: List[Dict[str, Any]], is_main: bool,
                   phase: str = "train") -> int:
    """Gather bad videos from every rank, print them, append them to skipped.jsonl (``phase``: "train" videos
    were replaced by other samples, "val" videos were left out of the accuracy)."""
    unique: Dict[str, str] = {}
    for part in engine.all_gather_objects(skipped):
        for s in part:
            unique.setdefault(s["path"], s["reason"])
    if is_main and unique:
        fate = "replaced by other samples" if phase == "train" else "excluded from the validation accuracy"
        print(f"epoch {epoch + 1}: {len(unique)} unreadable video(s) {fate}:")
        for path, reason in sorted(unique.items()):
            print(f"  {path}: {reason}")
            engine.append_jsonl(out / "skipped.jsonl", {"epoch": epoch, "step": step, "phase": phase, "path": path,
                                                        "reason": reason})
    return len(unique)


# ------------------------------------------------------------------------------------------------- resume

# Keys a resumed run may change: they leave the meaning of the checkpoint's state intact (fused and attention
# pick kernels for the same weights; more epochs extend the schedule; the rest is loading and evaluation).
RESUMABLE_KEYS = frozenset({"fused", "attention", "train.epochs", "train.workers", "train.eval_every",
                            "train.views"})


def run_settings(cfg, pretrained: Optional[str], seed: int, processes: int) -> Dict[str, Any]:
    """What a resumed run must share with its checkpoint: every config key (``train.*`` flattened), the
    backbone source, the seed and the number of processes; plain lists, so that it compares with a loaded one."""
    config = asdict(cfg)
    flat = {k: v for k, v in config.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in config["train"].items()})
    flat.update({"--pretrained": engine.backbone_source(pretrained), "--seed": seed, "processes": processes})
    return json.loads(json.dumps(flat, default=str))  # tuples → lists, as a checkpoint round-trip gives


def check_same_run(state: Dict[str, Any], path: Path, settings: Dict[str, Any], preset: Optional[str]) -> None:
    """Raise, listing every difference, when the checkpoint was trained with other settings (keys an older
    checkpoint doesn't record are not compared)."""
    run = state.get("run", {})
    old = run.get("settings") or {**json.loads(json.dumps(state["config"], default=str)),
                                  "--pretrained": state.get("pretrained")}
    if "settings" not in run:  # older checkpoints: flatten their config
        old.update({f"train.{k}": v for k, v in old.pop("train", {}).items()})
    keys = sorted(k for k in settings if k in old and k not in RESUMABLE_KEYS and old[k] != settings[k])
    if "--pretrained" in keys and same_backbone_file(old["--pretrained"], settings["--pretrained"], state):
        keys.remove("--pretrained")
    if not keys:
        return
    lines = "".join(f"\n  {k}: {_short(old[k])} in the checkpoint, {_short(settings[k])} now" for k in keys)
    was = run.get("preset")
    presets = f" (and preset {was} then, {preset} now)" if "preset" in run and was != preset else ""
    raise ValueError(f"--resume: {path} was trained with other settings{presets}; {len(keys)} difference(s):"
                     f"{lines}\nresume with the checkpoint's settings, or start a new run (another --output-dir, "
                     f"or --overwrite)")


def same_backbone_file(recorded: Optional[str], given: Optional[str], state: Dict[str, Any]) -> bool:
    """Whether ``--pretrained given`` (absolute, as :func:`engine.backbone_source` gives it) is the local
    backbone file the checkpoint recorded as ``recorded``, though the paths differ: an older checkpoint's
    relative path that names it from here, or the same file moved (same name, and the size recorded)."""
    if not recorded or not given or not os.path.isfile(given):
        return False
    if os.path.isfile(recorded):
        return os.path.samefile(recorded, given)  # also a relative path (checkpoints before absolute paths)
    size = state.get("pretrained_size")
    return size is not None and Path(recorded).name == Path(given).name and os.path.getsize(given) == size


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str):
        return text  # a path in full: its end is what tells two apart
    return text if len(text) <= 60 else text[:57] + "..."


TRAINING_KEYS = ("config", "model", "optimizer", "scaler", "epoch", "step", "rng", "best")


def check_training_checkpoint(state: Any, path: Path) -> None:
    """A --resume checkpoint must hold a training run's state, not just a model (evaluate's or convert's)."""
    lacking = [k for k in TRAINING_KEYS if k not in state] if isinstance(state, dict) else list(TRAINING_KEYS)
    if lacking:
        raise ValueError(f"--resume: {path} is not a checkpoint of m2clip_fast.train (it lacks "
                         f"{', '.join(lacking)}): --resume continues a training run from its checkpoints/last.pt")


def resume_position(state: Dict[str, Any]) -> Tuple[int, int]:
    """``(epoch, batches)``: the epoch to run next (0-based) and how many of its batches are already done.
    A checkpoint written in the middle of an epoch (--max-steps) continues that epoch. Older checkpoints,
    without ``epoch_done``, continue at the next epoch, as the code that wrote them did (they were written at
    an epoch's end, or at a --max-steps stop whose epoch that code did not finish either)."""
    if state.get("epoch_done", True):
        return state["epoch"] + 1, 0
    return state["epoch"], state["batches_done"]


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


# -------------------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace, progress: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The training run ``args`` describe; returns the last evaluation's record. ``progress`` (a dict, if
    given) is kept up to date with the last checkpoint, for the Ctrl-C message."""
    progress = {} if progress is None else progress
    progress.update(resume=args.resume, overwrite=args.overwrite)
    cfg = build_config(args)
    tcfg = cfg.train
    info, device = engine.init_distributed(args.device)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    check_output_dir(out, bool(args.resume), args.overwrite)
    engine.seed_everything(args.seed + info.rank)

    class_names = load_class_names(cfg.class_names) if cfg.class_names is not None else None
    if class_names is None:
        raise DatasetError("no class names: pass --class-names FILE (one name per line, line i = label i)")
    cfg.class_names = tuple(class_names)  # as the model (and so the checkpoint) records them
    settings = run_settings(cfg, args.pretrained, args.seed, info.world_size)
    state, start_epoch, skip_batches = None, 0, 0
    if args.resume:
        path = ckpt_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
        state = load_checkpoint_file(path, "--resume checkpoint")
        check_training_checkpoint(state, path)
        check_same_run(state, path, settings, args.preset)
        start_epoch, skip_batches = resume_position(state)
        per_epoch = state.get("run", {}).get("batches_per_epoch")
        where = position_text(start_epoch, skip_batches, per_epoch, tcfg["epochs"])
        progress.update(checkpoint=path, step=state["step"], where=where)
        if start_epoch >= tcfg["epochs"] or (args.max_steps and state["step"] >= args.max_steps):
            if info.is_main:
                limit = f"epoch {start_epoch}/{tcfg['epochs']}" if start_epoch >= tcfg["epochs"] else \
                    f"step {state['step']} (--max-steps {args.max_steps})"
                print(f"{path}: nothing to do: already at {limit}" +
                      ("; pass a larger --epochs to train longer" if start_epoch >= tcfg["epochs"] else ""))
            return state.get("metrics", {})

    train_samples, dropped = engine.load_samples(args.train_list, args.data_root, class_names, train=True,
                                                 skip_missing=args.skip_missing, what="training list")
    val_samples = None
    if args.val_list:
        val_samples, dropped_val = engine.load_samples(args.val_list, args.data_root, class_names, train=False,
                                                       skip_missing=args.skip_missing, what="validation list")
        dropped += dropped_val
    step = state["step"] if state is not None else 0

    whole = state is not None and state["pretrained"] is None  # a random backbone comes whole from the checkpoint
    with engine.whole_model_follows(whole):
        model = create_model(cfg, pretrained=args.pretrained, class_names=class_names).to(device)
    amp_dtype = engine.resolve_amp(tcfg["amp"], device)
    if device.type == "cuda" and amp_dtype is not None:
        model.set_backbone_dtype(amp_dtype)  # frozen weights in half precision; adapters keep fp32 masters
    decoder = engine.resolve_decoder(args.decoder, device)
    workers = tcfg["workers"] if args.workers is None else args.workers
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    common = dict(decoder=decoder, device=device, workers=workers, num_frames=model.num_frames, size=size,
                  sampling=tcfg["sampling"], stride=tcfg["stride"], seed=args.seed)
    per_process = tcfg["batch_size"]
    train_loader = engine.build_clip_loader(train_samples, train=True, batch_size=per_process, flip=tcfg["flip"],
                                            **common)
    if len(train_loader) == 0:
        raise DatasetError(f"{len(train_samples)} training samples make no full batch of {per_process} per process")
    val_loader = None
    if val_samples:
        clips, crops = engine.parse_views(tcfg["views"])
        val_loader = engine.build_clip_loader(val_samples, train=False, views=tcfg["views"],
                                              batch_size=max(1, per_process // (clips * crops)), **common)

    accum = int(tcfg["accum_steps"])
    global_batch = per_process * accum * info.world_size
    lr = tcfg["blr"] * global_batch / 256
    groups = param_groups(model, lr, tcfg["weight_decay"], tcfg["text_lr_scale"])
    # fused=True: one kernel over all parameters (measured 135 ms vs 667 ms per step for K400's 16M on CPU)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, fused=True)
    steps_per_epoch = len(train_loader) // accum
    batches_per_epoch = steps_per_epoch * accum
    total_steps = steps_per_epoch * tcfg["epochs"]
    warmup_steps = int(round(tcfg["warmup_epochs"] * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=bool(model.unused_parameters())) \
        if info.world_size > 1 else None
    net = ddp or model

    best = -1.0
    if state is not None:
        if skip_batches and state.get("run", {}).get("batches_per_epoch") != batches_per_epoch:
            raise ValueError(f"--resume: the checkpoint stopped in epoch {start_epoch + 1} after batch {skip_batches} "
                             f"of {state['run'].get('batches_per_epoch')}, but this run has {batches_per_epoch} "
                             f"batches per epoch (the training list changed?): that epoch can't be continued")
        engine.load_weights(model, state["model"], whole, f"--resume checkpoint {path}")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        best = state["best"]
        engine.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        if info.is_main:
            where = position_text(start_epoch, skip_batches, batches_per_epoch, tcfg["epochs"])
            print(f"resumed from {path} at step {step}, {where}")
    run_info = {"preset": args.preset, "config_file": args.config, "settings": settings,
                "batches_per_epoch": batches_per_epoch}
    if info.is_main:
        # Only now, with every start-up check passed, the folder changes: a start that fails (a wrong list, a
        # refused checkpoint) leaves an earlier run's checkpoints and logs as they were, even with --overwrite.
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            truncate_logs(out, step)
        else:
            removed = clear_run(out)  # a fresh run: nothing of an earlier one (checkpointed or not) is kept
            if removed and args.overwrite:
                print(f"--overwrite: deleted the earlier run's {len(removed)} file(s) in {out}")
        if dropped:
            print(f"--skip-missing: dropped {len(dropped)} missing file(s)")
            for d in dropped:
                engine.append_jsonl(out / "skipped.jsonl", {"epoch": None, "step": step, "phase": "start", **d})
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "args": vars(args),
                                                      "global_batch": global_batch, "lr": lr}, indent=2, default=str))
        print(f"training {len(train_samples)} clips, {len(class_names)} classes, {info.world_size} process(es), "
              f"global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch, device {device}, "
              f"decoder {decoder}")

    logger = Logger(out, info.is_main, purge_step=step + 1 if state is not None else None)
    last_metrics: Dict[str, Any] = state.get("metrics", {}) if state is not None else {}
    done = False
    for epoch in range(start_epoch, tcfg["epochs"]):
        model.train()
        train_loader.set_epoch(epoch)
        first = skip_batches if epoch == start_epoch else 0  # batches an interrupted run already did
        skipped: List[Dict[str, Any]] = []
        decoding = DecodeTally()
        bar = None
        if info.is_main and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=steps_per_epoch, initial=first // accum, desc=f"epoch {epoch + 1}/{tcfg['epochs']}",
                       dynamic_ncols=True, file=sys.stderr)
        t0, clips_seen = time.perf_counter(), 0
        running: Dict[str, float] = {}
        batches_done = first
        for i, batch in enumerate(engine.batches_from(train_loader, first), start=first):
            if i >= batches_per_epoch:
                break
            skipped.extend(batch["skipped"])
            decoding.add(batch)
            video = batch["video"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            final_micro = (i + 1) % accum == 0
            sync = ddp.no_sync() if ddp is not None and not final_micro else engine.nullcontext()
            with sync:
                with engine.autocast(device, amp_dtype):
                    losses = net(video, labels)
                scaler.scale(losses["loss"] / accum).backward()
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / accum
            clips_seen += video.shape[0] * info.world_size
            if not final_micro:
                continue
            factor = lr_factor(step, warmup_steps, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            if tcfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batches_done = i + 1
            rate = clips_seen / (time.perf_counter() - t0)
            logger.step({"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "clips_per_s": rate,
                         **running})
            if bar is not None:
                bar.set_postfix(loss=f"{running['loss']:.3f}", clips_s=f"{rate:.1f}")
                bar.update(1)
            running = {}
            if args.max_steps and step >= args.max_steps:
                done = True
                break
        if bar is not None:
            bar.close()
        report_skipped(out, epoch, step, skipped, info.is_main)
        decode_stats = decoding.record(engine.all_gather_objects)
        if info.is_main and decode_stats_line(decode_stats):
            print(f"epoch {epoch + 1}: {decode_stats_line(decode_stats)}")
        epoch_done = batches_done >= batches_per_epoch

        is_last = epoch == tcfg["epochs"] - 1 or done
        if val_loader is not None and ((epoch + 1) % tcfg["eval_every"] == 0 or is_last):
            metrics, bad = engine.evaluate_loader(model, val_loader, device, amp_dtype)
            record = {"epoch": epoch, "step": step, "top1": metrics[f"top1_{PRIMARY_HEAD}"],
                      "top5": metrics[f"top5_{PRIMARY_HEAD}"], **metrics, "decode_stats": decode_stats}
            last_metrics = record
            report_skipped(out, epoch, step, bad, info.is_main, phase="val")
            if info.is_main:
                engine.append_jsonl(out / "metrics.jsonl", record)
                logger.eval(record)
                heads = ", ".join(f"{h} {metrics[f'top1_{h}']:.1f}" for h in ("vc", "text", "fused"))
                note = engine.excluded_note(metrics)
                print(f"epoch {epoch + 1}: top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}% ({heads})"
                      + (f"; {note}" if note else ""))
        elif info.is_main:  # no evaluation this epoch: the decoding record stands alone
            engine.append_jsonl(out / "metrics.jsonl", {"epoch": epoch, "step": step, "decode_stats": decode_stats})
        rngs = engine.all_gather_objects(engine.rng_state())
        score = last_metrics.get("top1", -1.0) if val_loader is not None else -1.0
        if info.is_main:
            ckpt = {**engine.model_checkpoint(model, args.pretrained), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                    "epoch_done": epoch_done, "step": step, "rng": rngs, "best": max(best, score),
                    "metrics": last_metrics, "run": run_info}
            engine.atomic_save(ckpt, ckpt_dir / "last.pt")
            if val_loader is not None and score > best:
                engine.atomic_save(ckpt, ckpt_dir / "best.pt")
        best = max(best, score)
        progress.update(checkpoint=ckpt_dir / "last.pt", step=step,
                        where=position_text(epoch + epoch_done, 0 if epoch_done else batches_done, batches_per_epoch,
                                            tcfg["epochs"]))
        if done:
            break
    logger.close()
    if info.world_size > 1:
        dist.barrier()
    return last_metrics


def main(argv=None) -> int:
    progress: Dict[str, Any] = {}

    def run() -> int:
        args = parse_args(argv)
        try:
            train(args, progress)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return 0

    return run_main(run, "python -m m2clip_fast.train", on_interrupt=lambda: interrupt_hint(progress))


if __name__ == "__main__":
    sys.exit(main())
