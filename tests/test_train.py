"""The training loop on a real (tiny) encoded dataset: exact resume (at and between epoch boundaries), the
output folder's lifecycle (refusal, --overwrite, log truncation), DDP == one process, bad videos, start-up
checks, the lr schedule and the optimizer groups."""
import csv
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.data.synthetic import write_broken_video
from m2clip_fast.train import interrupt_hint, lr_factor, main as train_main, param_groups, parse_args, train
from ucf_layout import ucf_videos, write_class_ind

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "num_frames=4", "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1",
         "train.warmup_epochs=0.5"]


@pytest.fixture
def dataset(synthetic_dataset):
    return synthetic_dataset


def base_args(dataset, out, *extra):
    return ["--preset", "demo", "--train-list", str(dataset / "train.txt"), "--class-names",
            str(dataset / "classes.txt"), "--output-dir", str(out), "--batch-size", "4", "--workers", "0",
            "--no-progress", "--device", "cpu", *extra]


def tunable(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = create_model("demo", class_names=state["class_names"], fused=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state["model"].items() if k in names}, state


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 12) == pytest.approx(0.25)
    assert lr_factor(3, 4, 12) == pytest.approx(1.0)
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)


def test_param_groups_decay_and_text_lr():
    model = create_model("tiny", class_names=["a", "b"], fused=False)
    groups = param_groups(model, lr=1.0, weight_decay=0.01, text_lr_scale=0.5)
    for g in groups:
        text = all(n.startswith(("text_adapters.", "cmlm_adapter.")) for n in g["names"])
        assert g["lr"] == (0.5 if text else 1.0)
        assert (g["weight_decay"] == 0.0) == all(p.ndim == 1 for p in g["params"])
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)


def losses(run):
    """{step: row} of a run's train_log.csv, asserting that no step is logged twice."""
    with open(run / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {int(r["step"]): {k: v for k, v in r.items() if k != "clips_per_s"} for r in rows}


def test_resume_continues_exactly(dataset, tmp_path, capsys):
    """Two epochs in one go == stop at the end of epoch 1 (--max-steps 4), --resume to the middle of epoch 2
    (--max-steps 6), --resume to the end: the same losses step by step and the same weights, bit for bit."""
    val = ["--val-list", str(dataset / "val.txt")]
    straight_run, run = tmp_path / "straight", tmp_path / "resumed"
    assert train_main(base_args(dataset, straight_run, "--epochs", "2", *val, *SMALL)) == 0
    assert train_main(base_args(dataset, run, "--epochs", "2", "--max-steps", "4", *val, *SMALL)) == 0
    first, state = tunable(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_done"]) == (0, 4, True)
    progress = {}
    train(parse_args(base_args(dataset, run, "--epochs", "2", "--max-steps", "6", "--resume", *val, *SMALL)),
          progress)
    _, state = tunable(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_done"], state["batches_done"]) == (1, 6, False, 2)
    hint = interrupt_hint(progress)  # what Ctrl-C would print now
    assert str(run / "checkpoints" / "last.pt") in hint and "step 6, epoch 2/2 after batch 2/4" in hint
    assert hint.endswith("continue from it with the same command plus --resume")
    # an interrupted run may have logged steps after its last checkpoint: a resume must not repeat them
    # ... and a crash may have torn the last line: cut short, or zero-filled by the file system
    with open(run / "train_log.csv", "a") as f:
        f.write("7,1,0.1,1.0,9.9,9.9,9.9,9.9,9.9\n" + "\x00" * 40)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "step": 7, "top1": 0.0}) + "\n" + '{"epoch": 1, "st')
    capsys.readouterr()
    assert train_main(base_args(dataset, run, "--epochs", "2", "--resume", *val, *SMALL)) == 0
    assert "at step 6, epoch 2/2 after batch 2/4" in capsys.readouterr().out

    straight, s_state = tunable(straight_run / "checkpoints" / "last.pt")
    resumed, r_state = tunable(run / "checkpoints" / "last.pt")
    assert r_state["step"] == s_state["step"] == 8
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(not torch.equal(first[k], resumed[k]) for k in first)
    assert losses(run) == losses(straight_run) and len(losses(run)) == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 4), (1, 6), (1, 8)]
    assert {"top1", "top5", "top1_vc", "top1_text", "top1_fused", "excluded"} <= set(records[-1])
    assert (straight_run / "checkpoints" / "best.pt").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "checkpoints" / "last.pt").stat().st_mode) == 0o666 & ~umask

    # a finished run: --resume has nothing to do; a fresh run there needs --overwrite; other settings are refused
    assert train_main(base_args(dataset, run, "--epochs", "2", "--resume", *val, *SMALL)) == 0
    assert "nothing to do: already at epoch 2/2" in capsys.readouterr().out
    assert train_main(base_args(dataset, run, "--epochs", "2", *val, *SMALL)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    other = base_args(dataset, run, "--resume", *val, *SMALL, "ted_bottleneck=16", "train.blr=0.5")
    other[other.index("demo")] = "tiny"
    assert train_main(other) == 2
    err = capsys.readouterr().err
    assert "ted_bottleneck: 8 in the checkpoint, 16 now" in err and "train.blr: 0.08 in the checkpoint, 0.5 now" in err
    assert "preset demo then, tiny now" in err
    assert losses(run) == losses(straight_run)  # refused runs leave the folder as it was


def test_overwrite_starts_afresh(dataset, tmp_path, capsys):
    """--overwrite replaces the earlier run's checkpoints and logs (set aside, deleted after the first checkpoint);
    the progress bar goes to stderr."""
    run = tmp_path / "run"
    common = ["--epochs", "1", "--max-steps", "1", "--val-list", str(dataset / "val.txt"), *SMALL]
    assert train_main(base_args(dataset, run, *common)) == 0
    with open(run / "skipped.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 0, "step": 1, "phase": "train", "path": "x.mp4", "reason": "r"}) + "\n")
    args = base_args(dataset, run, "--overwrite", *common, "train.blr=0.01")
    args.remove("--no-progress")
    capsys.readouterr()
    assert train_main(args) == 0
    captured = capsys.readouterr()
    assert "--overwrite: the earlier run is set aside in" in captured.out
    assert not list(run.glob(".previous-run-*"))
    assert "epoch 1/1" in captured.err and "epoch 1/1" not in captured.out
    assert list(losses(run)) == [1]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "skipped.jsonl").exists()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["config"]["train"]["blr"] == 0.01


def test_a_failed_start_leaves_the_earlier_run(dataset, tmp_path, capsys):
    """--overwrite deletes the earlier run only once the new one has passed its start-up checks: a wrong
    --val-list loses nothing; --resume of a file that holds no training state says so."""
    run = tmp_path / "run"
    common = ["--epochs", "1", "--max-steps", "1", *SMALL]
    assert train_main(base_args(dataset, run, *common)) == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "last.pt", run / "train_log.csv")}
    assert train_main(base_args(dataset, run, "--overwrite", "--val-list", str(tmp_path / "nope.txt"), *common)) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "last.pt", run / "train_log.csv")} == before

    model_only = tmp_path / "model.pt"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    torch.save({k: state[k] for k in ("config", "class_names", "pretrained", "model")}, model_only)  # as convert
    assert train_main(base_args(dataset, run, "--resume", str(model_only), *common)) == 2
    err = capsys.readouterr().err
    assert f"{model_only} is not a checkpoint of m2clip_fast.train (it lacks optimizer, scaler" in err


def run_files(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_overwrite_keeps_the_earlier_run_until_the_first_checkpoint(dataset, tmp_path, capsys):
    """A config error fails before OUTPUT is touched; a run that fails in its first epoch (every training video
    unreadable) gets the earlier run back, byte for byte, and leaves no set-aside folder."""
    run = tmp_path / "run"
    common = ["--epochs", "1", "--val-list", str(dataset / "val.txt"), *SMALL]
    assert train_main(base_args(dataset, run, *common)) == 0
    before = run_files(run)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl"} <= set(before)
    for bad in ("train.epochs=abc", "train.epochs=2.5", "train.eval_every=0"):
        assert train_main(base_args(dataset, run, "--overwrite", "--max-steps", "1", *SMALL, bad)) == 2
        err = capsys.readouterr().err
        assert f"error: invalid config value: {bad.split('=')[0]}" in err and "Traceback" not in err
        assert run_files(run) == before
    broken = tmp_path / "broken.txt"
    names = [tmp_path / f"broken_{i}.mp4" for i in range(8)]
    for i, name in enumerate(names):
        write_broken_video(name, "garbage", seed=i)
    broken.write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    args = base_args(dataset, run, "--overwrite", *common)
    args[args.index("--train-list") + 1] = str(broken)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "the earlier run in" in err and "is restored" in err
    assert run_files(run) == before and not list(run.glob(".previous-run-*"))


def test_a_killed_overwrite_is_undone_at_the_next_start(dataset, tmp_path, capsys):
    """What a SIGKILL between setting the earlier run aside and the first checkpoint leaves (the run's files in
    .previous-run-*, a new config.json) is put back by the next start, which then refuses to mix runs."""
    from m2clip_fast import run_dir
    run = tmp_path / "run"
    common = ["--epochs", "1", "--max-steps", "1", *SMALL]
    assert train_main(base_args(dataset, run, *common)) == 0
    before = run_files(run)
    aside = run_dir.set_aside(run)
    (run / "config.json").write_text("{}")  # the killed run's own start
    assert train_main(base_args(dataset, run, *common)) == 2
    captured = capsys.readouterr()
    assert f"restored the earlier run from {aside}" in captured.out and "already holds a run" in captured.err
    assert run_files(run) == before and not aside.exists()


def test_a_second_run_into_the_same_folder_is_refused(dataset, tmp_path, capsys):
    """Two real processes: while one trains into OUTPUT, another start there is a one-line error naming it; a
    .lock whose process is gone is taken over."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "m2clip_fast.train",
                              *base_args(dataset, run, "--epochs", "200", *SMALL)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / ".lock"
        for _ in range(600):
            if lock.is_file() and f"pid {first.pid} on" in lock.read_text():
                break
            assert first.poll() is None
            time.sleep(0.1)
        assert train_main(base_args(dataset, run, "--epochs", "1", *SMALL)) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another run (pid {first.pid} on {socket.gethostname()})" in err
        assert "Traceback" not in err
    finally:
        first.kill()
        first.wait()
    assert f"pid {first.pid}" in lock.read_text()  # left by the killed process: stale, taken over
    assert train_main(base_args(dataset, run, "--overwrite", "--epochs", "1", "--max-steps", "1", *SMALL)) == 0
    assert (run / "checkpoints" / "last.pt").is_file()


def test_temp_files_of_torn_checkpoint_writes_are_removed(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--epochs", "2", "--max-steps", "1", *SMALL]
    assert train_main(base_args(dataset, run, *common)) == 0
    whole = (run / "checkpoints" / "last.pt").read_bytes()
    torn = [run / "checkpoints" / f".last.pt.{tag}.tmp" for tag in ("a1b2", "x9y8")]
    for p in torn:
        p.write_bytes(whole[: len(whole) // 2])  # what a write killed halfway leaves
    kept = run / "checkpoints" / "notes.tmp"
    kept.write_text("mine")
    capsys.readouterr()
    assert train_main(base_args(dataset, run, "--resume", "--epochs", "2", "--max-steps", "2", *SMALL)) == 0
    assert "removed 2 temporary file(s) of interrupted checkpoint writes" in capsys.readouterr().out
    assert not any(p.exists() for p in torn) and kept.read_text() == "mine"


@contextmanager
def tmpfs(path, *options):
    """A real tmpfs mounted at ``path`` (root only; skips elsewhere)."""
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def read_only_folder(path):
    if os.geteuid() == 0:  # root writes into a 0555 folder: use a read-only filesystem
        with tmpfs(path, "ro", "size=1m"):
            yield path
        return
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def test_unwritable_output_is_one_line(dataset, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as parent:
        assert train_main(base_args(dataset, parent / "run", "--epochs", "1", *SMALL)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --output-dir {parent / 'run'}: " in err and "Traceback" not in err
    assert "Read-only file system" in err or "Permission denied" in err


def test_old_checkpoints_and_moved_backbone_files_resume(dataset, tmp_path, monkeypatch, capsys):
    """A checkpoint of the previous version (no run settings, position or backbone size; a local --pretrained
    stored as given, relative) resumes at its next epoch, as that version did; a backbone file that moved
    (same name and size) resumes from its new place; another file is refused."""
    from m2clip_fast.model import load_clip

    monkeypatch.chdir(tmp_path)
    Path("w").mkdir()
    torch.save(load_clip("m2clip-demo", None, True).state_dict(), "w/backbone.pt")
    common = ["--epochs", "2", *SMALL]
    assert train_main(base_args(dataset, "run", "--max-steps", "2", "--pretrained", "w/backbone.pt", *common)) == 0
    last = Path("run/checkpoints/last.pt")
    state = torch.load(last, weights_only=False)
    for key in ("format_version", "run", "batches_done", "epoch_done", "pretrained_size"):
        del state[key]
    state["pretrained"] = "w/backbone.pt"
    torch.save(state, last)
    capsys.readouterr()
    assert train_main(base_args(dataset, "run", "--resume", "--max-steps", "3", "--pretrained", "w/backbone.pt",
                                *common)) == 0
    assert "at step 2, the end of epoch 1/2" in capsys.readouterr().out
    state = torch.load(last, weights_only=False)
    assert (state["epoch"], state["step"], state["batches_done"]) == (1, 3, 1)
    assert state["pretrained"] == str(tmp_path / "w" / "backbone.pt")

    Path("moved").mkdir()
    os.replace("w/backbone.pt", "moved/backbone.pt")
    assert train_main(base_args(dataset, "run", "--resume", "--max-steps", "4", "--pretrained", "moved/backbone.pt",
                                *common)) == 0
    state = torch.load(last, weights_only=False)
    assert state["step"] == 4 and state["pretrained"] == str(tmp_path / "moved" / "backbone.pt")
    shutil.copy("moved/backbone.pt", "other.pt")  # the same bytes under another name: not taken for the same file
    capsys.readouterr()
    assert train_main(base_args(dataset, "run", "--resume", "--pretrained", "other.pt", *common)) == 2
    assert f"--pretrained: '{tmp_path / 'moved' / 'backbone.pt'}' in the checkpoint" in capsys.readouterr().err


def test_interrupt_hint_gives_a_command_that_works():
    """Ctrl-C's advice must not lead to a refusal: not '--resume' next to --overwrite (an error, and --overwrite
    would delete the checkpoint), not the --resume PATH this run started from (older than the last checkpoint)."""
    last = Path("run/checkpoints/last.pt")
    seen = {"checkpoint": last, "step": 3, "where": "epoch 1/2 after batch 3/4"}
    assert interrupt_hint({**seen, "resume": None, "overwrite": False}).endswith("the same command plus --resume")
    assert interrupt_hint({**seen, "resume": None, "overwrite": True}).endswith("plus --resume instead of --overwrite")
    assert interrupt_hint({**seen, "resume": "old/last.pt", "overwrite": False}).endswith(f"with --resume {last}")
    assert interrupt_hint({**seen, "resume": str(last), "overwrite": False}).endswith("plus --resume")


def test_bad_videos_are_replaced_counted_and_listed(dataset, tmp_path):
    """Broken training videos (an empty file too) are replaced; broken validation videos are left out of the
    accuracy, counted and listed."""
    lines = (dataset / "train.txt").read_text().splitlines()
    bad = {"truncated": "bad_truncated.mp4", "garbage": "bad_garbage.mp4", "zero_frames": "bad_zero_frames.avi",
           "empty": "bad_empty.mp4"}
    for i, (kind, name) in enumerate(bad.items()):
        write_broken_video(tmp_path / name, kind)
        lines.append(f"{tmp_path / name} {i}")
    train_list = tmp_path / "train.txt"
    train_list.write_text("\n".join(lines) + "\n")
    val_bad = {"garbage": "val_garbage.mp4", "empty": "val_empty.mp4"}
    val_lines = (dataset / "val.txt").read_text().splitlines()
    for kind, name in val_bad.items():
        write_broken_video(tmp_path / name, kind, seed=1)
        val_lines.append(f"{tmp_path / name} 0")
    val_list = tmp_path / "val.txt"
    val_list.write_text("\n".join(val_lines) + "\n")
    args = base_args(dataset, tmp_path / "run", "--epochs", "1", "--val-list", str(val_list), *SMALL)
    args[args.index("--train-list") + 1] = str(train_list)
    args += ["--data-root", str(dataset)]
    assert train_main(args) == 0
    skipped = [json.loads(s) for s in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    by_phase = {p: {Path(s["path"]).name for s in skipped if s["phase"] == p} for p in ("train", "val")}
    assert by_phase == {"train": set(bad.values()), "val": set(val_bad.values())}
    assert all(s["reason"] and s["epoch"] == 0 for s in skipped)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert (record["num_samples"], record["excluded"]) == (len(val_lines) - 2, 2)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_a_mostly_unreadable_dataset_stops_the_run(dataset, tmp_path, capsys):
    """20 unreadable videos beside 16 readable ones: more than the default half of the samples, so the run
    stops with one line saying so (the unreadable ones are listed in skipped.jsonl), and writes no checkpoint."""
    lines = (dataset / "train.txt").read_text().splitlines()
    for i in range(20):
        write_broken_video(tmp_path / f"bad_{i}.mp4", "garbage", seed=i)
        lines.append(f"{tmp_path / f'bad_{i}.mp4'} {i % 8}")
    train_list = tmp_path / "train.txt"
    train_list.write_text("\n".join(lines) + "\n")
    args = base_args(dataset, tmp_path / "run", "--epochs", "1", "--data-root", str(dataset), *SMALL)
    args[args.index("--train-list") + 1] = str(train_list)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "of 36 training videos met in epoch 1" in err and "more than train.max_bad_fraction=0.5 allows" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    listed = {json.loads(s)["path"] for s in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()}
    assert len(listed) > 18 and all("bad_" in p for p in listed)


def test_missing_files_and_bad_labels_reported_together(dataset, tmp_path, capsys):
    lines = (dataset / "train.txt").read_text().splitlines()
    lines += ["videos/nope_1.mp4 0", "videos/nope_2.mp4 1", f"{lines[0].split()[0]} 99"]
    bad = tmp_path / "train.txt"
    bad.write_text("\n".join(lines) + "\n")
    val = tmp_path / "val.txt"
    val.write_text((dataset / "val.txt").read_text() + "videos/nope_val.mp4 2\n")
    args = base_args(dataset, tmp_path / "run", "--epochs", "1", "--data-root", str(dataset), *SMALL)
    args[args.index("--train-list") + 1] = str(bad)
    assert train_main(args + ["--val-list", str(val)]) == 2
    message = capsys.readouterr().err
    assert "nope_1.mp4" in message and "nope_2.mp4" in message and "label 99" in message
    assert f"training list {bad}" in message and "--skip-missing" in message
    assert f"validation list {val}" in message and "nope_val.mp4" in message  # both lists at once
    lines.pop()  # the bad label stays an error; missing files can be skipped
    bad.write_text("\n".join(lines) + "\n")
    assert train_main(args + ["--skip-missing"]) == 0
    dropped = [json.loads(s) for s in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(d["path"]).name for d in dropped) == ["nope_1.mp4", "nope_2.mp4"]
    assert {d["phase"] for d in dropped} == {"start"}


def test_resume_refuses_another_training_list(dataset, tmp_path, capsys):
    """At an epoch boundary nothing else tells a changed list: its fingerprint is among the run settings."""
    run = tmp_path / "run"
    assert train_main(base_args(dataset, run, "--epochs", "2", "--max-steps", "4", *SMALL)) == 0
    lines = (dataset / "train.txt").read_text().splitlines()
    path, label = lines[0].rsplit(None, 1)
    other = tmp_path / "train.txt"
    other.write_text("\n".join([f"{path} {(int(label) + 1) % 8}", *lines[1:]]) + "\n")  # one label changed
    args = base_args(dataset, run, "--resume", "--epochs", "2", "--data-root", str(dataset), *SMALL)
    args[args.index("--train-list") + 1] = str(other)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "1 difference(s):\n  --train-list: '16 samples, sha256 " in err and "' now" in err
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)  # the same list under another data root: the same run
    args = base_args(dataset, run, "--resume", "--epochs", "2", "--data-root", str(moved), *SMALL)
    args[args.index("--train-list") + 1] = str(moved / "train.txt")
    assert train_main(args) == 0


def test_wrong_data_root_is_named(dataset, tmp_path, capsys):
    """When no listed file exists, the error says where it looked and suggests --data-root."""
    args = base_args(dataset, tmp_path / "run", "--data-root", str(tmp_path), *SMALL)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert f"none of the 16 listed files exists under {tmp_path}" in err and "--data-root" in err


def test_ucf101_split_files_train_with_0_based_labels(dataset, tmp_path, capsys):
    """An official trainlist01.txt (1-based labels, classInd.txt next to it) trains with the labels of its
    classes; testlist01.txt (no labels) validates with the labels of the class folders."""
    from m2clip_fast.data.datasets import read_annotations

    split_dir, root = make_ucf_split(dataset, tmp_path)
    names = (dataset / "classes.txt").read_text().split()
    by_video = {Path(p).name: label for p, label in read_annotations(str(split_dir / "trainlist01.txt"),
                                                                      str(root), names)}
    # the class folder and the label agree: v_MovingUp_... has label 2 = classes.txt line 3 (moving_up)
    assert by_video and all(names[label].replace("_", "") == name.split("_")[1].lower()
                            for name, label in by_video.items())
    args = base_args(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1", "--data-root", str(root),
                     "--val-list", str(split_dir / "testlist01.txt"), *SMALL)
    args[args.index("--train-list") + 1] = str(split_dir / "trainlist01.txt")
    assert train_main(args) == 0
    assert "training 12 clips, 8 classes" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["num_samples"] == 4


def make_ucf_split(dataset, tmp_path):
    """An official UCF101 split folder over the synthetic videos: classInd.txt, trainlist01.txt (1-based
    labels, 3 of every 4 videos), testlist01.txt (the rest, no labels)."""
    root, split_dir = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    write_class_ind(split_dir)
    entries = ucf_videos(dataset, root)
    train_lines = [f"{rel} {label + 1}" for n, (rel, label) in enumerate(entries) if n % 4]
    test_lines = [rel for n, (rel, _) in enumerate(entries) if not n % 4]
    (split_dir / "trainlist01.txt").write_text("\n".join(train_lines) + "\n")
    (split_dir / "testlist01.txt").write_text("\n".join(test_lines) + "\n")
    return split_dir, root


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(dataset, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo), 2 clips each == 1 process with 4 clips: same update, also after a
    --resume in the middle of an epoch (each rank skips its own shard's batches and gets its RNG back).
    Dropout and CMLM's random masking are switched off, since their randomness is per process."""
    same = ["--epochs", "1", "--set", "num_frames=4", "ted_bottleneck=8",
            "text_bottleneck=8", "train.stride=1", "vc_dropout=0.0", "train.warmup_epochs=0",
            "loss_weights={'contrastive': 0.5, 'cmc': 0.5, 'vc': 1.0}", "train.grad_clip=None"]
    one = base_args(dataset, tmp_path / "one", "--max-steps", "2", *same)
    assert train_main(one) == 0
    two = base_args(dataset, tmp_path / "two", "--max-steps", "2", *same)
    two[two.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(args):
        with socket.socket() as probe:  # a free port: a fixed one collides with another suite running beside this
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "m2clip_fast.train", *args]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    torchrun(two)
    from m2clip_fast.runtime import seed_everything

    names = (dataset / "classes.txt").read_text().split()
    seed_everything(0)  # as train does for --seed 0 on rank 0, whose weights DDP broadcasts
    initial = create_model("demo", class_names=names, fused=False, num_frames=4, ted_bottleneck=8, text_bottleneck=8)
    start = {k: v.detach() for k, v in initial.named_parameters()}

    def compare(one_run, steps):
        a, state_a = tunable(one_run / "checkpoints" / "last.pt")
        b, state_b = tunable(tmp_path / "two" / "checkpoints" / "last.pt")
        assert state_a["step"] == state_b["step"] == steps
        frozen = "clip.visual.conv1.weight"
        assert torch.equal(initial.state_dict()[frozen], state_a["model"][frozen])  # same starting point
        moved = 0
        for key in a:
            update = (a[key] - start[key]).abs().max()
            # Sums split over 2 processes round differently, and AdamW divides by sqrt(v), which magnifies that
            # rounding where gradients are tiny: compare against the size of the update itself (within 1%).
            assert (a[key] - b[key]).abs().max() <= 0.01 * update + 1e-7, key
            moved += bool(update > 0)
        assert moved > len(a) // 2  # the update is real, not two untouched models

    compare(tmp_path / "one", 2)
    # the 2 processes stopped after batch 2 of 4: one more step after --resume == 3 steps in one go
    assert "at step 2, epoch 1/1 after batch 2/4" in torchrun(two[:two.index("--max-steps")] +
                                                              ["--max-steps", "3", "--resume", *same])
    assert train_main(base_args(dataset, tmp_path / "one_straight", "--max-steps", "3", *same)) == 0
    compare(tmp_path / "one_straight", 3)
    # the ranks' shards and RNG streams belong to 2 processes: one process may not continue them
    capsys.readouterr()
    assert train_main(two[:two.index("--max-steps")] + ["--resume", *same]) == 2
    assert "processes: 2 in the checkpoint, 1 now" in capsys.readouterr().err


# Configurations whose training forward leaves tunable parameters without a gradient, each with the last vision
# block as built (class token only, or in full): (name, loss weights, full last block).
UNUSED_CASES = [
    ("vc0-full-block", {"contrastive": 0.5, "cmc": 0.5, "vc": 0.0, "cmlm": 0.0}, True),
    ("text-heads0-full-block", {"contrastive": 0.0, "cmc": 0.0, "vc": 1.0, "cmlm": 0.0}, True),
]
DDP_CLASSES = ["moving left", "moving right", "rotating clockwise", "growing"]


def _ddp_steps(rank, world, init_file, out, steps):
    """One gloo process: for each UNUSED_CASES model (tiny preset, rank-dependent initial weights, which DDP's
    broadcast replaces by rank 0's), ``steps`` AdamW steps on this rank's own random clips through
    runtime.distributed_model, as the trainer builds it; saves the tuned weights before and after."""
    import torch.distributed as dist

    from m2clip_fast.runtime import distributed_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, weights, full_block in UNUSED_CASES:
            torch.manual_seed(rank)
            model = create_model("tiny", class_names=DDP_CLASSES, fused=False, loss_weights=weights).train()
            model.last_block_class_token_only = not full_block
            ddp = distributed_model(model, torch.device("cpu"), world)
            tuned = {n: p for n, p in model.named_parameters() if p.requires_grad}
            before = {n: p.detach().clone() for n, p in tuned.items()}
            optimizer = torch.optim.AdamW(tuned.values(), lr=1e-2)
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(steps):
                video = torch.randn(2, 4, 3, 32, 32, generator=g)
                ddp(video, torch.randint(0, len(DDP_CLASSES), (2,), generator=g))["loss"].backward()
                with_grad = sorted(n for n, p in tuned.items() if p.grad is not None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.save({"before": before, "after": {n: p.detach() for n, p in tuned.items()}, "with_grad": with_grad,
                        "unused": model.unused_parameters()}, out / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 process start-ups: ~45 s on the shared 2 cores
def test_ddp_trains_configurations_with_parameters_without_gradient(tmp_path):
    """2 gloo processes, 2 steps of each configuration with a zero-weight head (with the full last block too,
    where no D branch is unused): DDP raises no unused-parameter error (it would at step 2 if not told), the
    ranks end with equal weights (bit for bit: same start from rank 0's broadcast, same averaged gradients from
    different clips), exactly the parameters not named unused got a gradient, and the unused ones never moved."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_steps, args=(2, str(tmp_path / "init"), tmp_path, 2), nprocs=2, join=True)
    for name, _, full_block in UNUSED_CASES:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        unused = set(ranks[0]["unused"])
        assert unused and (not full_block or not any("_d." in n for n in unused)), (name, unused)
        assert ranks[0]["with_grad"] == ranks[1]["with_grad"] == sorted(set(ranks[0]["after"]) - unused), name
        moved = 0
        for key in ranks[0]["after"]:
            assert torch.equal(ranks[0]["before"][key], ranks[1]["before"][key]), (name, key)
            assert torch.equal(ranks[0]["after"][key], ranks[1]["after"][key]), (name, key)
            changed = not torch.equal(ranks[0]["before"][key], ranks[0]["after"][key])
            assert not (changed and key in unused), (name, key)
            moved += changed
        assert moved > len(ranks[0]["after"]) // 2, name  # a real update, not two untouched models


def test_an_error_in_a_loader_worker_is_one_line(dataset, tmp_path, capsys):
    broken = tmp_path / "broken.txt"
    names = [tmp_path / f"broken_{i}.mp4" for i in range(4)]
    for i, name in enumerate(names):
        write_broken_video(name, "garbage", seed=i)
    broken.write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    args = base_args(dataset, tmp_path / "run", "--epochs", "1", *SMALL)
    args[args.index("--train-list") + 1] = str(broken)
    args[args.index("--workers") + 1] = "1"
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "error: every item of a batch of 4 failed, replacements included: " in err and "broken_" in err
    assert "Traceback" not in err and "worker process" not in err


def test_a_diverging_run_stops_without_a_nan_checkpoint(dataset, tmp_path, capsys):
    """train.blr=1e30 (finite, so accepted) drives the loss to NaN/inf: one line, exit 2, no checkpoint of it;
    under --overwrite the earlier good run comes back."""
    run = tmp_path / "run"
    assert train_main(base_args(dataset, run, "--epochs", "1", "--max-steps", "1", *SMALL)) == 0
    before = run_files(run)
    assert train_main(base_args(dataset, run, "--overwrite", "--epochs", "2", *SMALL, "train.blr=1e30",
                                "train.grad_clip=None")) == 2
    err = capsys.readouterr().err
    assert "error: training diverged: loss " in err and "no checkpoint was written" in err
    assert "train.blr=1e+30" in err and "Traceback" not in err
    assert run_files(run) == before
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_or_misshapen_checkpoints_are_refused(dataset, tmp_path, capsys):
    from m2clip_fast.evaluate import main as evaluate_main
    run = tmp_path / "run"
    assert train_main(base_args(dataset, run, "--epochs", "2", "--max-steps", "1", *SMALL)) == 0
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    name = next(k for k in state["model"] if "ted" in k and state["model"][k].is_floating_point())
    evaluate = ["--val-list", str(dataset / "val.txt"), "--workers", "0", "--device", "cpu"]
    for kind, damage in (("NaN", lambda t: t.clone().fill_(float("nan"))), ("shape", lambda t: t[..., :1].clone())):
        broken = {**state, "model": {**state["model"], name: damage(state["model"][name])}}
        torch.save(broken, last)
        assert train_main(base_args(dataset, run, "--resume", "--epochs", "2", "--max-steps", "2", *SMALL)) == 2
        assert evaluate_main(["--checkpoint", str(last), *evaluate]) == 2
        err = capsys.readouterr().err
        want = "hold NaN or inf" if kind == "NaN" else "of another shape than the model's"
        assert err.count(want) == 2 and err.count(name) == 2 and "Traceback" not in err


def test_a_max_steps_stop_mid_epoch_does_not_compete_for_best(dataset, tmp_path):
    run = tmp_path / "run"
    assert train_main(base_args(dataset, run, "--epochs", "1", "--max-steps", "2", "--val-list",
                                str(dataset / "val.txt"), *SMALL)) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # evaluated and recorded
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "checkpoints" / "best.pt").exists()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["best"] == -1.0


def test_a_full_disk_keeps_the_previous_checkpoint(dataset, tmp_path, capsys):
    """A real full filesystem (a tmpfs a little larger than one checkpoint): the second checkpoint write fails
    with one line naming the cause and the file; the first checkpoint is untouched, no temp file is left."""
    probe = tmp_path / "probe"
    common = ["--epochs", "2", "--max-steps", "1", *SMALL]
    assert train_main(base_args(dataset, probe, *common)) == 0
    size = (probe / "checkpoints" / "last.pt").stat().st_size
    with tmpfs(tmp_path / "small", f"size={size * 3 // 2 + (1 << 18)}") as mount:
        run = mount / "run"
        assert train_main(base_args(dataset, run, *common)) == 0
        last = run / "checkpoints" / "last.pt"
        first = last.read_bytes()
        capsys.readouterr()
        assert train_main(base_args(dataset, run, "--resume", "--epochs", "2", "--max-steps", "2", *SMALL)) == 2
        err = capsys.readouterr().err
        assert f"error: no space left on device while writing {last}; the previous checkpoint is intact" in err
        assert last.read_bytes() == first and not list(last.parent.glob(".*.tmp"))


@pytest.mark.parametrize("extra, message", [
    (["--set", "train=5"], "'train' must be a mapping of training keys, got 5"),
    (["--set", "backbone=nope"], "unknown backbone 'nope'"),
    (["--set", "train.blr=nan"], "invalid config value: train.blr=nan (expected a finite number > 0)"),
    (["--config", "BAD_YAML"], "is not a readable YAML file"),
    (["--device", "cuda"], "--device cuda was asked for, but CUDA is not available")])
def test_start_up_errors_are_one_line_and_touch_nothing(dataset, tmp_path, capsys, extra, message):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("preset: demo\ntrain: [unclosed\n")
    args = base_args(dataset, tmp_path / "run", "--epochs", "1")
    if "--device" in extra:
        args = args[:-2]  # base_args ends with --device cpu
    args += [str(bad_yaml) if e == "BAD_YAML" else e for e in extra]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() or {p.name for p in (tmp_path / "run").iterdir()} <= {".lock"}
