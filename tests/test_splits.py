"""Transfer split files: ViFi-CLIP's published format read as written by hand, the writers' files read back
(K-shot counts, base/novel partition, K600 splits), seeds, one-line errors, the shipped 220 Kinetics-600
classes, and the harmonic mean and mean ± std against hand numbers."""
import math
import re
import statistics
from collections import Counter

import pytest

from m2clip_fast.data.datasets import DatasetError
from m2clip_fast.data.splits import (k600_labels_name, k600_list_name, partition_classes, read_labels_csv,
                                     read_split_list, write_base_to_novel, write_few_shot, write_k600_zero_shot)
from m2clip_fast.errors import UsageError
from m2clip_fast.make_splits import main as make_splits_main
from m2clip_fast.text import load_class_names
from m2clip_fast.transfer import harmonic_mean, mean_std, split_summary


def squeeze(name):
    return re.sub(r"[^0-9a-z]", "", name.lower())


def full_list(per_class):
    """(relative path, label) with per_class[c] videos of class c, classes interleaved as a real list is not."""
    samples = [(f"videos/c{c}/v{i}.mp4", c) for c, n in enumerate(per_class) for i in range(n)]
    return sorted(samples, key=lambda s: s[0][::-1])


# ------------------------------------------------------------------------------------- the shipped K600 list


def test_k600_new_classes_are_220_and_none_is_in_kinetics400():
    new = load_class_names("kinetics600_new220")
    k400 = {squeeze(n) for n in load_class_names("kinetics400")}
    assert len(new) == 220 == len({squeeze(n) for n in new})
    assert not [n for n in new if squeeze(n) in k400]
    assert new == sorted(new)  # Kinetics-600's own (alphabetical) order, which ER-ZSAR numbers 400-619
    # the three classes that ER-ZSAR's three splits all leave to validation (indices 497, 513, 575)
    assert [new[i - 400] for i in (497, 513, 575)] == ["making horseshoes", "pillow fight", "spelunking"]


# ------------------------------------------------------------------------------------- the published format


def test_published_format_written_by_hand_reads(tmp_path):
    """A label file and a video list as ViFi-CLIP publishes them (labels/ssv2_174_base_labels.csv quotes names
    that hold commas; lists are 'path label' with subset-local labels)."""
    (tmp_path / "labels.csv").write_text('id,name\n0,Pouring something into something\n'
                                         '1,"Removing something, revealing something behind"\n2,brush hair\n')
    (tmp_path / "novel_val.txt").write_text("train/-aNccq2jvUA_000055_000065.mp4 0\n"
                                            "Aussie_Brunette_Brushing_Long_Hair_brush_hair_u_nm_np1_ba_med_3.avi 2\n"
                                            "\n74225.webm 1\n")
    names = read_labels_csv(tmp_path / "labels.csv")
    assert names == ["Pouring something into something", "Removing something, revealing something behind",
                     "brush hair"]
    assert load_class_names(tmp_path / "labels.csv") == names  # --class-names takes a label file too
    samples = read_split_list(tmp_path / "novel_val.txt", "/data", len(names))
    assert samples == [("/data/train/-aNccq2jvUA_000055_000065.mp4", 0),
                       ("/data/Aussie_Brunette_Brushing_Long_Hair_brush_hair_u_nm_np1_ba_med_3.avi", 2),
                       ("/data/74225.webm", 1)]


@pytest.mark.parametrize("name, text, message", [
    ("s.txt", "a.mp4 0\nb.mp4 x\n", r"split file \S*s\.txt line 2: expected 'relative/path label'"),
    ("s.txt", "a.mp4 0\n\nb.mp4 3\n", r"split file \S*s\.txt line 3: label 3 is not in \[0, 3\)"),
    ("s.txt", "a.mp4\n", r"split file \S*s\.txt line 1: expected"),
    ("s.txt", "\n\n", r"split file \S*s\.txt: no videos"),
    ("l.csv", "id,name\n0,a\n2,b\n", r"label file \S*l\.csv line 3: id '2', expected 1"),
    ("l.csv", "id,name\n0,a\n1,a\n", r"label file \S*l\.csv line 3: duplicate class name 'a' \(first on line 2\)"),
    ("l.csv", "id,name\n0,a\n1\n", r"label file \S*l\.csv line 3: expected 2 fields"),
    ("l.csv", "index,label\n0,a\n", r"label file \S*l\.csv lacks columns \['id', 'name'\]"),
    ("l.csv", "id,name\n0, \n", r"label file \S*l\.csv line 2: empty class name"),
])
def test_bad_split_files_are_one_line_errors_naming_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError) as info:
        read_labels_csv(path) if name.endswith(".csv") else read_split_list(path, tmp_path, 3)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------- writers, read back


def read_back(path, root="R"):
    return [(p[len(root) + 1:], label) for p, label in read_split_list(path, root, 1000)]


def test_few_shot_lists_have_k_per_class_from_the_full_list(tmp_path):
    train = full_list([20, 17, 16, 30, 18])
    write_few_shot(tmp_path, train, 5, [2, 4, 8, 16], seed=0)
    for k in (2, 4, 8, 16):
        picked = read_back(tmp_path / f"train1_few_shot_{k}.txt")
        assert Counter(label for _, label in picked) == {c: k for c in range(5)}
        assert len(set(picked)) == len(picked) and set(picked) <= set(train)
    assert "NOT the published splits" in (tmp_path / "README.txt").read_text()


def test_seeds_reproduce_and_differ(tmp_path):
    train = full_list([20] * 6)
    for seed, folder in ((0, "a"), (0, "b"), (1, "c")):
        write_few_shot(tmp_path / folder, train, 6, [4], seed=seed)
    text = {f: (tmp_path / f / "train1_few_shot_4.txt").read_text() for f in "abc"}
    assert text["a"] == text["b"] and text["a"] != text["c"]


def test_too_few_videos_for_k_shots_names_the_class(tmp_path):
    with pytest.raises(DatasetError, match="class 1 has 3 video"):
        write_few_shot(tmp_path, full_list([5, 3, 5]), 3, [4], seed=0)


def test_base_to_novel_partition_is_disjoint_covering_and_by_frequency(tmp_path):
    names = [f"class {c}" for c in range(7)]
    counts = [20, 25, 18, 30, 19, 40, 22]
    train, test = full_list(counts), [(f"test/c{c}/t{i}.mp4", c) for c in range(7) for i in range(3)]
    base, novel = write_base_to_novel(tmp_path, train, test, names, seed=0, shots=16)
    assert base == [1, 3, 5, 6] and novel == [0, 2, 4]  # the 4 = ceil(7/2) most frequent classes are base
    assert not set(base) & set(novel) and sorted(base + novel) == list(range(7))
    base_names, novel_names = read_labels_csv(tmp_path / "base_labels.csv"), read_labels_csv(tmp_path / "novel_labels.csv")
    assert base_names == [names[c] for c in base] and novel_names == [names[c] for c in novel]

    def as_original(path, subset_names):  # (path, label in the full class list) of a written list
        return {(rel, names.index(subset_names[label])) for rel, label in read_back(path)}
    assert as_original(tmp_path / "base_train.txt", base_names) == {s for s in train if s[1] in base}
    assert as_original(tmp_path / "base_val.txt", base_names) == {s for s in test if s[1] in base}
    assert as_original(tmp_path / "novel_val.txt", novel_names) == {s for s in test if s[1] in novel}
    shot_lists = []
    for s in (1, 2, 3):
        picked = read_back(tmp_path / f"fs_base_s{s}_train.txt")
        assert Counter(label for _, label in picked) == {i: 16 for i in range(len(base))}
        assert as_original(tmp_path / f"fs_base_s{s}_train.txt", base_names) <= set(train)
        shot_lists.append(picked)
    assert shot_lists[0] != shot_lists[1] != shot_lists[2]  # a seed each


def test_random_partition_follows_the_seed():
    import random

    train = full_list([10] * 10)
    first = partition_classes(train, 10, "random", random.Random(5))
    assert first == partition_classes(train, 10, "random", random.Random(5))
    assert first != partition_classes(train, 10, "random", random.Random(6))
    assert len(first[0]) == 5 and sorted(first[0] + first[1]) == list(range(10))


def test_k600_writer_three_160_class_splits_of_the_new_classes(tmp_path):
    """A 'Kinetics-600' list over the K400 classes and the 220 new ones (names spelled with other case and
    punctuation): each split holds 160 new classes and exactly their videos."""
    new = load_class_names("kinetics600_new220")
    names = load_class_names("kinetics400")[:50] + [n.upper().replace(" ", "_") for n in new]
    videos = [(f"val/{c}_{i}.mp4", c) for c in range(len(names)) for i in range(2)]
    splits = write_k600_zero_shot(tmp_path, videos, names, new, seed=0)
    assert len(splits) == 3 and len({tuple(s) for s in splits}) == 3
    for n, classes in enumerate(splits, 1):
        labels = read_labels_csv(tmp_path / k600_labels_name(n))
        assert labels == classes and len(labels) == 160 and set(labels) <= set(new)
        assert labels == [c for c in new if c in set(labels)]
        got = {(rel, squeeze(labels[label])) for rel, label in read_back(tmp_path / k600_list_name(n))}
        assert got == {(rel, squeeze(names[c])) for rel, c in videos if squeeze(names[c]) in set(map(squeeze, labels))}
    with pytest.raises(DatasetError, match="lack 1 of the 220"):
        write_k600_zero_shot(tmp_path / "x", [v for v in videos if v[1] < len(names) - 1], names[:-1], new, seed=0)


def test_make_splits_command_writes_from_a_list_file(tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    (tmp_path / "train.txt").write_text("".join(f"v/{c}{i}.mp4 {c}\n" for c in range(3) for i in range(5)))
    out = tmp_path / "fs"
    assert make_splits_main(["few-shot", "--list", str(tmp_path / "train.txt"), "--class-names",
                             str(tmp_path / "classes.txt"), "--shots", "1,3", "--out", str(out)]) == 0
    assert "not the published splits" in capsys.readouterr().out
    picked = read_split_list(out / "train1_few_shot_3.txt", "", 3)
    assert Counter(label for _, label in picked) == {0: 3, 1: 3, 2: 3}
    assert all(rel == f"v/{label}{rel[3]}.mp4" for rel, label in picked)  # relative to the list's folder
    assert make_splits_main(["few-shot", "--list", str(tmp_path / "train.txt"), "--class-names",
                             str(tmp_path / "classes.txt"), "--shots", "6", "--out", str(out)]) == 2
    assert "class 0 has 5 video(s), fewer than 6 shots" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_splits_main(["base-to-novel", "--list", "t.txt", "--class-names", "c.txt", "--out", str(out)])
    assert "--test-list is given for base-to-novel" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("base, novel, expected", [
    (80.0, 60.0, 2 * 80 * 60 / 140), (73.8, 53.3, 61.9), (50.0, 50.0, 50.0), (0.0, 50.0, 0.0), (0.0, 0.0, 0.0),
    (100.0, 0.0, 0.0),
])
def test_harmonic_mean_against_hand_numbers(base, novel, expected):
    # 73.8 / 53.3 -> 61.9: ViFi-CLIP's published HMDB-51 row (HM rounded to one decimal)
    assert harmonic_mean(base, novel) == pytest.approx(expected, abs=0.05 if expected == 61.9 else 1e-12)
    assert harmonic_mean(novel, base) == harmonic_mean(base, novel)


@pytest.mark.parametrize("bad", [(-1.0, 5.0), (5.0, math.nan), (math.inf, 1.0)])
def test_harmonic_mean_refuses_bad_accuracies(bad):
    with pytest.raises(UsageError, match="finite accuracies >= 0"):
        harmonic_mean(*bad)


def test_mean_std_against_hand_numbers():
    mean, std = mean_std([60.0, 62.0, 64.0])
    assert mean == pytest.approx(62.0) and std == pytest.approx(math.sqrt(8 / 3))  # population std
    assert mean_std([41.5]) == (41.5, 0.0)
    summary = split_summary([{"top1": 10.0, "top5": 50.0}, {"top1": 30.0, "top5": 70.0}])
    assert summary == {"top1_mean": 20.0, "top1_std": 10.0, "top5_mean": 60.0, "top5_std": 10.0}
    assert summary["top1_std"] == statistics.pstdev([10.0, 30.0])
    with pytest.raises(UsageError):
        mean_std([])
