"""CPU inference calls side by side (m2clip_fast.cpu_workers.map_on_cores, M2CLIP.inference_workers): which
thread ran which piece with how many torch threads (by hand), what the workers inherit from the caller, the
caller's thread count afterwards, errors, and the model's forwards on several threads at once against one
thread and float64."""
import copy
import threading
import time

import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.cpu_workers import map_on_cores
from m2clip_fast.model import CPU_INFERENCE_TOKENS
from m2clip_fast.tolerance import assert_within_reference_error

CPU = torch.device("cpu")


@pytest.fixture
def threads():
    """Run the test with torch on 4 threads (whatever the machine has), then restore the count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    yield 4
    torch.set_num_threads(saved)


def where(piece):
    """(piece, the thread's name, torch's thread count there)."""
    return piece, threading.current_thread().name, torch.get_num_threads()


def test_pieces_run_in_order_one_worker_per_share_of_threads(threads):
    out = map_on_cores(where, list(range(7)), workers=2)  # 4 threads: 2 workers of 2; 7 = 3 rounds + 1
    assert [piece for piece, _, _ in out] == list(range(7))
    side_by_side, rest = out[:6], out[6:]
    assert all(name.startswith("m2clip-core") and n == 2 for _, name, n in side_by_side)
    assert {name for _, name, _ in side_by_side} == {"m2clip-core_0", "m2clip-core_1"}
    # the odd piece out would leave a worker idle: it runs in the caller, on all of its threads
    assert rest == [(6, threading.current_thread().name, 4)]
    assert torch.get_num_threads() == 4


def test_workers_are_capped_by_pieces_and_threads(threads):
    out = map_on_cores(where, [0, 1, 2], workers=8)  # 3 pieces: 3 workers of 4 // 3 = 1 thread
    assert sorted(n for _, _, n in out) == [1, 1, 1]
    assert len({name for _, name, _ in out}) == 3
    assert map_on_cores(where, [0], workers=8) == [(0, threading.current_thread().name, 4)]
    assert [name for _, name, _ in map_on_cores(where, [0, 1], workers=1)] == [threading.current_thread().name] * 2


def test_threads_started_afterwards_get_the_callers_count(threads):
    map_on_cores(where, [0, 1, 2, 3], workers=4)  # the workers ran single-threaded
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [4] and torch.get_num_threads() == 4


@pytest.mark.parametrize("state", ["no_grad", "grad", "inference_mode", "bf16_autocast"])
def test_workers_inherit_grad_inference_mode_and_autocast(threads, state):
    def modes(_):
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"))

    contexts = {"no_grad": torch.no_grad, "grad": lambda: torch.enable_grad(),
                "inference_mode": torch.inference_mode,
                "bf16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    with contexts[state]():
        here = modes(None)
        there = map_on_cores(modes, [0, 1], workers=2)
    assert there == [here, here]
    assert here[0] == (state in ("grad", "bf16_autocast"))  # the contexts did take effect in the caller


def test_an_error_in_a_piece_is_raised_and_the_rest_cancelled(threads):
    started = []

    def piece(i):
        started.append(i)
        if i == 0:
            raise ValueError("piece 0 is bad")
        time.sleep(0.05)
        return i

    with pytest.raises(ValueError, match="piece 0 is bad"):
        map_on_cores(piece, list(range(40)), workers=2)
    assert len(started) < 40  # pieces queued behind the failure never ran
    assert torch.get_num_threads() == 4


# ---------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("tiny", pretrained=None, class_names=["a", "b", "c"]).eval()
    with torch.no_grad():  # zero-initialised adapter convs would leave the hooks' hand-offs untested
        for p in model.ted_adapters.parameters():
            p.normal_(0, 0.05)
    return model


def test_inference_workers_by_hand(tiny, threads, monkeypatch):
    tokens = tiny.num_frames * (1 + tiny.grid[0] * tiny.grid[1])
    assert tiny.inference_workers(CPU) == 4  # one per torch thread
    assert tiny.inference_clips_per_call(CPU) == CPU_INFERENCE_TOKENS // (tokens * 4)  # the budget is shared
    monkeypatch.setattr(tiny, "cpu_inference_workers", 1)
    assert tiny.inference_workers(CPU) == 1 and tiny.inference_clips_per_call(CPU) == CPU_INFERENCE_TOKENS // tokens
    assert tiny.inference_workers(torch.device("cuda")) == 1
    k400 = create_model("k400_b16_8f", pretrained=None)
    k400.cpu_inference_workers = 2
    assert k400.inference_clips_per_call(CPU) == 1  # 4096 // (2 workers x 8 frames x 197 tokens)


def test_predict_runs_its_calls_on_the_workers(tiny, threads, monkeypatch):
    monkeypatch.setattr(tiny, "cpu_inference_tokens", 4 * tiny.num_frames * 65)  # 4 clips in flight
    monkeypatch.setattr(tiny, "cpu_inference_workers", 2)  # 2 calls of 2 clips side by side, 2 threads each
    calls = []
    hook = tiny.clip.visual.register_forward_hook(
        lambda m, args, out: calls.append((args[0].shape[0] // tiny.num_frames, threading.current_thread().name,
                                           torch.get_num_threads())))
    video = torch.randn(5, tiny.num_frames, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            side_by_side = tiny.predict(video)
        monkeypatch.setattr(tiny, "cpu_inference_workers", 1)
        with torch.no_grad():
            one_by_one = tiny.predict(video)
    finally:
        hook.remove()
    on_workers = sorted(c for c in calls[:3] if c[1].startswith("m2clip-core"))
    assert on_workers == [(2, "m2clip-core_0", 2), (2, "m2clip-core_1", 2)]
    assert (1, threading.current_thread().name, 4) in calls[:3]  # the fifth clip, alone, on all threads
    with torch.no_grad():
        exact = copy.deepcopy(tiny).double().predict(video.double())
    assert_within_reference_error(side_by_side, one_by_one, exact, what="predict with 2 workers")


def test_forwards_on_several_threads_at_once_keep_their_own_hook_state(tiny):
    """The blocks hand their input to the pre-MLP tap and ln_post's input to encode_frames through the module;
    forwards running at once on 3 threads must each see their own. A barrier in the first tapped block's
    attention holds every thread there after its block input was handed over and before the tap reads it, so
    that hand-offs shared between threads would mix, every time."""
    gen = torch.Generator().manual_seed(5)
    videos = [torch.randn(2, tiny.num_frames, 3, 32, 32, generator=gen) for _ in range(3)]
    with torch.no_grad():
        alone = [tiny.encode_frames(v) for v in videos]
        exact = [copy.deepcopy(tiny).double().encode_frames(v.double()) for v in videos]
    barrier = threading.Barrier(3, timeout=60)
    tapped = next(b for b in tiny.clip.visual.transformer.resblocks if b.ls_1 in tiny._vision_taps)

    def wait_for_the_others(module, args):
        barrier.wait()

    hold = tapped.attn.register_forward_pre_hook(wait_for_the_others)
    results, errors = {}, []

    def run(i):
        try:
            with torch.no_grad():
                results[i] = [tiny.encode_frames(videos[i]) for _ in range(3)]
        except BaseException as exc:  # raised below, on the test's thread
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        hold.remove()
    if errors:
        raise errors[0]
    names = ("frames", "pooled")
    for i in range(3):
        for got in results[i]:
            assert_within_reference_error(dict(zip(names, got)), dict(zip(names, alone[i])),
                                          dict(zip(names, exact[i])), what=f"thread {i}'s forward")
    assert_nothing_kept(tiny)


def assert_nothing_kept(model):
    """No thread's hand-off is left on any module."""
    kept = [key for module in model.modules() for key, values in vars(module).items()
            if key.endswith("_per_thread") and values]
    assert not kept, kept


def test_a_forward_that_fails_midway_leaves_nothing_behind(tiny):
    tapped = next(b for b in tiny.clip.visual.transformer.resblocks if b.ls_1 in tiny._vision_taps)
    # the block's pre-hook has handed its input to the tap, which never runs to take it
    fail = tapped.attn.register_forward_pre_hook(lambda module, args: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            tiny.encode_frames(torch.zeros(1, tiny.num_frames, 3, 32, 32))
    finally:
        fail.remove()
    assert_nothing_kept(tiny)
