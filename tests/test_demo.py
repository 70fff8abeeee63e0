"""The demo's data folder and run folder handling (m2clip_fast.demo); training itself is tested in test_train."""
import hashlib

import pytest
import torch

from m2clip_fast.data import read_list_file
from m2clip_fast.data.synthetic import CLASSES, dataset_meta, read_meta
from m2clip_fast.demo import clear_previous_run, main as demo_main, prepare_data

TINY = {"val_per_class": 1, "frames": 2, "size": 16}  # what the demo writes, shrunk


def digest(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_data_folder_follows_seed_and_per_class(tmp_path):
    data = tmp_path / "data"
    assert prepare_data(data, seed=0, per_class=1, **TINY) == f"wrote the synthetic set to {data}"
    first = data / "videos" / "moving_left" / "train_moving_left_0000.mp4"
    before = digest(first), first.stat().st_mtime_ns
    assert prepare_data(data, seed=0, per_class=1, **TINY).startswith("using the synthetic set")
    assert (digest(first), first.stat().st_mtime_ns) == before  # the same set is kept, not rewritten

    message = prepare_data(data, seed=2, per_class=1, **TINY)
    assert message == f"rewrote the synthetic set in {data} (seed 0 -> 2)"
    assert digest(first) != before[0]  # the seed draws another dataset
    assert read_meta(data) == dataset_meta(seed=2, per_class=1, **TINY)

    assert prepare_data(data, seed=2, per_class=2, **TINY).endswith("(per_class 1 -> 2)")
    assert len(read_list_file(data / "train.txt")) == 2 * len(CLASSES)


def test_a_set_from_before_meta_json_is_rewritten_and_a_foreign_folder_refused(tmp_path, capsys):
    data = tmp_path / "data"
    prepare_data(data, seed=0, per_class=1, **TINY)
    (data / "meta.json").unlink()  # as an older version left it
    message = prepare_data(data, seed=0, per_class=1, **TINY)
    assert message.endswith("(it had no meta.json: written by an older version)")
    assert read_meta(data) is not None

    foreign = tmp_path / "kinetics"
    foreign.mkdir()
    (foreign / "train.txt").write_text("abseiling/a.mp4 0\n")
    (foreign / "classes.txt").write_text("abseiling\n")
    with pytest.raises(ValueError, match="holds train.txt but no synthetic set"):
        prepare_data(foreign, seed=0, per_class=1, **TINY)
    # the command line says so in one line, before any training, and leaves the folder as it was
    assert demo_main(["--data-dir", str(foreign), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m m2clip_fast.demo: error: {foreign} holds train.txt but no synthetic set")
    assert (foreign / "train.txt").read_text() == "abseiling/a.mp4 0\n" and not (foreign / "videos").exists()


def test_a_new_run_starts_from_an_empty_run_folder(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "tensorboard").mkdir()
    for name in ("checkpoints/last.pt", "checkpoints/best.pt"):
        torch.save({"model": {}, "epoch": 19, "best": 99.0}, out / name)
    for name in ("metrics.jsonl", "train_log.csv", "skipped.jsonl", "training_curves.png",
                 "tensorboard/events.out.tfevents.1.host", "config.json", "my_notes.txt"):
        (out / name).write_text("old run\n")
    deleted = clear_previous_run(out)
    assert len(deleted) == 7
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json", "my_notes.txt"]  # train rewrites config.json; the user's own files stay
    assert clear_previous_run(out) == [] and clear_previous_run(tmp_path / "missing") == []
