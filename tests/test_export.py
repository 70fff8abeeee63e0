"""export: the ONNX video graph against model.predict (fused kernels) on decoded real views at two batch sizes,
the text encoder ONNX with a zero-shot prompt ensemble built outside it against encode_text, the .pt2 program,
and a frame size the backbone cannot take."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2clip_fast.data import read_list_file
from m2clip_fast.export import main as export_main
from m2clip_fast.text import ZERO_SHOT_TEMPLATES
from clip_views import hand_views

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert export_main(["--checkpoint", str(demo_checkpoint), "--out", str(out / "model.onnx"), "--text-out",
                        str(out / "text.onnx"), "--pt2", str(out / "model.pt2"), "--batch", "2"]) == 0
    return out


@pytest.mark.slow  # the shared export takes ~30 s
def test_video_graph_equals_pytorch_on_real_views(exported, synthetic_dataset, demo_model):
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["fused", "vc", "text"]
    paths = [p for p, _ in read_list_file(synthetic_dataset / "val.txt")]
    for batch in (paths[:3], paths[3:4]):  # the batch axis is dynamic: 3, then 1
        video = torch.cat([hand_views(p, 1, 1, demo_model.image_size) for p in batch])
        expected = demo_model.predict(video)
        got = dict(zip(("fused", "vc", "text"), session.run(None, {"video": video.numpy()})))
        for head, probs in got.items():
            assert probs.shape == (len(batch), len(demo_model.class_names))
            np.testing.assert_allclose(probs, expected[head].numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow  # the shared export takes ~30 s
def test_text_graph_gives_zero_shot_class_embeddings(exported, demo_model):
    classes = ["juggling", "a bar moving left", "surfing"]
    session = ort.InferenceSession(str(exported / "text.onnx"), providers=["CPUExecutionProvider"])
    per_template = [session.run(None, {"tokens": demo_model.prompts(classes, t).tokens.numpy()})[0]
                    for t in ZERO_SHOT_TEMPLATES]
    ensemble = F.normalize(torch.from_numpy(np.mean(per_template, axis=0)), dim=-1)  # as encode_text ensembles
    torch.testing.assert_close(ensemble, demo_model.encode_text(classes, ZERO_SHOT_TEMPLATES), atol=1e-5, rtol=0)


@pytest.mark.slow  # the shared export takes ~30 s
def test_pt2_program_runs(exported, demo_model):
    program = torch.export.load(str(exported / "model.pt2"))
    size = demo_model.image_size
    video = torch.randn(3, demo_model.num_frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    fused, vc, text = program.module()(video)
    expected = demo_model.predict(video)
    torch.testing.assert_close(fused, expected["fused"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text, expected["text"], atol=1e-5, rtol=0)


def test_a_frame_size_the_backbone_cannot_take_is_refused(demo_checkpoint, tmp_path, capsys):
    assert export_main(["--checkpoint", str(demo_checkpoint), "--out", str(tmp_path / "m.onnx"),
                        "--size", "32"]) == 2
    assert "takes 64px frames" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
