"""Annotation readers on arbitrary bytes: every outcome is samples ``(str, int >= 0)`` or a DatasetError (one
line per problem, naming the file) — never another exception type. A bounded number of inputs per run."""
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2clip_fast.data import DatasetError
from m2clip_fast.data.datasets import read_annotations, read_class_names

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# text near the formats (separators, quotes, digits of other scripts, a BOM) and raw bytes
PIECES = st.sampled_from(["a/x.mp4", " ", "\t", "\n", ",", '"', "0", "1", "12", "-1", "0_1", "\u0663", "\u00b2",
                          "inf", "nan", "\ufeff", "label,youtube_id,time_start,time_end,split\n", "[", "]", "{",
                          "}", '"id"', ":", '"template"', "Jump", "Pushing [something]", "\x00", "\u00e9"])
TEXT = st.lists(PIECES, max_size=40).map("".join)
DATA = st.one_of(TEXT.map(lambda t: t.encode("utf-8")), st.binary(max_size=200),
                 TEXT.map(lambda t: t.encode("latin-1", errors="replace")))
CLASSES = ["Jump", "Pushing something", "run"]


def outcome(name: str, data: bytes, reader):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        (Path(tmp) / "classInd.txt").write_bytes(data if name.startswith("trainlist") else b"1 Jump\n2 run\n")
        try:
            samples = reader(path)
        except DatasetError as exc:
            assert str(path.name) in str(exc) or "classInd" in str(exc) or tmp in str(exc), str(exc)
            return
        assert all(isinstance(p, str) and isinstance(label, int) and label >= 0 for p, label in samples)


@FUZZ
@given(DATA, st.sampled_from(["train.txt", "k400.csv", "ssv2.json", "trainlist01.txt", "testlist01.txt"]))
def test_annotation_readers_fail_only_with_dataset_errors(data, name):
    outcome(name, data, lambda path: read_annotations(path, path.parent, CLASSES, train=True))


@FUZZ
@given(DATA)
def test_class_name_reader_fails_only_with_dataset_errors(data):
    outcome("classes.txt", data, lambda path: [(n, 0) for n in read_class_names(path)])
