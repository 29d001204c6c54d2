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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..formats import load_state_dict_strict
from ..formats.folder import write_json
from .checkpoint import (clean_temp, flatten_optimizer, latest_checkpoint, list_checkpoints, load_checkpoint_dir,
                         rng_state, save_checkpoint, set_rng_state, unflatten_optimizer)
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
    export: Path | None  # the exported model folder (None if the run stopped early, and on ranks > 0)
    stopped: bool  # stopped before train.steps (stop_at_step or SIGTERM), resumable with resume=True
    rank: int = 0  # this process's rank (only rank 0 logs, checkpoints and exports)
    state: dict = field(default_factory=dict)  # the trained weights (CPU copies)
    ema_state: dict = field(default_factory=dict)  # their EMA (CPU copies)


@dataclass
class StepReport:
    loss: float  # mean over the global batch
    lr: float  # the learning rate the step used (of the first parameter group)
    ok: bool  # False: non-finite loss or gradient, no optimizer step
    what: str  # what was non-finite: "loss" or "gradient norm"
    grad_norm: float | None  # before clipping (None when the loss was non-finite)
    stop: bool  # some process received SIGTERM: checkpoint and return
    time_up: bool = False  # rank 0's clock passed train.time_limit_minutes: finish (checkpoint, export) here


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _seed_globals(seed: int, rank: int) -> None:
    """Global RNGs (used only by what the task does not seed itself, e.g. dropout) differ per process."""
    s = mix_seed(seed, 0x61, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class Trainer:
    """A run's components (task, EMA, optimizer, LR schedule, GradScaler, counters) and what they do together."""

    def __init__(self, config: Config, dataset, dist: Dist, out_dir: Path, resume: bool):
        t, o = config.train, config.optim
        self.config, self.dist, self.out_dir = config, dist, out_dir
        self.task = TASKS[config.model.kind](config, dataset, dist, out_dir, resume=resume)
        self.model = self.task.objective
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup)
        self.optimizer = torch.optim.AdamW(self.task.param_groups(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           WarmupCosine(o.warmup_steps, t.steps, o.min_lr_ratio))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        amp_dtype = AMP_DTYPES.get(t.mixed_precision) if dist.device.type == "cuda" else None
        if t.mixed_precision != "no" and amp_dtype is None and dist.is_main:
            print(f"reverie train: train.mixed_precision={t.mixed_precision!r} is for GPUs; training in float32 on "
                  f"{dist.device.type}")
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
        self.order = DataOrder(len(dataset), t.seed, config.data.shuffle)
        self.state = {"step": 0, "epoch": 0, "index": 0, "skipped": 0, "nonfinite_in_a_row": 0}
        self.ddp = self.model

    def start(self, checkpoint: Path | None) -> None:
        """Restore a checkpoint (or seed a fresh run), then wrap the model for DDP."""
        if checkpoint is not None:
            self.restore(checkpoint)
        else:
            _seed_globals(self.config.train.seed, self.dist.rank)
        if self.dist.world > 1:
            cuda = self.dist.device.type == "cuda"
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.dist.device] if cuda else None)
        if self.config.train.compile:  # wraps the call only: checkpoints and EMA read self.model's own weights
            self.ddp = torch.compile(self.ddp)
        self.model.train()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def step(self, stop_requested: bool, time_up: bool = False) -> StepReport:
        """One optimizer step on the next `train.batch_size` items (skipped if the loss is non-finite).
        time_up: this process's clock passed the time limit (only rank 0's counts, so all ranks agree)."""
        t, o, dist, state = self.config.train, self.config.optim, self.dist, self.state
        step = state["step"] + 1
        indices, state["epoch"], state["index"] = self.order.take(state["epoch"], state["index"], t.batch_size)
        mine = list(range(dist.rank, t.batch_size, dist.world))  # this process's slots of the global batch
        per_micro = len(mine) // t.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for a in range(t.grad_accum):
            slots = mine[a * per_micro:(a + 1) * per_micro]
            inputs = self.task.inputs(step, [(s, indices[s]) for s in slots])
            last = a == t.grad_accum - 1
            with self.ddp.no_sync() if dist.world > 1 and not last else contextlib.nullcontext():
                with self._autocast():
                    per_item = self.ddp(**inputs)  # (b,)
                self.scaler.scale(per_item.float().sum() * (dist.world / t.batch_size)).backward()
            loss_sum += per_item.detach().double().sum()
        # every process decides alike: on the global loss, on whether any process was asked to stop, and on
        # rank 0's clock
        flags = [float(stop_requested), float(time_up and dist.is_main)]
        totals = dist.all_reduce_sum(torch.stack([loss_sum, *map(loss_sum.new_tensor, flags)]))
        loss_total, stops, times_up = totals.tolist()  # one device-to-host sync, not three
        report = StepReport(loss=loss_total / t.batch_size, lr=self.optimizer.param_groups[0]["lr"], ok=True,
                            what="loss", grad_norm=None, stop=stops > 0, time_up=times_up > 0)
        report.ok = math.isfinite(report.loss)
        if report.ok:
            self.scaler.unscale_(self.optimizer)
            max_norm = o.grad_clip if o.grad_clip > 0 else math.inf
            report.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if not self.scaler.is_enabled() and not math.isfinite(report.grad_norm):  # fp16: the scaler skips
                report.ok, report.what = False, "gradient norm"
        if report.ok:
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale is None or self.scaler.get_scale() >= scale:  # the GradScaler did not skip the step
                self.ema.update(self.model)
            state["nonfinite_in_a_row"] = 0
        else:
            state["skipped"] += 1
            state["nonfinite_in_a_row"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still advances the schedule, so the LR stays a function of step
        state["step"] = step
        return report

    def sample(self) -> None:
        """A sample grid from the EMA weights (rank 0); the global RNG states are left as they were."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []), torch.no_grad():
            self.task.sample(self.ema.module, self.out_dir / "samples" / f"step_{self.state['step']:08d}.png")

    def save(self, root: Path) -> Path | None:
        """Commit a checkpoint: rank 0 writes it; every rank contributes its RNG states."""
        gathered = self.dist.all_gather(rng_state())
        path = None
        if self.dist.is_main:
            rng_tensors = {f"rank{r}.{k}": v for r, (tensors, _) in enumerate(gathered) for k, v in tensors.items()}
            optimizer_tensors, optimizer_meta = flatten_optimizer(self.optimizer.state_dict())
            scheduler = self.scheduler.state_dict()
            scheduler.pop("lr_lambdas", None)  # the schedule's shape comes from the config
            tensors = {"model": _cpu_state(self.model), "ema": _cpu_state(self.ema.module),
                       "optimizer": {k: v.detach().cpu() for k, v in optimizer_tensors.items()}, "rng": rng_tensors}
            meta = dict(self.state, ema_updates=self.ema.updates, scheduler=scheduler,
                        scaler=self.scaler.state_dict(), optimizer=optimizer_meta,
                        rng={str(r): j for r, (_, j) in enumerate(gathered)}, world_size=self.dist.world,
                        config=self.config.to_dict())
            path = save_checkpoint(root, self.state["step"], tensors, meta, self.config.train.keep_checkpoints)
        self.dist.barrier()
        return path

    def restore(self, path: Path) -> None:
        tensors, meta = load_checkpoint_dir(path)
        current = json.loads(json.dumps(self.config.to_dict()))
        # settings added to reverie after the checkpoint was written take their defaults
        defaults = json.loads(json.dumps(Config().to_dict()))
        saved = {section: {**defaults.get(section, {}), **values} for section, values in meta["config"].items()}
        changed = config_diff(saved, current)
        if saved["model"] != current["model"]:
            raise ValueError(f"resume: {path} was trained with other model settings "
                             f"({', '.join(k for k in changed if k.startswith('model.'))})")
        if changed and self.dist.is_main:
            print(f"reverie train: resuming {path} with changed settings: {', '.join(changed)}")
        load_state_dict_strict(self.model, tensors["model"], name="model")
        load_state_dict_strict(self.ema.module, tensors["ema"], name="ema")
        self.ema.updates = meta["ema_updates"]
        self.optimizer.load_state_dict(unflatten_optimizer(tensors["optimizer"], meta["optimizer"]))
        # the schedule's shape (warmup, total steps) comes from this config, so train.steps may grow on resume
        sched = self.scheduler
        sched.load_state_dict(dict(meta["scheduler"], lr_lambdas=[vars(f) for f in sched.lr_lambdas]))
        for group, base, lam in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * lam(sched.last_epoch)  # LambdaLR's own formula
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        for key in self.state:
            self.state[key] = meta[key]
        prefix = f"rank{self.dist.rank}."
        mine = {k.removeprefix(prefix): v for k, v in tensors["rng"].items() if k.startswith(prefix)}
        if mine and str(self.dist.rank) in meta["rng"]:
            set_rng_state(mine, meta["rng"][str(self.dist.rank)])
        else:  # more processes than the run was saved with: a fresh, still deterministic, stream
            _seed_globals(self.config.train.seed + self.state["step"], self.dist.rank)


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


def train(config: Config, *, dataset=None, resume: bool | str | Path = False,
          stop_at_step: int | None = None) -> TrainResult:
    """Run (or continue) a training run; returns when train.steps are done, or after checkpointing at
    stop_at_step or on SIGTERM.

    dataset: a torch Dataset of {"image": (3, H, W) in [-1, 1], "caption": str}; default
    reverie.data.make_dataset(config.data.name, **config.data.options). resume: True continues from the output
    dir's latest checkpoint (a new run if there is none); a path continues from that checkpoint directory."""
    dist = setup_distributed(config.train.device)
    try:
        return _train(config, dataset, resume, stop_at_step, dist)
    finally:
        dist.close()


def _find_checkpoint(resume, ckpt_root: Path, out_dir: Path, is_main: bool) -> Path | None:
    if resume is True:
        found = latest_checkpoint(ckpt_root)
        if found is None and is_main:
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
    t, lg = config.train, config.log
    # the budget counts from here: the data pass and latent cache are part of a lease's time
    deadline = time.monotonic() + 60 * t.time_limit_minutes if t.time_limit_minutes else math.inf
    if t.batch_size % (dist.world * t.grad_accum):
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
    trainer = Trainer(config, dataset, dist, out_dir, resume=checkpoint is not None)
    trainer.start(checkpoint)
    state = trainer.state
    log = RunLog(out_dir, state["step"], t.steps, enabled=dist.is_main, progress=lg.progress,
                 tensorboard=lg.tensorboard)
    losses, last_checkpoint, stopped, time_up = [], checkpoint, False, False
    with _Stop() as stop, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        while state["step"] < t.steps and not stopped and not time_up:
            report = trainer.step(stop.requested, time.monotonic() >= deadline)
            step, time_up = state["step"], report.time_up
            losses.append((step, report.loss))
            log.step(step, report.loss, report.lr)
            if not report.ok or step % lg.every == 0 or step == t.steps:
                log.row(step=step, epoch=state["epoch"], loss=f"{report.loss:.6g}", lr=f"{report.lr:.6g}",
                        grad_norm=None if report.grad_norm is None else f"{report.grad_norm:.6g}",
                        skipped=state["skipped"], nonfinite=int(not report.ok))
            if not report.ok:
                _nonfinite(report, state, t.max_nonfinite, last_checkpoint, log)
            if dist.is_main and lg.sample_every and step % lg.sample_every == 0:
                trainer.sample()
            stopped = report.stop or (stop_at_step is not None and stop_at_step <= step < t.steps)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or stopped or time_up:
                last_checkpoint = trainer.save(ckpt_root) or last_checkpoint
    if stopped:
        log.message(f"stopped at step {state['step']}; continue with --resume")
    elif time_up:
        log.message(f"train.time_limit_minutes={t.time_limit_minutes:g} reached at step {state['step']} of "
                    f"{t.steps}; exporting that step's model")
    log.close()

    export = None
    if not stopped:
        if dist.is_main:  # the model first: it is what the run is for, the grid only shows it
            export = trainer.task.export(trainer.ema.module, out_dir / "model")
            if not lg.sample_every or state["step"] % lg.sample_every:
                trainer.sample()
        dist.barrier()
    return TrainResult(step=state["step"], losses=losses, skipped=state["skipped"], output_dir=out_dir,
                       checkpoint=last_checkpoint, export=export, stopped=stopped, rank=dist.rank,
                       state=_cpu_state(trainer.model), ema_state=_cpu_state(trainer.ema.module))


def _nonfinite(report: StepReport, state: dict, max_nonfinite: int, last_checkpoint, log: RunLog) -> None:
    """Report a skipped step; raise NonFiniteLossError after max_nonfinite in a row."""
    in_a_row, step = state["nonfinite_in_a_row"], state["step"]
    value = report.loss if report.what == "loss" else report.grad_norm
    log.message(f"step {step}: non-finite {report.what} ({value}); step skipped ({in_a_row} in a row, "
                f"{state['skipped']} in all)")
    if in_a_row >= max_nonfinite:
        log.close()
        where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
        raise NonFiniteLossError(
            f"the {report.what} was non-finite for {in_a_row} steps in a row (steps {step - in_a_row + 1}..{step}, "
            f"train.max_nonfinite={max_nonfinite}); stopping. The weights are those of step {step - in_a_row}"
            f"{where}. Check the data for NaN/inf, or lower optim.lr, or raise optim.warmup_steps.")
