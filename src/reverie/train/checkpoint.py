"""Training checkpoints: one directory per step, committed by a single rename, never half-written.

    checkpoints/step_00001000/   model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors
                                 state.json  (step, data position, counters, LR scheduler, GradScaler, optimizer
                                             hyper-parameters, numpy/python RNG states, the run's config)
    checkpoints/latest           "step_00001000", itself replaced atomically

Every file is written into a hidden temp directory and fsynced, then the directory is renamed into place and the
`latest` pointer is updated; older checkpoints are deleted only after that. A crash at any point leaves either
the previous checkpoint or the new one. Tensors go to safetensors and everything else to JSON: no pickles.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from ..formats import load_safetensors, save_safetensors
from ..formats.folder import read_json, write_json

LATEST = "latest"
NAME = re.compile(r"^step_(\d{8,})$")
PARTS = ("model", "ema", "optimizer", "rng")
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (temp directories are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, or (if the pointer is missing or stale) the newest committed one."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if NAME.match(target.name) and target.is_dir():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_temp(root: Path) -> None:
    """Remove what an interrupted save left behind (hidden temp directories and files)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int) -> Path:
    """Commit checkpoint `step` under root (see the module docstring); returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    final = root / name
    try:
        for part, part_tensors in tensors.items():
            save_safetensors(part_tensors, tmp / f"{part}.safetensors")
        write_json(tmp / "state.json", dict(state, format=FORMAT))  # written last: its presence marks a whole set
        _fsync_dir(tmp)
        if final.exists():  # the same step again, after resuming from an earlier checkpoint: move the old one aside
            old = root / f".old-{name}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old)
    return final


def load_checkpoint_dir(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors per part, state) of a committed checkpoint directory."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise ValueError(f"{path}: not a checkpoint directory (no state.json)")
    state = read_json(path / "state.json")
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}; this reverie reads format {FORMAT}")
    tensors = {part: load_safetensors(path / f"{part}.safetensors") for part in PARTS
               if (path / f"{part}.safetensors").is_file()}
    return tensors, state


# --------------------------------------------------------------------------------------------- optimizer


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as (flat tensors "state.<param>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and CUDA), numpy and python RNG states as (tensors, JSON-able)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
