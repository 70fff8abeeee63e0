import json
import os
import re

import pytest

from m2clip_fast.data import (
    DatasetError,
    check_samples,
    read_class_names,
    read_hmdb51,
    read_kinetics_csv,
    read_list_file,
    read_ssv2_json,
    read_ucf101,
)
from m2clip_fast.data.datasets import official_split, read_split_file


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_load_class_names(tmp_path):
    assert read_class_names(write(tmp_path / "c.txt", " abseiling \nair drumming\n\n\n")) == ["abseiling", "air drumming"]
    with pytest.raises(DatasetError, match="line 2: empty class name"):
        read_class_names(write(tmp_path / "gap.txt", "a\n\nb\n"))
    with pytest.raises(DatasetError) as info:
        read_class_names(write(tmp_path / "dup.txt", "a\nb\na\nb\n"))
    assert len(info.value.problems) == 2 and "duplicate class name 'a' (first on line 1)" in str(info.value)
    with pytest.raises(DatasetError, match="no class names"):
        read_class_names(write(tmp_path / "empty.txt", "\n"))
    with pytest.raises(DatasetError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


def test_read_list_file_splits_on_last_whitespace(tmp_path):
    lst = write(tmp_path / "lists" / "train.txt", "a/x.mp4 3\nfolder with space/my clip.mp4\t12\n\n")
    assert read_list_file(lst, "/data") == [("/data/a/x.mp4", 3), ("/data/folder with space/my clip.mp4", 12)]
    assert read_list_file(lst)[0] == (str(tmp_path / "lists" / "a/x.mp4"), 3)
    bad = write(tmp_path / "bad.txt", "ok.mp4 1\nnolabel.mp4\nx.mp4 cat\n")
    with pytest.raises(DatasetError) as info:
        read_list_file(bad, "/d")
    assert info.value.problems == ["line 2: expected 'path label', got 'nolabel.mp4'",
                                   "line 3: label 'cat' is not an integer (digits 0-9 only)"]


KINETICS_CSV = """label,youtube_id,time_start,time_end,split
air drumming,--nQbRBEz2s,104,114,train
abseiling,-3B32lodo2M,59,69,train
air drumming,abc,7,17,val
"""


@pytest.mark.parametrize("layout", ["per_label_spaces", "per_label_underscores", "flat"])
def test_read_kinetics_csv_layouts(tmp_path, layout):
    csv_path = write(tmp_path / "train.csv", KINETICS_CSV)
    classes = write(tmp_path / "classes.txt", "abseiling\nair drumming\n")
    root = tmp_path / "videos"
    folder = {"per_label_spaces": "air drumming/", "per_label_underscores": "air_drumming/", "flat": ""}[layout]
    touch(root / f"{folder}--nQbRBEz2s_000104_000114.mp4")
    samples = read_kinetics_csv(csv_path, root, classes, split="train")
    expected_first = str(root / f"{folder}--nQbRBEz2s_000104_000114.mp4")
    assert samples[0] == (expected_first, 1)
    second_folder = "" if layout == "flat" else "abseiling/"  # no folder on disk: the label itself
    assert samples[1] == (str(root / f"{second_folder}-3B32lodo2M_000059_000069.mp4"), 0)
    assert len(samples) == 2
    assert len(read_kinetics_csv(csv_path, root, classes)) == 3


def test_read_kinetics_csv_errors_and_default_classes(tmp_path):
    csv_path = write(tmp_path / "k.csv", KINETICS_CSV + "zumba,zz,1,11,train\nabseiling,yy,x,11,train\n")
    with pytest.raises(DatasetError) as info:
        read_kinetics_csv(csv_path, tmp_path, ["abseiling", "air drumming"])
    assert info.value.problems == ["line 5: unknown class 'zumba'", "line 6: bad time_start/time_end 'x', '11'"]
    good = write(tmp_path / "g.csv", KINETICS_CSV)
    assert [s[1] for s in read_kinetics_csv(good, tmp_path)] == [1, 0, 1]  # sorted labels
    with pytest.raises(DatasetError, match="lacks columns"):
        read_kinetics_csv(write(tmp_path / "c.csv", "label,id\na,b\n"), tmp_path)


def test_read_kinetics_csv_short_rows_and_binary_files(tmp_path):
    """A partly downloaded CSV (a row cut short) names the line; a binary file says it is not text."""
    cut = write(tmp_path / "cut.csv", KINETICS_CSV + "\nabseiling,zz,1\nabseiling\n")
    with pytest.raises(DatasetError) as info:
        read_kinetics_csv(cut, tmp_path, ["abseiling", "air drumming"])
    assert [p.split(":")[0] for p in info.value.problems] == ["line 6", "line 7"]  # line 5 is blank
    assert "expected 5 fields (label,youtube_id,time_start,time_end,split), got 3" in info.value.problems[0]
    binary = touch(tmp_path / "binary.csv", b"label,youtube_id\n\xff\xfe\x00junk")
    with pytest.raises(DatasetError, match=r"binary.csv is not UTF-8 text \(byte 0xff at offset 17\)"):
        read_kinetics_csv(binary, tmp_path)


def test_read_ssv2_json(tmp_path):
    entries = [
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "bottle"]},
        {"id": "42326", "template": "Bending [something] so that it deforms"},
    ]
    ann = write(tmp_path / "train.json", json.dumps(entries))
    labels = write(tmp_path / "labels.json", json.dumps({"Bending something so that it deforms": "7",
                                                         "Holding something next to something": "30"}))
    assert read_ssv2_json(ann, "/v", labels) == [("/v/78687.webm", 30), ("/v/42326.webm", 7)]
    assert [s[1] for s in read_ssv2_json(ann, "/v")] == [1, 0]  # sorted templates
    bad = write(tmp_path / "bad.json", json.dumps(entries + [{"id": "1", "template": "Poking [x] nowhere"}, {"id": "2"}]))
    with pytest.raises(DatasetError) as info:
        read_ssv2_json(bad, "/v", labels)
    assert len(info.value.problems) == 2
    assert "unknown class 'Poking x nowhere'" in info.value.problems[0]
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_ssv2_json(write(tmp_path / "broken.json", "[{"), "/v")


def test_read_ucf101(tmp_path):
    split = tmp_path / "ucfTrainTestlist"
    write(split / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 HandstandPushups\n")
    write(split / "trainlist01.txt", "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\n"
                                     "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\n")
    write(split / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
                                    "handstandpushups/v_HandStandPushups_g01_c01.avi\n")
    assert read_ucf101(split, "/u", split=1, train=True) == [
        ("/u/ApplyLipstick/v_ApplyLipstick_g08_c01.avi", 1),
        ("/u/HandstandPushups/v_HandStandPushups_g08_c01.avi", 2),
    ]
    assert [s[1] for s in read_ucf101(split, "/u", split=1, train=False)] == [0, 2]
    write(split / "trainlist02.txt", "ApplyLipstick/v_a.avi 1\nNope/v_b.avi 2\n")
    with pytest.raises(DatasetError) as info:
        read_ucf101(split, "/u", split=2, train=True)
    assert len(info.value.problems) == 2 and "disagrees with folder 'ApplyLipstick'" in info.value.problems[0]


def test_read_hmdb51(tmp_path):
    split = tmp_path / "splits"
    write(split / "brush_hair_test_split1.txt", "a.avi 1\nb.avi 2\nc.avi 0\n")
    write(split / "cartwheel_test_split1.txt", "d.avi 2 \ne.avi 1\n")
    write(split / "cartwheel_test_split2.txt", "d.avi 1\n")
    assert read_hmdb51(split, "/h", split=1, train=True) == [("/h/brush_hair/a.avi", 0), ("/h/cartwheel/e.avi", 1)]
    assert read_hmdb51(split, "/h", split=1, train=False) == [("/h/brush_hair/b.avi", 0), ("/h/cartwheel/d.avi", 1)]
    assert read_hmdb51(split, "/h", split=2, train=True, class_names=["x", "cartwheel"]) == [("/h/cartwheel/d.avi", 1)]
    write(split / "cartwheel_test_split3.txt", "d.avi 5\n")
    with pytest.raises(DatasetError, match="expected 'video.avi 0|1|2'"):
        read_hmdb51(split, "/h", split=3)


def test_check_samples_reports_everything_at_once(tmp_path):
    good = touch(tmp_path / "good.mp4")
    empty = touch(tmp_path / "empty.mp4", b"")
    missing = [str(tmp_path / f"missing{i}.mp4") for i in range(25)]
    samples = [(str(good), 0), (str(empty), 1)] + [(m, 0) for m in missing] + [(str(good), 5), (str(good), -1)]
    with pytest.raises(DatasetError) as info:
        check_samples(samples, num_classes=3, what="training list t.txt")
    problems = info.value.problems
    assert len(problems) == 2 + 25  # two bad labels, 25 missing files (the empty file is the loader's to replace)
    assert problems[0].endswith("label 5 not in [0, 3)") and problems[1].endswith("label -1 not in [0, 3)")
    assert str(info.value).startswith("training list t.txt: 27 problem(s)")
    assert "... and 7 more" in str(info.value) and "25 missing file(s): --skip-missing" in str(info.value)

    ok_labels = [s for s in samples if 0 <= s[1] < 3]
    kept, dropped = check_samples(ok_labels, 3, skip_missing=True)
    assert kept == [(str(good), 0), (str(empty), 1)]
    assert [d["path"] for d in dropped] == missing and {d["reason"] for d in dropped} == {"file not found"}
    with pytest.raises(DatasetError, match="label 5"):
        check_samples([(str(good), 5)], 3, skip_missing=True)
    assert check_samples([(str(good), 2)], 3) == ([(str(good), 2)], [])
    assert os.path.exists(good)


@pytest.mark.parametrize("skip_missing", [False, True])
def test_check_samples_names_the_root_when_no_file_exists(tmp_path, skip_missing):
    samples = [(str(tmp_path / f"v{i}.mp4"), 0) for i in range(3)]
    with pytest.raises(DatasetError, match=f"none of the 3 listed files exists under {tmp_path}: is the data root"):
        check_samples(samples, 1, skip_missing=skip_missing, root=tmp_path)
    with pytest.raises(DatasetError, match="validation list v.txt: no samples"):
        check_samples([], 1, what="validation list v.txt")


def test_official_split_files_are_recognised_by_name(tmp_path):
    assert official_split("a/trainlist02.txt") == ("ucf101", 2) and official_split("testlist03.txt") == ("ucf101", 3)
    assert official_split("s/brush_hair_test_split1.txt") == ("hmdb51", 1)
    for name in ("train.txt", "trainlist04.txt", "mytrainlist01.txt", "trainlist01.csv", "brush_hair_split1.txt"):
        assert official_split(name) is None, name

    split = tmp_path / "ucfTrainTestlist"
    write(split / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    write(split / "trainlist01.txt", "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\n")
    write(split / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    names = ["apply eye makeup", "apply_lipstick"]  # spelt otherwise: compared without case and punctuation
    # the name, not which list it is given as, decides train or test rows
    assert read_split_file(split / "trainlist01.txt", "/u", train=False, class_names=names) == [
        ("/u/ApplyLipstick/v_ApplyLipstick_g08_c01.avi", 1)]
    assert read_split_file(split / "testlist01.txt", "/u", train=True) == [
        ("/u/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0)]
    with pytest.raises(DatasetError, match="label 0: classInd.txt has 'ApplyEyeMakeup', the class names have 'Archery'"):
        read_split_file(split / "trainlist01.txt", "/u", train=True, class_names=["Archery", "ApplyLipstick"])
    with pytest.raises(DatasetError, match="classInd.txt lists 2 classes, the class names 3"):
        read_split_file(split / "trainlist01.txt", "/u", train=True, class_names=names + ["x"])
    write(tmp_path / "lonely" / "trainlist01.txt", "A/v.avi 1\n")
    with pytest.raises(DatasetError, match="no classInd.txt next to it"):
        read_split_file(tmp_path / "lonely" / "trainlist01.txt", "/u", train=True)

    hmdb = tmp_path / "hmdb"
    write(hmdb / "brush_hair_test_split1.txt", "a.avi 1\nb.avi 2\n")
    write(hmdb / "cartwheel_test_split1.txt", "c.avi 2\nd.avi 1\n")
    # any one class's file stands for the whole split; train/test come from the caller
    assert read_split_file(hmdb / "cartwheel_test_split1.txt", "/h", train=True) == [
        ("/h/brush_hair/a.avi", 0), ("/h/cartwheel/d.avi", 1)]
    assert read_split_file(hmdb / "brush_hair_test_split1.txt", "/h", train=False) == [
        ("/h/brush_hair/b.avi", 0), ("/h/cartwheel/c.avi", 1)]


def test_a_list_of_another_format_under_an_official_name_is_explained(tmp_path):
    """A user's own mmaction2 list that happens to be named trainlist01.txt (beside a classInd.txt) or
    *_test_split1.txt is read as the official split file; the error says that the name chose the reader."""
    ucf = tmp_path / "ucf"
    write(ucf / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    write(ucf / "trainlist01.txt", "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 1\n")  # labels from 0
    with pytest.raises(DatasetError) as info:
        read_split_file(ucf / "trainlist01.txt", "/u", train=True, class_names=["ApplyEyeMakeup", "ApplyLipstick"])
    assert info.value.problems == ["trainlist01.txt line 1: label 1 disagrees with folder 'ApplyLipstick' (class 2)"]
    assert (f"{ucf / 'trainlist01.txt'} was read as an official UCF101 split file" in str(info.value)
            and "because of its name" in str(info.value) and "must be named otherwise" in str(info.value))

    write(tmp_path / "mine" / "my_test_split1.txt", "videos/a.mp4 0\nvideos/b.mp4 5\n")
    with pytest.raises(DatasetError) as info:
        read_split_file(tmp_path / "mine" / "my_test_split1.txt", "/m", train=True, class_names=["a", "b"])
    assert info.value.problems == ["split file for unknown class 'my'"]
    assert "was read as an official HMDB51 split file" in str(info.value)


BOM = "\ufeff"


def test_a_byte_order_mark_is_not_part_of_the_first_entry(tmp_path):
    lst = write(tmp_path / "train.txt", BOM + "a/x.mp4 3\nb/y.mp4 1\n")
    assert read_list_file(lst, "/d") == [("/d/a/x.mp4", 3), ("/d/b/y.mp4", 1)]
    names = write(tmp_path / "classes.txt", BOM + "jump\nrun\n")
    assert read_class_names(names) == ["jump", "run"]
    touch(tmp_path / "k" / "jump" / "abc_000001_000011.mp4")
    csv_file = write(tmp_path / "k.csv", BOM + "label,youtube_id,time_start,time_end,split\njump,abc,1,11,train\n")
    assert read_kinetics_csv(csv_file, tmp_path / "k", ["jump", "run"]) == [
        (str(tmp_path / "k" / "jump" / "abc_000001_000011.mp4"), 0)]
    ssv2 = write(tmp_path / "s.json", BOM + json.dumps([{"id": "7", "template": "Pushing [something]"}]))
    assert read_ssv2_json(ssv2, "/v", {"Pushing something": 4}) == [("/v/7.webm", 4)]


@pytest.mark.parametrize("label", ["0_1", "\u0663", "\u00b2", "+1", "-1", "1.0", "0x1"])
def test_labels_are_plain_ascii_digits(tmp_path, label):
    lst = write(tmp_path / "train.txt", f"a.mp4 0\nb.mp4 {label}\n")
    with pytest.raises(DatasetError, match="(?s)train.txt: 1 problem.*" + re.escape(f"line 2: label {label!r} is not an integer")):
        read_list_file(lst)


def test_a_path_listed_with_two_labels_is_an_error(tmp_path):
    files = [str(touch(tmp_path / f"{c}.mp4")) for c in "ab"]
    kept, _ = check_samples([(files[0], 1), (files[1], 0), (files[0], 1)], 3)  # the same label twice: kept
    assert len(kept) == 3
    with pytest.raises(DatasetError, match=f"{files[0]}: listed with label 1 and again with label 2"):
        check_samples([(files[0], 1), (files[1], 0), (files[0], 2)], 3, what="list t.txt")


def test_csv_errors_name_the_file_and_line(tmp_path):
    header = "label,youtube_id,time_start,time_end,split\n"
    runaway = write(tmp_path / "big.csv", header + "jump,abc,1,11,train\n" + 'jump,"' + "x" * 140_000 + "\n")
    with pytest.raises(DatasetError, match=r"big\.csv line \d+: not readable as CSV \(field larger than field limit"):
        read_kinetics_csv(runaway, tmp_path, ["jump"])
    inf = write(tmp_path / "inf.csv", header + "jump,abc,inf,11,train\njump,abd,1,nan,train\n")
    with pytest.raises(DatasetError, match=r"(?s)inf\.csv: 2 problem.*line 2: bad time_start.*'inf'.*line 3"):
        read_kinetics_csv(inf, tmp_path, ["jump"])


def test_json_errors_are_dataset_errors(tmp_path):
    deep = write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=r"deep\.json: nested too deeply"):
        read_ssv2_json(deep, tmp_path)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "1", "template": "Caf\xe9 [something]"}]'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.json is not UTF-8 text \(byte 0xe9 at offset 29\)"):
        read_ssv2_json(latin, tmp_path)
    labels = write(tmp_path / "labels.json", json.dumps({"Pushing something": "x1"}))
    with pytest.raises(DatasetError, match=r"(?s)labels\.json: 1 problem.*'Pushing something': index 'x1'"):
        read_ssv2_json(write(tmp_path / "a.json", "[]"), tmp_path, labels)


def test_class_ind_numbers_are_plain_and_unique(tmp_path):
    split = tmp_path / "splits"
    write(split / "classInd.txt", "1 Jump\n\u00b2 Run\n")
    write(split / "trainlist01.txt", "Jump/v_a.avi 1\n")
    with pytest.raises(DatasetError, match=r"classInd\.txt line 2: expected 'number ClassName'.*'\u00b2 Run'"):
        read_ucf101(split, tmp_path)
    write(split / "classInd.txt", "1 Jump\n2 Run\n2 Swim\n")
    with pytest.raises(DatasetError, match=r"classInd\.txt line 3: number 2 already used on line 2"):
        read_ucf101(split, tmp_path)
