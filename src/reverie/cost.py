"""What a generation costs on a machine, from throughput measured on that machine.

    latency(sampler, steps) = fixed + evaluations(sampler, steps) * eval

- evaluations are counted, not looked up: count_evaluations runs the sampler on a closed-form denoiser and
  counts its calls (heun and dpmpp_sde make 2 a step but 1 on the last, the others 1). With classifier-free
  guidance reverie makes one call with the batch doubled (cond and uncond together), so an evaluation is one
  network forward either way; what guidance costs is in `eval`, measured with guidance on.
- eval and fixed are measured on the real pipeline (calibrate): euler at two step counts, the network forwards
  counted with a hook; eval = dT / dN and fixed = T - N * eval (text encoding, VAE decode, safety check,
  set-up). A table for another machine takes figures measured there (a saved Calibration, or given numbers):
  nothing is assumed that was not measured or given.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .schedules import DiscreteSchedule
from .samplers import SAMPLERS, resolve

STEPS = (5, 10, 20, 30, 50)


@dataclass
class Calibration:
    """Measured (or given) cost of one generation of `batch_size` images on one machine."""

    machine: str  # where the figures come from, in words
    eval_s: float  # seconds per denoiser evaluation (one network forward of the batch, CFG included)
    fixed_s: float  # seconds per generation besides the evaluations
    batch_size: int = 1  # images per generation
    model: str = ""  # what was measured: model, size, guidance
    how: str = "given"  # how the figures were obtained

    def __post_init__(self):
        for name in ("eval_s", "fixed_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0; got {value!r}")
        if self.eval_s == 0 and self.fixed_s == 0:
            raise ValueError("eval_s and fixed_s: at least one must be > 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {self.batch_size!r}")

    def latency(self, evaluations: int) -> float:
        """Seconds for one generation of batch_size images."""
        return self.fixed_s + evaluations * self.eval_s

    def save(self, path) -> None:
        from .formats.folder import write_json

        write_json(path, asdict(self))

    @classmethod
    def load(cls, path) -> Calibration:
        from .formats.folder import read_json

        data = read_json(path)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"calibration {path}: unknown field {unknown[0]!r}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        for name in ("machine", "eval_s", "fixed_s"):
            if name not in data:
                raise ValueError(f"calibration {path}: missing field {name!r}")
        return cls(**data)


def count_evaluations(sampler: str, steps: int, schedule, scheduler: str | None = None) -> int:
    """Denoiser calls `sampler` makes in `steps` steps on `schedule` (a DiscreteSchedule or a flow model's
    FlowSchedule), counted by running it on the closed-form denoiser of N(0, 1) data: E[x0 | x] = x / (1 + sigma^2)
    for x = x0 + sigma eps, and (1 - t) x / ((1 - t)^2 + t^2) for the flow x = (1 - t) x0 + t eps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    choice = resolve(sampler, scheduler)
    flow = not isinstance(schedule, DiscreteSchedule)
    if not flow and choice.family == "flow":
        raise ValueError(f"sampler {sampler!r} is for flow-matching models; this model is a DDPM model")
    sigmas = schedule.sigmas_for(choice, steps) if flow else schedule.sampling_sigmas(steps, choice.schedule,
                                                                                       choice.family)
    calls = 0

    def denoiser(x, sigma):
        nonlocal calls
        calls += 1
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return (1 - s) * x / ((1 - s) ** 2 + s**2) if flow else x / (1 + s**2)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, 2, 2), generator=generator, dtype=torch.float64)
    if flow:
        from .flow import sample

        sample(choice, denoiser, x, sigmas.double(), generator=generator)
    else:
        choice(denoiser, x * sigmas[0].item(), sigmas.double(), generator=generator)
    return calls


def ddpm_samplers() -> list[str]:
    """reverie's samplers for DDPM-style (not flow-matching) models."""
    return [name for name, fn in SAMPLERS.items() if fn.family != "flow"]


def samplers_for(schedule) -> list[str]:
    """reverie's samplers that run on a model with this schedule (DDPM or flow)."""
    if isinstance(schedule, DiscreteSchedule):
        return ddpm_samplers()
    from .flow import flow_samplers

    return flow_samplers()


def machine_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} {device.type}, {torch.get_num_threads()} threads"


def calibrate(pipe, *, batch_size: int = 1, width: int | None = None, height: int | None = None,
              guidance_scale: float = 7.5, steps: tuple[int, int] = (2, 10), repeats: int = 3,
              clock=time.perf_counter, prompt: str = "a red circle above a blue square") -> Calibration:
    """Measure eval_s and fixed_s on `pipe`: euler at steps[0] and steps[1] (after one warm-up run), the median of
    `repeats` timings each, network forwards counted by a hook on pipe.network (the UNet or transformer). clock() -> seconds (inject a fake
    one to test); CUDA work is synchronised before each reading."""
    lo, hi = steps
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo < hi):
        raise ValueError(f"steps must be two integers 1 <= a < b; got {steps!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1; got {repeats!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    def timed(n: int) -> tuple[float, int]:
        nonlocal forwards
        forwards = 0
        sync()
        start = clock()
        pipe([prompt] * batch_size, steps=n, guidance_scale=guidance_scale, sampler="euler", width=width,
             height=height, seed=list(range(batch_size)), progress=False)
        sync()
        return clock() - start, forwards

    hook = pipe.network.register_forward_pre_hook(count)
    try:
        timed(lo)  # warm-up: first-call allocations and caches
        runs = {n: [timed(n) for _ in range(repeats)] for n in (lo, hi)}
    finally:
        hook.remove()
    t_lo, t_hi = (statistics.median(t for t, _ in runs[n]) for n in (lo, hi))
    n_lo, n_hi = runs[lo][0][1], runs[hi][0][1]
    if n_hi <= n_lo:
        raise ValueError(f"calibration: counted {n_lo} and {n_hi} network forwards at {lo} and {hi} steps; "
                         f"expected more at more steps")
    eval_s = max(0.0, (t_hi - t_lo) / (n_hi - n_lo))
    fixed_s = max(0.0, t_lo - n_lo * eval_s)  # timing noise can push a tiny fixed cost below 0
    size = f"{width or pipe.default_size}x{height or pipe.default_size}"
    return Calibration(machine_name(pipe.device), eval_s, fixed_s, batch_size,
                       model=f"{pipe.name} {size}, guidance {guidance_scale}, {str(pipe.dtype).removeprefix('torch.')}",
                       how=f"measured: euler at {lo} and {hi} steps ({n_lo} and {n_hi} forwards), median of {repeats}")


def table(calibration: Calibration, schedule, samplers=None, steps=STEPS, price_per_hour: float | None = None):
    """Rows {sampler, steps, evaluations, latency_s (per generation), image_s (per image), images_per_hour,
    cost_per_1000 (None without a price)}."""
    if price_per_hour is not None and (isinstance(price_per_hour, bool) or not isinstance(price_per_hour, (int, float))
                                       or not math.isfinite(price_per_hour) or price_per_hour <= 0):
        raise ValueError(f"price_per_hour must be a finite number > 0; got {price_per_hour!r}")
    rows = []
    for sampler in samplers or samplers_for(schedule):
        for n in steps:
            evaluations = count_evaluations(sampler, n, schedule)
            latency = calibration.latency(evaluations)
            per_hour = 3600 * calibration.batch_size / latency
            rows.append({"sampler": sampler, "steps": n, "evaluations": evaluations, "latency_s": latency,
                         "image_s": latency / calibration.batch_size, "images_per_hour": per_hour,
                         "cost_per_1000": price_per_hour * 1000 / per_hour if price_per_hour else None})
    return rows


def format_table(rows, calibration: Calibration, price_per_hour: float | None = None) -> str:
    """The table as text, headed by where its figures come from."""
    head = [f"machine: {calibration.machine}",
            f"model:   {calibration.model or 'not given'}; batch of {calibration.batch_size}",
            (f"figures: 1 evaluation = {calibration.eval_s * 1e3:.2f} ms, fixed = {calibration.fixed_s * 1e3:.1f} ms "
             f"per generation ({calibration.how})")]
    price = f"$/1000 @ ${price_per_hour:g}/h" if price_per_hour else "$/1000 (give --price-per-hour)"
    lines = [f"{'sampler':16s} {'steps':>5s} {'evals':>5s} {'s/image':>9s} {'images/h':>10s} {price:>22s}"]
    for r in rows:
        cost = f"{r['cost_per_1000']:.4f}" if r["cost_per_1000"] is not None else "-"
        lines.append(f"{r['sampler']:16s} {r['steps']:5d} {r['evaluations']:5d} {r['image_s']:9.4f} "
                     f"{r['images_per_hour']:10.0f} {cost:>22s}")
    return "\n".join(head + [""] + lines)


def check(pipe, calibration: Calibration, schedule, sampler: str = "heun", steps: int = 10,
          guidance_scale: float = 7.5, width=None, height=None, clock=time.perf_counter) -> tuple[float, float]:
    """(predicted, measured) seconds for one generation with another sampler: the model's own test."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    predicted = calibration.latency(count_evaluations(sampler, steps, schedule))
    sync()
    start = clock()
    pipe(["a red circle above a blue square"] * calibration.batch_size, steps=steps, guidance_scale=guidance_scale,
         sampler=sampler, width=width, height=height, seed=list(range(calibration.batch_size)), progress=False)
    sync()
    return predicted, clock() - start


def schedule_of(path):
    """The schedule of a model (DiscreteSchedule, or FlowSchedule for SD3 / FLUX) from its scheduler config; no
    weights are read. Single files: SD 1/2's implied schedule, or the flow one their keys imply."""
    from . import families
    from .formats import read_safetensors_header
    from .formats.folder import read_json
    from .loading import SD_SCHEDULER

    path = Path(path)
    if path.is_dir():
        return families.family_of_folder(path).schedule(read_json(path / "scheduler" / "scheduler_config.json"))
    family = families.family_of_checkpoint(dict.fromkeys(read_safetensors_header(path))) \
        if path.suffix == ".safetensors" else families.get("sd")
    if family.schedule_kind == "vp":
        return family.schedule(dict(SD_SCHEDULER))
    from .single_files import default_scheduler_config

    header = read_safetensors_header(path)
    shapes = {k: torch.empty(e["shape"], device="meta") for k, e in header.items() if k != "__metadata__"}
    return family.schedule(default_scheduler_config(family, shapes))


def parse_list(text: str, name: str, kind=str) -> list:
    """"5,10,20" -> [5, 10, 20]; errors name the option."""
    try:
        items = [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s; got {text!r}") from None
    if not items:
        raise ValueError(f"{name} must not be empty")
    return items
