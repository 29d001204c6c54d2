"""Videos as files: MP4 (H.264), GIF, animated WebP or a folder of PNG frames, each with its parameters.

save_video(frames, path, fps=..., params=...) picks the format by the path:
    clip.mp4                 H.264 in yuv420p (what browsers and Windows play), through PyAV (the "video" extra)
    clip.gif                 256 colours per frame (Pillow), the parameters in the comment extension
    clip.webp                animated WebP, lossless: the frames come back exactly
    clip/ or clip            a folder of PNG frames clip/frame_0000.png, ... (no suffix: a folder)
    clip/f_%04d.png          PNG frames named by the one printf field (ffmpeg's image2 convention)
Every PNG frame carries its parameters as reverie.metadata writes them (A1111 "parameters" and reverie's JSON);
MP4, GIF and WebP get a JSON side-car `<file name>.json` (clip.mp4.json). Files appear whole or not at all:
each is written to a temp file beside it and renamed into place once every file of the video is encoded.
read_video(path) reads any of them back as PIL frames. Conventions: /work/shared/reference/video.md section 5.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = (".mp4", ".gif", ".webp")
FOLDER_PATTERN = "frame_%04d.png"  # a folder's frame names
CRF = 18  # x264's constant rate factor: 18 is near visually lossless (23 is x264's default; 0 plays black)
GIF_MAX_FPS = 50  # GIF delays are in 1/100 s, and browsers slow delays under 2/100 s down to 1/10 s
_FIELD = re.compile(r"%(0?\d*)d")
PYAV_MISSING = 'MP4 needs PyAV: pip install -e ".[video]" (or write .gif, .webp or PNG frames)'


def has_pyav() -> bool:
    """Whether PyAV (the "video" extra) is installed, i.e. whether .mp4 can be written and read."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _av():
    try:
        import av
    except ImportError:
        raise ImportError(PYAV_MISSING) from None
    return av


# --- checking the request -----------------------------------------------------------------------------------


def check_fps(fps, kind: str | None = None) -> float:
    """fps, checked: a number > 0, and at most GIF_MAX_FPS for kind "gif"."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a number > 0 (frames per second, e.g. 16 for Wan 2.1); got {fps!r}")
    if kind == "gif" and fps > GIF_MAX_FPS:
        raise ValueError(f"fps: a GIF plays at most {GIF_MAX_FPS} fps (delays in 1/100 s; browsers slow shorter "
                         f"ones to 1/10 s); got {fps} (write .mp4 or .webp)")
    return fps


def video_format(path) -> str:
    """"mp4", "gif", "webp" or "png" (PNG frames: a folder, or a .png path with a %d field) for a path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        return suffix[1:]
    if path.is_dir() or not suffix or (suffix == ".png" and path.name.count("%") == 1 and _FIELD.search(path.name)):
        return "png"
    raise ValueError(f"path: a video is written as .mp4, .gif, .webp, a folder of PNG frames (no suffix) or a "
                     f"PNG pattern like clip/frame_%04d.png; got {str(path)!r}")


def _rgb_frames(frames) -> list[Image.Image]:
    if not isinstance(frames, (list, tuple)) or not frames or not all(isinstance(f, Image.Image) for f in frames):
        raise ValueError("frames must be a non-empty list of PIL images (a GenerationResult's frames[i])")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"frames must all have one size; got {sorted(sizes)}")
    return [f if f.mode == "RGB" else f.convert("RGB") for f in frames]


def durations(n: int, fps: float, ticks_per_second: int) -> list[int]:
    """Each frame's delay in whole ticks, frame i lasting from round(i / fps) to round((i + 1) / fps) ticks:
    the delays average 1 / fps exactly, with no drift however long the clip (16 fps in ms: 62, 63, 62, 63)."""
    ends = [round((i + 1) * ticks_per_second / fps) for i in range(n)]
    return [b - a for a, b in zip([0, *ends], ends)]


def _check_mp4(size: tuple[int, int]) -> None:
    """PyAV there, and an even size: odd sizes are refused, not padded, so the file keeps the frames' size."""
    _av()
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"frames: H.264 in yuv420p needs an even width and height; got {size[0]}x{size[1]} "
                         f"(crop or pad the frames, or write .gif, .webp or PNG frames)")


def _record(params, fps, n: int) -> dict:
    """The JSON a video carries: one video's parameters (reverie.metadata.image_params) with fps and frames."""
    from .metadata import _version, image_params

    return {**image_params(params), "fps": fps, "num_frames": n, "reverie_version": _version()}


# --- encoders: each writes one file to the path it is given -------------------------------------------------


def _write_mp4(frames, tmp, fps, record) -> None:
    """H.264 yuv420p at CRF 18, moov atom first (faststart) so it streams; JSON params in comment/description."""
    av = _av()
    width, height = frames[0].size
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        if record is not None:
            container.metadata["comment"] = container.metadata["description"] = json.dumps(record, sort_keys=True)
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(CRF)}
        for frame in frames:  # rgb24 -> yuv420p by swscale (BT.601, limited range, untagged)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_gif(frames, tmp, fps, record) -> None:
    """Pillow's save_all, delays in 1/100 s (GIF's unit), loop 0 (forever), the JSON in the comment extension."""
    extra = {"comment": json.dumps(record, sort_keys=True).encode()} if record is not None else {}
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0, optimize=False,
                   duration=[10 * d for d in durations(len(frames), fps, 100)], **extra)


def _write_webp(frames, tmp, fps, record) -> None:
    """Animated WebP, lossless (every frame comes back exactly), delays in ms, loop 0."""
    frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:], loop=0, lossless=True,
                   duration=durations(len(frames), fps, 1000))


ENCODERS = {"mp4": _write_mp4, "gif": _write_gif, "webp": _write_webp}


# --- writing and reading ------------------------------------------------------------------------------------


def _frame_paths(path: Path, n: int) -> tuple[Path, list[Path]]:
    """(the pattern, every frame's path) for PNG frames at a folder or a %d pattern."""
    pattern = path if path.suffix.lower() == ".png" else path / FOLDER_PATTERN
    return pattern, [pattern.with_name(pattern.name % i) for i in range(n)]


def _pattern_regex(pattern: Path) -> re.Pattern:
    """A regex matching the file names a %d pattern makes, the frame index in group 1."""
    head, tail = _FIELD.split(pattern.name, maxsplit=1)[0::2]
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def _write_all(writers: dict) -> None:
    """Call each writer(temp_path) on a temp file beside its path and fsync it; only when every one succeeded,
    rename each temp file over its path (os.replace: atomic). On any error the temp files go, so an encoder or
    disk failure leaves every path as it was."""
    temps = {path: path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") for path in writers}
    try:
        for path, write in writers.items():
            write(temps[path])
            with open(temps[path], "rb+") as f:
                os.fsync(f.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def save_video(frames, path, *, fps, params=None) -> Path:
    """Write frames (PIL images of one size) as a video at `path`, its format by the suffix (see the module
    docstring), playing at `fps` frames per second. params: one video's generation parameters (a
    GenerationResult's params of one video, or image_params(result.params, i)); they go, with fps and the frame
    count, into every PNG frame, the GIF comment and MP4 tags, and a side-car `<name>.json` beside .mp4, .gif
    and .webp. GIF and WebP encoders merge identical consecutive frames into one longer frame. Returns path."""
    path = Path(path)
    kind = video_format(path)
    fps, frames = check_fps(fps, kind), _rgb_frames(frames)
    if kind == "mp4":
        _check_mp4(frames[0].size)
    record = _record(params, fps, len(frames)) if params is not None else None
    if kind == "png":
        return _save_frames(frames, path, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    writers = {path: lambda tmp: ENCODERS[kind](frames, tmp, fps, record)}
    if record is not None:
        writers[path.with_name(path.name + ".json")] = \
            lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _write_all(writers)
    return path


def _save_frames(frames, path: Path, record) -> Path:
    """PNG frames with their parameters (reverie.metadata.png_bytes, the frame's index under "frame"); frames of
    an earlier, longer clip under the same names are removed, so the folder holds this clip alone."""
    from .metadata import png_bytes

    pattern, paths = _frame_paths(path, len(frames))
    made = not pattern.parent.exists()
    pattern.parent.mkdir(parents=True, exist_ok=True)
    data = [png_bytes(f, record | {"frame": i}) if record is not None else _png(f)
            for i, f in enumerate(frames)]
    try:
        _write_all({p: (lambda tmp, d=d: Path(tmp).write_bytes(d)) for p, d in zip(paths, data)})
    except BaseException:
        if made:
            pattern.parent.rmdir()
        raise
    names = _pattern_regex(pattern)
    for old in pattern.parent.iterdir():
        match = names.fullmatch(old.name)
        if match and int(match.group(1)) >= len(frames) and old.name == pattern.name % int(match.group(1)):
            old.unlink()
    return path


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_video(path) -> list[Image.Image]:
    """The frames of a video save_video wrote (or any GIF, WebP, MP4 or numbered PNGs) as RGB PIL images; GIF
    and WebP frames keep their delay in frame.info["duration"] (ms)."""
    path = Path(path)
    kind = video_format(path)
    if kind == "mp4":
        with _av().open(str(path)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    if kind == "png":
        pattern, _ = _frame_paths(path, 0)
        names = _pattern_regex(pattern)
        found = sorted((int(m.group(1)), p) for p in pattern.parent.iterdir() if (m := names.fullmatch(p.name)))
        if not found:
            raise ValueError(f"path: no frames matching {pattern.name!r} in {str(pattern.parent)!r}")
        return [_load_rgb(p) for _, p in found]
    out = []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            im.load()  # WebP sets this frame's duration as it decodes it
            frame = im.convert("RGB")
            frame.info["duration"] = im.info.get("duration")
            out.append(frame)
    return out


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
