"""Writers of real video files in the containers and codecs datasets ship, for the decoder tests.

Everything is encoded here with PyAV's FFmpeg. The one layout FFmpeg's encoders never write is the
DivX/XviD "packed bitstream" of AVIs with B-frames (UCF101, HMDB51): :func:`write_packed_mpeg4_avi`
builds it from the mpeg4 encoder's packets the way XviD's VfW encoder lays them out.
"""
from fractions import Fraction

import av
import numpy as np

from m2clip_fast.data.synthetic import _rgb_to_yuv420p

VOP = b"\x00\x00\x01\xb6"  # MPEG-4 Part 2 frame start code
# the DivX 5 user data that marks a packed bitstream (the trailing 'p'); XviD writes it too when packing
PACKED_USER_DATA = b"\x00\x00\x01\xb2DivX503b1393p"


def vop_types(data: bytes) -> str:
    """The coding types ('I', 'P', 'B', 'S') of the MPEG-4 frames in one packet, in order."""
    types, i = [], data.find(VOP)
    while i >= 0:
        types.append("IPBS"[data[i + 4] >> 6])
        i = data.find(VOP, i + 4)
    return "".join(types)


def yuv_frames(frames, pix_fmt="yuv420p"):
    """PyAV frames of uint8 (T, H, W, 3) RGB ``frames`` in ``pix_fmt``, pts 0, 1, ..."""
    even = frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
    for i, image in enumerate(frames):
        if pix_fmt == "yuv420p" and even:  # the BT.601 matrix decoders assume for untagged video
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(image), format="yuv420p")
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
        frame.pts = i
        yield frame


def mpeg4_packets(frames, *, gop: int, bframes: int, fps: int = 25):
    """The mpeg4 encoder's packets (bytes), in decode order (I P B B P B B ...)."""
    ctx = av.CodecContext.create("mpeg4", "w")
    ctx.height, ctx.width = frames.shape[1:3]
    ctx.pix_fmt, ctx.time_base, ctx.framerate = "yuv420p", Fraction(1, fps), fps
    ctx.gop_size, ctx.max_b_frames, ctx.bit_rate = gop, bframes, 400_000
    packets = []
    for frame in yuv_frames(frames):
        packets += [bytes(p) for p in ctx.encode(frame)]
    return packets + [bytes(p) for p in ctx.encode(None)]


def not_coded_vop(time_increment: int, increment_bits: int) -> bytes:
    """A 7-byte N-VOP (vop_coded = 0), as XviD writes: a P-VOP header, stuffing, a stuffing byte."""
    bits = "01" + "0" + "1" + format(time_increment, f"0{increment_bits}b") + "1" + "0"
    bits += "0" + "1" * (-(len(bits) + 1) % 8)  # next_start_code() stuffing
    return VOP + int(bits, 2).to_bytes(len(bits) // 8, "big") + b"\x7f"


def pack_bframes(packets, fps: int = 25):
    """XviD's packed layout of decode-order packets: each reference frame shares its chunk with the
    first B-frame that follows it, the other B-frames keep theirs, and a 7-byte N-VOP placeholder
    closes each B-frame run (one chunk per frame, as AVI needs). Returns [(bytes, is_keyframe)]."""
    bits = max(1, (fps - 1).bit_length())  # vop_time_increment_resolution = fps
    chunks, i = [], 0
    while i < len(packets):
        data, kind = packets[i], vop_types(packets[i])[0]
        if kind == "I":  # the user data goes with the headers, before the frame
            at = data.find(VOP)
            data = data[:at] + PACKED_USER_DATA + data[at:]
        run = []
        i += 1
        while i < len(packets) and vop_types(packets[i])[0] == "B":
            run.append(packets[i])
            i += 1
        if run:
            chunks.append((data + run[0], kind == "I"))
            chunks += [(b, False) for b in run[1:]]
            chunks.append((not_coded_vop(len(chunks) % fps, bits), False))
        else:
            chunks.append((data, kind == "I"))
    return chunks


def write_chunks(path, chunks, *, width: int, height: int, tag: str, fps: int = 25):
    """An AVI holding ``chunks`` ([(bytes, is_keyframe)]) as the mpeg4 video stream, codec tag ``tag``."""
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.codec_tag = width, height, tag
        for n, (data, key) in enumerate(chunks):
            packet = av.Packet(data)
            packet.pts = packet.dts = n
            packet.time_base, packet.is_keyframe, packet.stream = Fraction(1, fps), key, stream
            out.mux(packet)
    return path


def write_packed_mpeg4_avi(path, frames, *, tag: str = "XVID", gop: int = 12, bframes: int = 2):
    """A DivX/XviD-style AVI with packed B-frames and N-VOP placeholders (see :func:`pack_bframes`)."""
    chunks = pack_bframes(mpeg4_packets(frames, gop=gop, bframes=bframes))
    return write_chunks(path, chunks, width=frames.shape[2], height=frames.shape[1], tag=tag)


def write_mpeg4_avi_with_dropped_frames(path, frames, *, gop: int = 12, every: int = 7):
    """An unpacked MPEG-4 AVI (no B-frames) where an N-VOP chunk follows every ``every``-th frame: XviD's
    'drop frame' for a frame the encoder skipped. The decoder outputs nothing for it."""
    chunks = []
    for n, data in enumerate(mpeg4_packets(frames, gop=gop, bframes=0)):
        chunks.append((data, vop_types(data)[0] == "I"))
        if n % every == every - 1:
            chunks.append((not_coded_vop(len(chunks) % 25, 5), False))
    return write_chunks(path, chunks, width=frames.shape[2], height=frames.shape[1], tag="XVID")


def write_encoded(path, frames, encoder: str, *, fmt=None, gop: int = 12, pix_fmt: str = "yuv420p",
                  options=None, bframes=None, pts=None, time_base=None, codec_tag=None):
    """Encode ``frames`` (uint8 (T, H, W, 3)) with ``encoder`` into ``path`` (container ``fmt``, else
    from the suffix). ``pts``: per-frame timestamps in ``time_base`` (a variable frame rate)."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(encoder, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        if codec_tag is not None:
            stream.codec_tag = codec_tag
        stream.options = dict(options or {})
        for i, frame in enumerate(yuv_frames(frames, pix_fmt)):
            frame.pts = i if pts is None else int(pts[i])
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def remux(src, dst, *, shift=0, empty_pts=()):
    """Stream-copy ``src``'s video to ``dst``, timestamps moved back by ``shift`` (time-base units);
    the packets with pts in ``empty_pts`` are written as empty chunks (an AVI's dropped frames)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        ostream = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            if packet.pts in empty_pts:
                empty = av.Packet(b"")
                empty.pts, empty.dts, empty.time_base = packet.pts, packet.dts, packet.time_base
                packet = empty
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = ostream
            out.mux(packet)
    return dst


def packets(path):
    """[(pts, dts, size, is_keyframe)] of the first video stream's packets, in demux order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(p.pts, p.dts, p.size, p.is_keyframe) for p in container.demux(stream) if p.size]


def plain_decode(path):
    """The reference: uint8 (N, H, W, 3), every frame of a plain in-order decode, and their pts."""
    with av.open(str(path)) as container:
        decoded = list(container.decode(container.streams.video[0]))
    return np.stack([f.to_ndarray(format="rgb24") for f in decoded]), [f.pts for f in decoded]
