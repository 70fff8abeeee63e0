"""extract: embeddings against encode_video / encode_frames / the heads on hand-decoded views, shards that split a
list and join into one index, resuming (finished parts kept, a torn part redone), unreadable videos as rows."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from m2clip_fast.data import read_list_file
from m2clip_fast.data.synthetic import write_broken_video
from m2clip_fast.extract import main as extract_main, part_ranges, shard_parts
from clip_views import hand_views

FAST = ["--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture()
def listing(synthetic_dataset, tmp_path):
    """The 8 validation videos, then a truncated one and a missing one: 10 rows."""
    write_broken_video(tmp_path / "broken.mp4", "truncated")
    lines = [f"{synthetic_dataset / rel} {label}" for rel, label in
             (line.split() for line in (synthetic_dataset / "val.txt").read_text().splitlines())]
    lines += [f"{tmp_path / 'broken.mp4'} 0", f"{tmp_path / 'missing.mp4'} 1"]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(listing, out, checkpoint, *extra):
    return extract_main(["--list", str(listing), "--out", str(out), "--checkpoint", str(checkpoint),
                         "--part-size", "4", *FAST, *extra])


def read_index(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_embeddings_equal_encode_video_over_views(listing, demo_checkpoint, demo_model, tmp_path):
    out = tmp_path / "emb"
    assert run(listing, out, demo_checkpoint, "--views", "2x3", "--per-frame", "--batch-size", "3") == 0
    parts = [load_file(out / f"part-{k:05d}-of-00003.safetensors") for k in range(3)]
    joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    assert joined["row"].tolist() == list(range(10))
    assert joined["valid"].tolist() == [1] * 8 + [0, 0]
    assert joined["video"][8:].isnan().all() and joined["frames"][8:].isnan().all()
    index = read_index(out / "index.csv")
    assert [int(r["row"]) for r in index] == list(range(10)) and {r["views"] for r in index} == {"2x3"}
    assert [r["status"] for r in index[:8]] == ["ok"] * 8
    assert index[9]["status"] == "file not found" and index[8]["status"] not in ("ok", "")
    text = demo_model.encode_text()
    for row, (path, label) in enumerate(read_list_file(listing)[:8]):
        assert int(index[row]["label"]) == label and index[row]["path"] == path
        views = hand_views(path, 2, 3, demo_model.image_size)  # (6, 4, 3, S, S)
        frames, pooled = demo_model.encode_frames(views)
        torch.testing.assert_close(joined["video"][row], demo_model.encode_video(views).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined["frames"][row], frames, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined["logits_vc"][row], demo_model.vc_head(pooled), atol=1e-4, rtol=1e-5)
        cosine = torch.nn.functional.normalize(frames.mean(1), dim=-1) @ text.T
        torch.testing.assert_close(joined["logits_text"][row], demo_model.logit_scale * cosine, atol=1e-3, rtol=1e-5)


def test_shards_split_the_parts_and_join_one_index(listing, demo_checkpoint, tmp_path, capsys):
    assert [list(shard_parts(5, (i, 3))) for i in range(3)] == [[0], [1, 2], [3, 4]]
    assert part_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    out = tmp_path / "emb"
    assert run(listing, out, demo_checkpoint, "--shard", "1/2") == 0
    assert "other shards' parts still missing" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("part-*.safetensors")) == ["part-00001-of-00003.safetensors",
                                                                      "part-00002-of-00003.safetensors"]
    assert not (out / "index.csv").exists()
    assert run(listing, out, demo_checkpoint, "--shard", "0/2") == 0
    assert [int(r["row"]) for r in read_index(out / "index.csv")] == list(range(10))
    # whole-run numbers must not depend on the sharding: one unsharded run gives the same tensors
    whole = tmp_path / "whole"
    assert run(listing, whole, demo_checkpoint) == 0
    for k in range(3):
        name = f"part-{k:05d}-of-00003.safetensors"
        a, b = load_file(out / name), load_file(whole / name)
        torch.testing.assert_close(a["video"], b["video"], equal_nan=True)


def test_resume_keeps_finished_parts_and_redoes_a_torn_one(listing, demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "emb"
    assert run(listing, out, demo_checkpoint) == 0
    first = {k: v.clone() for k, v in load_file(out / "part-00000-of-00003.safetensors").items()}
    kept = (out / "part-00002-of-00003.safetensors").stat().st_mtime_ns
    torn = out / "part-00000-of-00003.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])  # cut inside the header
    (out / ".part-00001-of-00003.safetensors.x.tmp").write_bytes(b"half")  # a crashed job's temporary file
    (out / "part-00001-of-00003.safetensors").unlink()
    capsys.readouterr()
    assert run(listing, out, demo_checkpoint) == 0
    assert "2 written, 1 already done" in capsys.readouterr().out
    assert (out / "part-00002-of-00003.safetensors").stat().st_mtime_ns == kept
    torch.testing.assert_close(load_file(torn)["video"], first["video"], atol=1e-6, rtol=1e-6)
    assert run(listing, out, demo_checkpoint, "--views", "2x1") == 2  # other settings into the same folder
    assert "other settings (views" in capsys.readouterr().err
    assert json.loads((out / "extract.json").read_text())["views"] == "1x1"
