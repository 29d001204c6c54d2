"""Safe tensor I/O: validated safetensors reads, atomic writes, pickle only on request, strict loads.

The safetensors layout (huggingface/safetensors README): 8 bytes little-endian u64 N, N bytes of
UTF-8 JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the
raw little-endian C-order data; offsets are relative to the data and tile it exactly. We check all of
that ourselves before the library allocates anything, so a bad file fails with a message that names
the file and the entry, not with an opaque error or an out-of-memory.
"""

import json
import math
import os
import secrets
import struct
from pathlib import Path

import safetensors
import safetensors.torch
import torch

DTYPE_SIZES = {  # safetensors dtype name -> bytes per element (only those torch can hold)
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MIN_PICKLE_TORCH = (2, 10)  # weights_only unpickler RCEs: CVE-2025-32434 (< 2.6), CVE-2026-24747 (< 2.10)
MAX_TENSORS = 100_000  # an SD checkpoint with EMA has ~2.5k; more is a header-bloat DoS, not a model


class FormatError(ValueError):
    """A checkpoint file or folder is malformed or refused; the message names the file and the problem."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shortlist(items: list, limit: int = 10) -> str:
    """The first `limit` items and how many more: error messages stay readable for 1000 bad keys."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: the safetensors spec forbids duplicate names, and so do we."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r} in JSON header")
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path, max_header_bytes: int = 100 * 2**20, max_tensors: int = MAX_TENSORS) -> dict:
    """Validate a safetensors file's header without reading its data; return {name: entry, "__metadata__": {...}}.

    Checks the header length against the bound and the file size, the JSON, every entry's dtype, shape and
    data_offsets, and that the entries tile the data exactly (no overlap, no gap, nothing past the end).
    """
    path = Path(path)
    size = path.stat().st_size

    def fail(problem: str):
        raise FormatError(f"{path}: {problem}")

    if size < 8:
        fail(f"truncated: {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > max_header_bytes:
            fail(f"header length {n} bytes exceeds the bound max_header_bytes={max_header_bytes}")
        if n > size - 8:
            fail(f"truncated or corrupted: header length {n} bytes but only {size - 8} bytes follow")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, FormatError; deep nesting
        fail(f"corrupted JSON header: {e}")

    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail("__metadata__ must map strings to strings")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > max_tensors:
        fail(f"{len(entries)} tensors exceed the bound max_tensors={max_tensors}")

    data_len = size - 8 - n
    spans = []
    for name, info in entries.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            fail(f"tensor {name!r}: entry must have dtype, shape and data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            fail(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            fail(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            fail(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        if end > data_len:
            fail(f"tensor {name!r}: data_offsets {offsets} run past the end of the data ({data_len} bytes)")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            fail(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes "
                 f"but data_offsets {offsets} span {end - begin}")
        spans.append((begin, end, name))

    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {previous!r}")
        if begin > position:
            fail(f"bytes {position}..{begin} of the data belong to no tensor (before {name!r})")
        position, previous = end, name
    if position != data_len:
        fail(f"{data_len - position} trailing bytes after the last tensor")
    return header


def load_safetensors(path, device: str = "cpu", max_header_bytes: int = 100 * 2**20,
                     max_tensors: int = MAX_TENSORS) -> dict[str, torch.Tensor]:
    """Load a .safetensors file after validating its header (see read_safetensors_header)."""
    read_safetensors_header(path, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except safetensors.SafetensorError as e:  # e.g. the file changed between the check and the load
        raise FormatError(f"{path}: {e}") from e


def _atomic_write(path, write) -> Path:
    """Call write(temp_path) on a temp file beside `path`, fsync it, then rename it over `path`.

    Readers see the old file or the whole new one, never half of one; on any error the temp file goes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, like open()
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _prepare_for_save(tensors: dict) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors with no two sharing storage (tied weights are cloned)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_safetensors: entry {name!r} must be str -> Tensor, got {type(t).__name__}")
        t = t.detach()
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a .safetensors file atomically (temp file, fsync, rename)."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"save_safetensors({path}): metadata must map str to str (safetensors spec)")
    prepared = _prepare_for_save(tensors)
    return _atomic_write(path, lambda tmp: safetensors.torch.save_file(prepared, str(tmp), metadata=metadata))


def _load_pickle(path: Path) -> dict:
    """torch.load restricted to tensors and containers; never falls back to full unpickling."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < MIN_PICKLE_TORCH:
        raise FormatError(f"{path}: loading pickles needs torch >= {'.'.join(map(str, MIN_PICKLE_TORCH))} "
                          f"(weights_only unpickler bugs allow code execution before), found {torch.__version__}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for broken archives
        raise FormatError(f"{path}: torch.load(weights_only=True) refused the file: {e}. It may hold training "
                          f"state (e.g. Lightning callbacks); convert it to safetensors in a sandbox.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # LDM/Lightning checkpoints: {"state_dict": ..., "global_step": ...}
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise FormatError(f"{path}: {_plural(len(bad), 'entry')} that are not tensors: {_shortlist(bad)}")
    return obj


def load_checkpoint(path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a flat state dict from .safetensors, or from a pickle (.ckpt/.pt/.pth/.bin) only if allow_pickle."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(f"{path}: refusing to load a pickle ({suffix}): unpickling can run arbitrary code "
                              f"hidden in the file. Prefer a .safetensors copy; if you trust this file, pass "
                              f"allow_pickle=True (loads with torch.load(weights_only=True) only).")
        return _load_pickle(path)
    raise FormatError(f"{path}: unknown checkpoint extension {path.suffix!r}; allowed: "
                      f"{SAFETENSORS_SUFFIX}, or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "integer"


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, *, name: str = "model") -> None:
    """Copy state_dict into module, or raise listing every missing/unexpected/mis-shaped key and touch nothing.

    Values are cast to each parameter's dtype and device; a float never silently lands in an integer buffer.
    """
    own = module.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    wrong, kinds = [], []
    for key in sorted(own.keys() & state_dict.keys()):
        value, target = state_dict[key], own[key]
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key} (not a tensor: {type(value).__name__})")
        elif value.shape != target.shape:
            wrong.append(f"{key} (file {tuple(value.shape)} vs {name} {tuple(target.shape)})")
        elif _kind(value.dtype) != _kind(target.dtype):
            kinds.append(f"{key} (file {value.dtype} vs {name} {target.dtype})")
    problems = [f"{_plural(len(items), label)}: {_shortlist(items)}" for label, items in
                (("missing key", missing), ("unexpected key", unexpected), ("wrong shape", wrong),
                 ("incompatible dtype", kinds)) if items]
    if problems:
        raise ValueError(f"cannot load state dict into {name} (left unchanged): " + "; ".join(problems))
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state_dict[key])
