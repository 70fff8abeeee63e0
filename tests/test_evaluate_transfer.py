"""The three transfer protocols end to end on the synthetic videos: split files written by make_splits (or by
hand in the published format), models trained on them with train, and evaluate --protocol's numbers against an
independent per-video recomputation with model.predict."""
import json
import statistics

import pytest

from m2clip_fast.checkpoint import load_model_checkpoint
from m2clip_fast.data import VideoClipDataset
from m2clip_fast.data.splits import k600_labels_name, k600_list_name, read_labels_csv, read_split_list, write_labels_csv
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.make_splits import main as make_splits_main
from m2clip_fast.text import ZERO_SHOT_TEMPLATES, load_class_names
from m2clip_fast.train import main as train_main
from m2clip_fast.transfer import harmonic_mean

SMALL = ["--set", "num_frames=4", "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1"]


def train(train_list, class_names, out, data_root):
    args = ["--preset", "demo", "--train-list", str(train_list), "--class-names", str(class_names),
            "--data-root", str(data_root), "--output-dir", str(out), "--batch-size", "4", "--workers", "0",
            "--no-progress", "--device", "cpu", "--epochs", "1", "--max-steps", "1", *SMALL]
    assert train_main(args) == 0
    return out / "checkpoints" / "last.pt"


def evaluate_json(capsys, *args):
    assert evaluate_main([*args, "--workers", "0", "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def hand_scores(checkpoint, samples, class_names=None, templates=None):
    """Per video, model.predict on its one test view: (top-1 %, top-5 %) of every head, counted by hand."""
    model, _ = load_model_checkpoint(checkpoint)
    model.eval()
    data = VideoClipDataset(samples, num_frames=model.num_frames, stride=1, train=False, size=model.crop_size)
    hits = {}
    for i in range(len(data)):
        item = data[i]
        for head, p in model.predict(item["video"], class_names=class_names, templates=templates).items():
            ranked = p.mean(dim=0).argsort(descending=True).tolist()
            top1, top5 = hits.setdefault(head, [0, 0])
            hits[head] = [top1 + (ranked[0] == item["label"]), top5 + (item["label"] in ranked[:5])]
    return {head: (100.0 * a / len(data), 100.0 * b / len(data)) for head, (a, b) in hits.items()}


@pytest.mark.slow
def test_k600_zero_shot_protocol(synthetic_dataset, demo_checkpoint, tmp_path, capsys):
    """Three splits in the published layout (ZS_splitN_K600_eval.txt + ZS_splitN_K600.csv, labels local to each
    split), over different class subsets; the label files in a folder of their own (--labels-dir)."""
    names = load_class_names(synthetic_dataset / "classes.txt")
    val = [line.rsplit(None, 1) for line in (synthetic_dataset / "val.txt").read_text().splitlines()]
    subsets = {1: [0, 1, 2, 3, 4, 5], 2: [2, 3, 4, 5, 6, 7], 3: [0, 1, 2, 5, 6, 7]}
    splits, labels = tmp_path / "k600_splits", tmp_path / "labels"
    splits.mkdir(), labels.mkdir()
    for n, classes in subsets.items():
        write_labels_csv(labels / k600_labels_name(n), [names[c] for c in classes])
        rows = [f"{rel} {classes.index(int(c))}\n" for rel, c in val if int(c) in classes]
        (splits / k600_list_name(n)).write_text("".join(rows))
    result = evaluate_json(capsys, "--checkpoint", str(demo_checkpoint), "--protocol", "k600-zeroshot",
                           "--split-dir", str(splits), "--labels-dir", str(labels), "--data-root",
                           str(synthetic_dataset))
    assert [s["split"] for s in result["splits"]] == [1, 2, 3]
    for s in result["splits"]:
        split_names = read_labels_csv(labels / k600_labels_name(s["split"]))
        samples = read_split_list(splits / k600_list_name(s["split"]), synthetic_dataset, len(split_names))
        top1, top5 = hand_scores(demo_checkpoint, samples, split_names, ZERO_SHOT_TEMPLATES)["text"]
        assert (s["num_classes"], s["num_samples"]) == (6, 6)
        assert s["top1"] == pytest.approx(top1) and s["top5"] == pytest.approx(top5)
    for k in ("top1", "top5"):
        values = [s[k] for s in result["splits"]]
        assert result[f"{k}_mean"] == pytest.approx(statistics.fmean(values))
        assert result[f"{k}_std"] == pytest.approx(statistics.pstdev(values))
    assert evaluate_main(["--checkpoint", str(demo_checkpoint), "--protocol", "k600-zeroshot", "--split-dir",
                          str(splits), "--labels-dir", str(labels), "--data-root", str(synthetic_dataset),
                          "--splits", "2", "--workers", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "split 2:" in text and "split 1:" not in text and " ± 0.00% over 1 splits" in text


def test_k600_bad_split_file_is_one_line_before_any_model(synthetic_dataset, tmp_path, capsys):
    (tmp_path / k600_list_name(1)).write_text("videos/a.mp4 0\nvideos/b.mp4 zero\n")
    write_labels_csv(tmp_path / k600_labels_name(1), ["a"])
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt"), "--protocol", "k600-zeroshot",
                          "--split-dir", str(tmp_path), "--data-root", str(synthetic_dataset), "--splits", "1"]) == 2
    err = capsys.readouterr().err
    assert f"split file {tmp_path / k600_list_name(1)} line 2: expected 'relative/path label'" in err
    assert len(err.strip().splitlines()) == 2  # the error, then the M2CLIP_DEBUG hint


@pytest.mark.slow
def test_few_shot_protocol(synthetic_dataset, tmp_path, capsys):
    """make_splits draws 1- and 2-shot lists from the training list, train trains on each, evaluate scores
    every checkpoint on the full test list."""
    classes, splits = synthetic_dataset / "classes.txt", tmp_path / "splits"
    assert make_splits_main(["few-shot", "--list", str(synthetic_dataset / "train.txt"), "--class-names",
                             str(classes), "--shots", "1,2", "--seed", "3", "--out", str(splits)]) == 0
    checkpoints = {k: train(splits / f"train1_few_shot_{k}.txt", classes, tmp_path / f"run{k}", synthetic_dataset)
                   for k in (1, 2)}
    capsys.readouterr()
    result = evaluate_json(capsys, "--protocol", "few-shot", "--shots", f"2={checkpoints[2]}", f"1={checkpoints[1]}",
                           "--val-list", str(synthetic_dataset / "val.txt"), "--report", str(tmp_path / "report"))
    assert [row["shots"] for row in result["shots"]] == [1, 2]
    val = read_split_list(synthetic_dataset / "val.txt", synthetic_dataset, 8)
    for row in result["shots"]:
        assert row["num_samples"] == len(val)
        for head, (top1, top5) in hand_scores(checkpoints[row["shots"]], val).items():
            assert row[f"top1_{head}"] == pytest.approx(top1) and row[f"top5_{head}"] == pytest.approx(top5), head
        assert (tmp_path / "report" / f"{row['shots']}_shot" / "predictions.jsonl").is_file()


@pytest.mark.slow
def test_base_to_novel_protocol(synthetic_dataset, tmp_path, capsys):
    """make_splits partitions the 8 classes, train fits the base classes (its label file as --class-names),
    evaluate scores base and novel test videos each over its own class names, and the HM of the two."""
    splits = tmp_path / "b2n"
    assert make_splits_main(["base-to-novel", "--list", str(synthetic_dataset / "train.txt"), "--test-list",
                             str(synthetic_dataset / "val.txt"), "--class-names", str(synthetic_dataset / "classes.txt"),
                             "--base-shots", "2", "--base", "random", "--seed", "1", "--out", str(splits)]) == 0
    checkpoint = train(splits / "fs_base_s1_train.txt", splits / "base_labels.csv", tmp_path / "run", synthetic_dataset)
    capsys.readouterr()
    result = evaluate_json(capsys, "--checkpoint", str(checkpoint), "--protocol", "base-to-novel", "--split-dir",
                           str(splits), "--data-root", str(synthetic_dataset))
    for subset in ("base", "novel"):
        names = read_labels_csv(splits / f"{subset}_labels.csv")
        samples = read_split_list(splits / f"{subset}_val.txt", synthetic_dataset, len(names))
        top1, top5 = hand_scores(checkpoint, samples, names)["text"]
        assert (result[subset]["num_classes"], result[subset]["num_samples"]) == (4, 4)
        assert result[f"{subset}_top1"] == pytest.approx(top1) and result[f"{subset}_top5"] == pytest.approx(top5)
    b, n = result["base_top1"], result["novel_top1"]
    assert result["hm_top1"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert result["hm_top5"] == pytest.approx(harmonic_mean(result["base_top5"], result["novel_top5"]))
    assert evaluate_main(["--checkpoint", str(checkpoint), "--protocol", "base-to-novel", "--split-dir", str(splits),
                          "--data-root", str(synthetic_dataset), "--workers", "0", "--device", "cpu"]) == 0
    assert f"HM    top-1 {result['hm_top1']:.2f}%" in capsys.readouterr().out


def test_base_and_novel_label_files_must_not_share_classes(tmp_path, capsys):
    for subset in ("base", "novel"):
        write_labels_csv(tmp_path / f"{subset}_labels.csv", ["a", "b"])
        (tmp_path / f"{subset}_val.txt").write_text("x.mp4 0\n")
    (tmp_path / "x.mp4").write_bytes(b"x")
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt"), "--protocol", "base-to-novel",
                          "--split-dir", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    assert "share 2 class(es)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--protocol", "few-shot", "--val-list", "v.txt"], "takes --shots K=CHECKPOINT"),
    (["--protocol", "few-shot", "--val-list", "v.txt", "--shots", "2=a.pt", "2=b.pt"], "names a K twice"),
    (["--protocol", "few-shot", "--val-list", "v.txt", "--shots", "two=a.pt"], "expected K=CHECKPOINT"),
    (["--checkpoint", "c.pt", "--protocol", "base-to-novel", "--split-dir", "d"], "needs --split-dir and --data-root"),
    (["--checkpoint", "c.pt", "--zero-shot", "ucf101", "--protocol", "k600-zeroshot"], "give it or --protocol"),
    (["--val-list", "v.txt"], "--checkpoint is required"),
    (["--checkpoint", "c.pt", "--val-list", "v.txt", "--labels-dir", "l"], "--labels-dir is for --protocol k600"),
    (["--checkpoint", "c.pt", "--protocol", "base-to-novel", "--split-dir", "d", "--data-root", "r",
      "--class-names", "hmdb51"], "from the split folder's label files"),
])
def test_protocol_options_are_checked_first(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
