"""Test helper: the synthetic training videos laid out as UCF101 (ROOT/Class/v_Class_gNN_c01.mp4)."""
from pathlib import Path
from typing import List, Tuple

# the synthetic classes (classes.txt order) as UCF101 spells class folders
CAMEL = ["MovingLeft", "MovingRight", "MovingUp", "MovingDown", "RotatingClockwise", "RotatingAnticlockwise",
         "Growing", "Shrinking"]


def ucf_videos(dataset: Path, root: Path) -> List[Tuple[str, int]]:
    """Copy ``dataset``'s training videos to ``root``; returns ``("Class/v_Class_gNN_c01.mp4", label)`` per
    video, in the order of train.txt (labels from 0, as in classes.txt)."""
    entries = []
    for n, line in enumerate((dataset / "train.txt").read_text().splitlines()):
        rel, label = line.rsplit(None, 1)
        cls = CAMEL[int(label)]
        (root / cls).mkdir(parents=True, exist_ok=True)
        name = f"v_{cls}_g{n:02d}_c01.mp4"
        (root / cls / name).write_bytes((dataset / rel).read_bytes())
        entries.append((f"{cls}/{name}", int(label)))
    return entries


def write_class_ind(split_dir: Path) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CAMEL)))
