"""The training loop shared by every task: AdamW, warmup + cosine LR, EMA, gradient accumulation and clipping,
mixed precision on GPU, DDP, logging, sample grids, atomic checkpoints, exact resume, and the export.

    from reverie.train import load_config, train
    result = train(load_config("configs/shapes_vae.json"), resume=True)

One optimizer step uses `train.batch_size` items in all: the step's slice of the data order is split
DistributedSampler-style over the processes (rank r takes slots r, r + world, ...) and then into
`train.grad_accum` micro-batches. Each micro-batch's loss is sum(per-item loss) * world / batch_size, so that
DDP's gradient average over processes and the sum over micro-batches give the gradient of the mean loss over
the whole batch: one process, N processes and N accumulation steps train the same model.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..formats import load_state_dict_strict
from ..formats.folder import write_json
from .checkpoint import (
    clean_temp,
    flatten_optimizer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer,
)
from .config import Config, config_diff
from .distributed import Dist, setup_distributed
from .log import RunLog
from .optim import EMA, DataOrder, WarmupCosine, mix_seed
from .tasks import TASKS

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient) was non-finite for train.max_nonfinite steps in a row."""


@dataclass
class TrainResult:
    step: int  # the last completed step
    losses: list[tuple[int, float]]  # (step, mean loss over the global batch) for the steps this call ran
    skipped: int  # steps skipped for a non-finite loss or gradient, over the whole run
    output_dir: Path
    checkpoint: Path | None  # the last checkpoint committed
    export: Path | None  # the exported model folder (None if the run stopped early)
    stopped: bool  # stopped before train.steps (stop_at_step or SIGTERM), resumable with resume=True
    state: dict = field(default_factory=dict)  # the trained weights (CPU copies)
    ema_state: dict = field(default_factory=dict)  # their EMA (CPU copies)


class _Stop:
    """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint after the current step and return."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _seed_globals(seed: int, rank: int) -> None:
    """Global RNGs (used only by what the task does not seed itself, e.g. dropout) differ per process."""
    s = mix_seed(seed, 0x61, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def train(config: Config, *, dataset=None, resume: bool | str | Path = False,
          stop_at_step: int | None = None) -> TrainResult:
    """Run (or continue) a training run; returns when train.steps are done or at stop_at_step.

    dataset: a torch Dataset of {"image": (3, H, W) in [-1, 1], "caption": str}; default
    reverie.data.make_dataset(config.data.name, **config.data.options). resume: True continues from the output
    dir's latest checkpoint (starting fresh if there is none), a path from that checkpoint directory."""
    dist = setup_distributed(config.train.device)
    try:
        return _train(config, dataset, resume, stop_at_step, dist)
    finally:
        dist.close()


def _find_checkpoint(resume, ckpt_root: Path, out_dir: Path, log_main: bool) -> Path | None:
    if resume is True:
        found = latest_checkpoint(ckpt_root)
        if found is None and log_main:
            print(f"reverie train: no checkpoint in {ckpt_root}; starting a new run")
        return found
    if resume:
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ValueError(f"resume: {path} is not a checkpoint directory (no state.json)")
        return path
    if list_checkpoints(ckpt_root):
        raise ValueError(f"train.output_dir {str(out_dir)!r} already holds checkpoints; pass --resume to continue "
                         f"that run, or choose another output dir")
    return None


def _train(config: Config, dataset, resume, stop_at_step, dist: Dist) -> TrainResult:
    t, o, lg = config.train, config.optim, config.log
    per_micro, rest = divmod(t.batch_size, dist.world * t.grad_accum)
    if rest or per_micro == 0:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of processes ({dist.world}) x "
                         f"train.grad_accum ({t.grad_accum})")
    out_dir = Path(t.output_dir)
    ckpt_root = out_dir / "checkpoints"
    checkpoint = _find_checkpoint(resume, ckpt_root, out_dir, dist.is_main)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_temp(ckpt_root)
        write_json(out_dir / "config.json", config.to_dict())
    dist.barrier()
    if dataset is None:
        from ..data import make_dataset

        dataset = make_dataset(config.data.name, **config.data.options)

    task = TASKS[config.model.kind](config, dataset, dist, out_dir, resume=checkpoint is not None)
    model = task.objective
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    optimizer = torch.optim.AdamW(task.param_groups(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(o.warmup_steps, t.steps, o.min_lr_ratio))
    amp_dtype = AMP_DTYPES.get(t.mixed_precision) if dist.device.type == "cuda" else None
    if t.mixed_precision != "no" and amp_dtype is None and dist.is_main:
        print(f"reverie train: train.mixed_precision={t.mixed_precision!r} is for GPUs; training in float32 on "
              f"{dist.device.type}")
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(dist.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    state = {"step": 0, "epoch": 0, "index": 0, "skipped": 0, "nonfinite_in_a_row": 0}
    if checkpoint is not None:
        _restore(checkpoint, config, dist, model, ema, optimizer, scheduler, scaler, state)
    else:
        _seed_globals(t.seed, dist.rank)
    ddp = model
    if dist.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda"
                                                  else None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    order = DataOrder(len(dataset), t.seed, config.data.shuffle)
    log = RunLog(out_dir, state["step"], t.steps, enabled=dist.is_main, progress=lg.progress,
                 tensorboard=lg.tensorboard)
    losses, last_checkpoint, stopped = [], checkpoint, False
    model.train()

    def commit(step: int) -> Path | None:
        return _save(ckpt_root, step, config, dist, model, ema, optimizer, scheduler, scaler, state)

    with _Stop() as stop, warnings.catch_warnings():
        # a skipped step still advances the schedule; torch warns when that happens before any optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        while state["step"] < t.steps:
            step = state["step"] + 1
            indices, state["epoch"], state["index"] = order.take(state["epoch"], state["index"], t.batch_size)
            mine = list(range(dist.rank, t.batch_size, dist.world))  # this process's slots of the global batch
            loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
            for a in range(t.grad_accum):
                slots = mine[a * per_micro:(a + 1) * per_micro]
                inputs = task.inputs(step, [(s, indices[s]) for s in slots])
                last = a == t.grad_accum - 1
                with ddp.no_sync() if dist.world > 1 and not last else contextlib.nullcontext():
                    with autocast():
                        per_item = ddp(**inputs)  # (b,)
                    scaler.scale(per_item.float().sum() * (dist.world / t.batch_size)).backward()
                loss_sum += per_item.detach().double().sum()
            totals = dist.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(stop.requested))]))
            loss, stop_requested = totals[0].item() / t.batch_size, totals[1].item() > 0
            lr = optimizer.param_groups[0]["lr"]

            ok, grad_norm, what = math.isfinite(loss), None, "loss"
            if ok:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf))
                if not scaler.is_enabled() and not math.isfinite(grad_norm):  # fp16: the scaler skips such steps
                    ok, what = False, "gradient norm"
            if ok:
                scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale is None or scaler.get_scale() >= scale:  # the scaler did not skip the step
                    ema.update(model)
                state["nonfinite_in_a_row"] = 0
            else:
                state["skipped"] += 1
                state["nonfinite_in_a_row"] += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] = step
            losses.append((step, loss))

            log.step(step, loss, lr)
            if not ok or step % lg.every == 0 or step == t.steps:
                log.row(step=step, epoch=state["epoch"], loss=f"{loss:.6g}", lr=f"{lr:.6g}",
                        grad_norm=None if grad_norm is None else f"{grad_norm:.6g}", skipped=state["skipped"],
                        nonfinite=int(not ok))
            if not ok:
                log.message(f"step {step}: non-finite {what} ({loss if what == 'loss' else grad_norm}); step skipped "
                            f"({state['nonfinite_in_a_row']} in a row, {state['skipped']} in all)")
                if state["nonfinite_in_a_row"] >= t.max_nonfinite:
                    log.close()
                    raise NonFiniteLossError(
                        f"the {what} was non-finite for {state['nonfinite_in_a_row']} steps in a row (steps "
                        f"{step - state['nonfinite_in_a_row'] + 1}..{step}, train.max_nonfinite={t.max_nonfinite}); "
                        f"stopping. The weights are those of step {step - state['nonfinite_in_a_row']}"
                        f"{f'; the last checkpoint is {last_checkpoint}' if last_checkpoint else ''}. "
                        f"Check the data for NaN/inf, or lower optim.lr, or raise optim.warmup_steps.")
            if dist.is_main and lg.sample_every and step % lg.sample_every == 0:
                _sample(task, ema, out_dir, step)
            stopped = stop_requested or (stop_at_step is not None and step >= stop_at_step and step < t.steps)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or stopped:
                last_checkpoint = commit(step) or last_checkpoint
            if stopped:
                log.message(f"stopped at step {step}; continue with --resume")
                break
    log.close()

    export = None
    if not stopped:
        if dist.is_main:
            if not lg.sample_every or state["step"] % lg.sample_every:
                _sample(task, ema, out_dir, state["step"])
            export = task.export(ema.module, out_dir / "model")
        dist.barrier()
    return TrainResult(step=state["step"], losses=losses, skipped=state["skipped"], output_dir=out_dir,
                       checkpoint=last_checkpoint, export=export, stopped=stopped, state=_cpu_state(model),
                       ema_state=_cpu_state(ema.module))


def _sample(task, ema: EMA, out_dir: Path, step: int) -> None:
    """A sample grid from the EMA weights; the global RNG states are left as they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        task.sample(ema.module, out_dir / "samples" / f"step_{step:08d}.png")


def _save(root: Path, step: int, config: Config, dist: Dist, model, ema: EMA, optimizer, scheduler, scaler,
          state: dict) -> Path | None:
    """Commit a checkpoint (rank 0 writes; every rank contributes its RNG states)."""
    gathered = dist.all_gather(rng_state())
    path = None
    if dist.is_main:
        rng_tensors = {f"rank{r}.{k}": v for r, (tensors, _) in enumerate(gathered) for k, v in tensors.items()}
        optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer.state_dict())
        sched = scheduler.state_dict()
        sched.pop("lr_lambdas", None)  # the schedule itself comes from the config
        tensors = {"model": _cpu_state(model), "ema": _cpu_state(ema.module),
                   "optimizer": {k: v.detach().cpu() for k, v in optimizer_tensors.items()}, "rng": rng_tensors}
        meta = dict(state, ema_updates=ema.updates, scheduler=sched, scaler=scaler.state_dict(),
                    optimizer=optimizer_meta, rng={str(r): j for r, (_, j) in enumerate(gathered)},
                    world_size=dist.world, config=config.to_dict())
        path = save_checkpoint(root, step, tensors, meta, config.train.keep_checkpoints)
    dist.barrier()
    return path


def _restore(path: Path, config: Config, dist: Dist, model, ema: EMA, optimizer, scheduler, scaler,
             state: dict) -> None:
    tensors, meta = load_checkpoint_dir(path)
    saved = json.loads(json.dumps(meta["config"]))
    current = json.loads(json.dumps(config.to_dict()))
    if saved["model"] != current["model"]:
        raise ValueError(f"resume: {path} was trained with other model settings "
                         f"({', '.join(k for k in config_diff(saved, current) if k.startswith('model.'))})")
    changed = config_diff(saved, current)
    if changed and dist.is_main:
        print(f"reverie train: resuming {path} with changed settings: {', '.join(changed)}")
    load_state_dict_strict(model, tensors["model"], name="model")
    load_state_dict_strict(ema.module, tensors["ema"], name="ema")
    ema.updates = meta["ema_updates"]
    optimizer.load_state_dict(unflatten_optimizer(tensors["optimizer"], meta["optimizer"]))
    # the schedule's shape (warmup, total steps) comes from this config, so train.steps may be raised on resume
    scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[vars(f) for f in scheduler.lr_lambdas]))
    for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lam(scheduler.last_epoch)  # LambdaLR's formula, with this config's schedule
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    for key in state:
        state[key] = meta[key]
    prefix = f"rank{dist.rank}."
    mine = {k.removeprefix(prefix): v for k, v in tensors["rng"].items() if k.startswith(prefix)}
    if mine and str(dist.rank) in meta["rng"]:
        set_rng_state(mine, meta["rng"][str(dist.rank)])
    else:  # more processes than the run was saved with: a fresh, still deterministic, stream
        _seed_globals(config.train.seed + state["step"], dist.rank)
