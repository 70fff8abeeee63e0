"""Test helper: test views of a video sampled and transformed here by hand, the independent expectation that
predict, extract, export and the report are checked against."""
import torch

from m2clip_fast.data import decode_all_frames, transforms


def hand_views(path, num_clips, num_crops, size, start=0, stop=None, frames=4, stride=1):
    """(V, frames, 3, size, size): dense test clips (``frames`` frames ``stride`` apart) spread evenly over frames
    [start, stop), written out from the sampling rule rather than through the library's sampler."""
    video = decode_all_frames(path)
    stop = len(video) if stop is None else stop
    slack = max(stop - start - (frames - 1) * stride - 1, 0)  # the last start at which a whole clip fits
    if num_clips == 1:
        starts = [slack // 2]
    else:
        starts = [round(c * slack / (num_clips - 1)) for c in range(num_clips)]
    views = []
    for s in starts:
        idx = [start + min(s + t * stride, stop - start - 1) for t in range(frames)]
        views.append(transforms.test_transform(video[idx], size=size, num_crops=num_crops))
    return torch.cat(views)
