"""A training run's output folder through its life: one run at a time (``.lock``), refusing to mix two runs,
replacing an earlier one (--overwrite sets it aside until the new run's first checkpoint exists), cutting logs
back to a resumed checkpoint, and the records a run appends to it.

Files: ``train_log.csv`` (one row per optimizer step) and TensorBoard events (:class:`Logger`),
``metrics.jsonl`` (one JSON object per evaluation), ``skipped.jsonl`` (bad videos: file and reason),
``checkpoints/{last,best}.pt``, ``config.json``.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional

from .errors import UserError

RUN_LOGS = ("train_log.csv", "metrics.jsonl", "skipped.jsonl")


class RunDirError(UserError, FileExistsError):
    """An --output-dir that cannot hold this run (a file, or an earlier run without --resume/--overwrite)."""


def checkpoint_path(out: Path, name: str = "last") -> Path:
    return out / "checkpoints" / f"{name}.pt"


def _require_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file, not a folder")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a fresh run into an OUTPUT holding checkpoints needs --overwrite."""
    _require_folder(out)
    earlier = [p for p in (checkpoint_path(out, "last"), checkpoint_path(out, "best")) if p.is_file()]
    if earlier and not resume and not overwrite:
        raise RunDirError(f"{out} already holds a run ({earlier[0]}): pass --resume to continue it, --overwrite "
                          f"to replace it, or choose another --output-dir")


# ------------------------------------------------------------------------------------------ one run at a time

LOCK_NAME = ".lock"


def lock_output_dir(out: Path) -> IO[str]:
    """Hold ``OUTPUT/.lock`` (an fcntl lock, with this process's pid and host written in it) for the run's life;
    returns the open file, which :func:`unlock_output_dir` releases (exiting, even killed, releases it too).

    A second run into the same folder fails here with one line naming the holder. A .lock left by a run that
    died holds no fcntl lock any more and is taken over; on a filesystem without fcntl locks, the recorded
    pid decides (alive on this host: in use).
    """
    _require_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write to --output-dir {out}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.seek(0)
        holder = f.read().strip()
        if exc.errno in (errno.EAGAIN, errno.EACCES) or _holder_alive(holder):
            f.close()
            raise RunDirError(f"{out} is in use by another run ({holder or 'holder unknown'}): wait for it to end, "
                              f"or choose another --output-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _holder_alive(holder: str) -> bool:
    """Whether a .lock's ``pid N on HOST`` names a live process of this host (other hosts: assumed alive)."""
    parts = holder.split()
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    if parts[3] != socket.gethostname():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unlock_output_dir(lock: Optional[IO[str]]) -> None:
    """Release :func:`lock_output_dir`'s lock. The file stays: removing it would let a waiting run lock a file
    that a third one then replaces."""
    if lock is not None and not lock.closed:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


def clean_temp_files(out: Path) -> List[Path]:
    """Delete the temporary files of checkpoint writes a killed run left (``checkpoints/.last.pt.*.tmp``: a
    torn partial checkpoint each, never read); call with the lock held, so that no other run writes them."""
    leftovers = sorted((out / "checkpoints").glob(".*.pt.*.tmp")) if (out / "checkpoints").is_dir() else []
    size = sum(p.stat().st_size for p in leftovers)
    delete_files(leftovers)
    if leftovers:
        print(f"removed {len(leftovers)} temporary file(s) of interrupted checkpoint writes ({size / 1e6:.1f} MB) "
              f"from {out / 'checkpoints'}")
    return leftovers


def run_outputs(out: Path) -> List[Path]:
    """What a run accumulates in ``out`` besides config.json (which every start rewrites): its checkpoints,
    logs and TensorBoard events."""
    return ([checkpoint_path(out, name) for name in ("last", "best")] + [out / name for name in RUN_LOGS]
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


# --overwrite: the earlier run goes to OUTPUT/.previous-run-<time>/ (same relative paths), and is deleted only
# once the new run wrote its first checkpoint; a new run that fails before that gets it back.
ASIDE_PREFIX = ".previous-run-"


def set_aside(out: Path) -> Optional[Path]:
    """Move an earlier run's files into a fresh ``OUTPUT/.previous-run-<time>/``; None when there were none."""
    files = [p for p in run_outputs(out) + [out / "config.json"] if p.is_file()]
    if not files:
        return None
    aside = out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for p in files:
        target = aside / p.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    return aside


def restore_aside(out: Path, aside: Path) -> None:
    """Undo :func:`set_aside`: what the new run wrote goes, the earlier run's files come back."""
    clear_run(out)
    for p in sorted(q for q in aside.rglob("*") if q.is_file()):
        target = out / p.relative_to(aside)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    shutil.rmtree(aside)


def drop_aside(aside: Optional[Path]) -> None:
    """The new run has its first checkpoint: the earlier run set aside is deleted."""
    if aside is not None and aside.is_dir():
        shutil.rmtree(aside)


def recover_asides(out: Path) -> None:
    """An --overwrite run killed before its first checkpoint left the earlier run set aside: put it back (or,
    when the new run's checkpoint exists, finish the deletion). Call with the lock held."""
    for aside in sorted(out.glob(ASIDE_PREFIX + "*")):
        if not aside.is_dir():
            continue
        if checkpoint_path(out).is_file():
            drop_aside(aside)
            print(f"deleted {aside}: the earlier run an --overwrite replaced")
        else:
            restore_aside(out, aside)
            print(f"restored the earlier run from {aside}: the --overwrite run that replaced it stopped before its "
                  f"first checkpoint")


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


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def record_skipped(out: Path, epoch: Optional[int], step: int, bad: Dict[str, str], phase: str) -> None:
    """Print the bad videos ``{path: reason}`` and append them to skipped.jsonl. ``phase``: "train" videos were
    replaced by other samples, "val" videos were left out of the accuracy."""
    if not bad:
        return
    fate = "replaced by other samples" if phase == "train" else "excluded from the validation accuracy"
    print(f"epoch {epoch + 1}: {len(bad)} unreadable video(s) {fate}:")
    for path, reason in sorted(bad.items()):
        print(f"  {path}: {reason}")
        append_jsonl(out / "skipped.jsonl", {"epoch": epoch, "step": step, "phase": phase, "path": path,
                                             "reason": reason})


class Logger:
    """train_log.csv + optional TensorBoard on the main process. ``purge_step``: on a resume, TensorBoard hides
    the events an interrupted run logged from that step on (train_log.csv is cut by :func:`truncate_logs`)."""

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
