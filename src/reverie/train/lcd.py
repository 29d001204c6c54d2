"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models", Algorithm 1): turn a trained
Stable-Diffusion-layout model into a Latent Consistency Model, a UNet that takes the guidance scale as an input
(time_cond_proj_dim) and samples in 1-8 steps with the `lcm` sampler, as diffusers'
examples/consistency_distillation/train_lcd_distill_sd_wds.py does.

One training item, in the teacher's variance-preserving space (alphabar_t = schedule.alphas_cumprod[t]):

    n ~ U{0 .. N-1}, t = tau_n (the skipping-step schedule k - 1, 2k - 1, .., T - 1, k = T // N; section 4.3)
    x_t = sqrt(alphabar_t) z + sqrt(1 - alphabar_t) eps           (z: the item's latents)
    w ~ U[w_min, w_max]                                             (section 4.2; guidance scale w + 1)
    x_s = DDIM(x_t, t -> s = max(t - k, 0)) of the teacher's guided prediction, x0 and eps each
          cond + w (cond - uncond)                                  (section 4.2; DDIM: Song et al. 2021, eq. 12)
    loss = d(f_theta(x_t, w, t), f_target(x_s, w, s))               (pseudo-Huber or L2)

with f(x, w, t) = c_skip(t) x + c_out(t) x0_hat(x, t) the consistency function (samplers.solvers.
consistency_scalings) and the target network an EMA of the student (theta^- <- mu theta^- + (1 - mu) theta).
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.unet import UNet, guidance_embedding
from ..samplers.solvers import consistency_scalings
from ..schedules import DiscreteSchedule, lcm_timesteps
from .config import Config
from .optim import StepDraws, mix_seed
from .tasks import Frozen, UNetTask, fingerprint, latent_shape, replace_dir

TIMESTEP_SCALING = 10.0  # LCMScheduler's default: c_skip / c_out see 10 t (the script's --timestep_scaling_factor)
W_STREAM = 0x1CD  # seeds the guidance-scale draws, a stream apart from UNetTask's (index, noise, eps, dropout)


# ------------------------------------------------------------------------------------------------ the math


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *[1] * (like.ndim - 1))


def x0_and_eps(out: Tensor, x_t: Tensor, alphabar: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network's output at x_t = sqrt(a) x0 + sqrt(1 - a) eps (a: alphabar, broadcast
    to x_t); v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    a, s = alphabar.sqrt(), (1 - alphabar).sqrt()
    if prediction == "epsilon":
        return (x_t - s * out) / a, out
    if prediction == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    return out, (x_t - a * out) / s


def ddim_step(x0: Tensor, eps: Tensor, alphabar_prev: Tensor) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0): x_prev = sqrt(a') x0 + sqrt(1 - a') eps."""
    return alphabar_prev.sqrt() * x0 + (1 - alphabar_prev).sqrt() * eps


def guided_ddim_step(x_t: Tensor, out_cond: Tensor, out_uncond: Tensor, w: Tensor, alphabar: Tensor,
                     alphabar_prev: Tensor, prediction: str) -> Tensor:
    """The teacher's guided ODE-solver step of LCD (Luo et al. 2023, section 4.2): DDIM from x_t to the previous
    skipping-step timestep on the guided x0 and eps, each cond + w (cond - uncond) (w broadcast to x_t; guidance
    scale w + 1)."""
    x0_c, eps_c = x0_and_eps(out_cond, x_t, alphabar, prediction)
    x0_u, eps_u = x0_and_eps(out_uncond, x_t, alphabar, prediction)
    return ddim_step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), alphabar_prev)


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """Per-item mean of sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
    Models"): L2 near 0, L1 far from it."""
    return ((diff.float() ** 2 + c**2).sqrt() - c).flatten(1).mean(1)


def skipping_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """(steps,) ascending: the skipping-step schedule k - 1, 2k - 1, .., k = T // steps (Luo et al. 2023, section
    4.3): every timestep the lcm sampler can visit (schedules.lcm_timesteps), so the student trains on those."""
    return torch.from_numpy(lcm_timesteps(steps, num_train_timesteps, steps)[::-1].copy()).long()


def lcm_student(teacher: UNet, w_embedding_dim: int) -> UNet:
    """A copy of the teacher UNet with a guidance-scale input (time_cond_proj_dim = w_embedding_dim): every teacher
    weight, and the new bias-free cond_proj at zero, so the student starts as the teacher for every w. (diffusers'
    script leaves cond_proj at its random init, so its student starts w-dependent.)"""
    student = UNet(dataclasses.replace(teacher.config, time_cond_proj_dim=w_embedding_dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta (Luo et al. 2023, Algorithm 1's last line)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - decay)


class LCDObjective(nn.Module):
    """Per-item LCD loss of a student UNet (trained), its target network (an EMA of it, a frozen submodule so that
    checkpoints keep it) and the frozen teacher (held by reference: in no state dict, shared by the loop's EMA)."""

    def __init__(self, student: UNet, teacher: UNet, schedule: DiscreteSchedule, loss: str = "huber",
                 huber_c: float = 0.001):
        super().__init__()
        self.student, self.teacher = student, Frozen(teacher)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.schedule, self.loss, self.huber_c = schedule, loss, huber_c
        T, self.ddim_steps = schedule.num_train_timesteps, schedule.original_inference_steps
        self.skip = T // self.ddim_steps  # k
        self.timesteps = skipping_timesteps(T, self.ddim_steps)  # (N,)

    def consistency(self, net: UNet, x: Tensor, t: Tensor, alphabar: Tensor, context: Tensor,
                    w_embedding: Tensor) -> Tensor:
        """f(x, w, t) = c_skip(t) x + c_out(t) x0_hat(x, w, t) (Luo et al. 2023, section 4.1)."""
        out = net(x, t, context, timestep_cond=w_embedding)
        x0, _ = x0_and_eps(out, x, alphabar, self.schedule.prediction_type)
        c_skip, c_out = consistency_scalings(t.to(torch.float64), TIMESTEP_SCALING)
        return _bcast(c_skip, x).to(x.dtype) * x + _bcast(c_out, x).to(x.dtype) * x0

    def forward(self, latents: Tensor, index: Tensor, noise: Tensor, w: Tensor, context: Tensor,
                uncond_context: Tensor) -> Tensor:
        """latents, noise (B, C, h, w); index (B,) in [0, N); w (B,) guidance weights; context, uncond_context
        (B, L, D) text states of the captions and of ""."""
        t = self.timesteps.to(latents.device)[index]  # (B,) t_{n+k}
        t_prev = (t - self.skip).clamp(min=0)  # t_n; the first one lands on 0 (diffusers' alpha_cumprods_prev)
        alphabar = self.schedule.alphas_cumprod.to(latents.device)
        a, a_prev = _bcast(alphabar[t], latents), _bcast(alphabar[t_prev], latents)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        w_embedding = guidance_embedding(w, self.student.config.time_cond_proj_dim).to(latents.device)
        online = self.consistency(self.student, x_t, t, a, context, w_embedding)
        with torch.no_grad():
            out = self.teacher.module(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, uncond_context]))
            out_cond, out_uncond = out.chunk(2)
            x_prev = guided_ddim_step(x_t, out_cond, out_uncond, _bcast(w, x_t).to(x_t.dtype), a, a_prev,
                                      self.schedule.prediction_type)
            target = self.consistency(self.target, x_prev, t_prev, a_prev, context, w_embedding)
        diff = online.float() - target.float()
        return pseudo_huber(diff, self.huber_c) if self.loss == "huber" else (diff**2).flatten(1).mean(1)


def lcm_scheduler_config(schedule: DiscreteSchedule) -> dict:
    """The LCMScheduler config of a student distilled on `schedule` (same betas, prediction type and
    original_inference_steps = N)."""
    values = {k: v for k, v in dataclasses.asdict(schedule).items() if v is not None}
    return {"_class_name": "LCMScheduler", **values, "clip_sample": False, "timestep_scaling": TIMESTEP_SCALING}


# ------------------------------------------------------------------------------------------------ the task


class LCMDistillTask(UNetTask):
    """Distil a frozen text-to-image model (model.base_model: its UNet, VAE, text encoder and schedule) into a
    Latent Consistency Model: the student starts as its UNet with a w-embedding input (model.lcm_w_embedding_dim)
    and learns the LCD objective on the data set's images and captions. Exports a diffusers
    LatentConsistencyModelPipeline folder (the loop's EMA of the student; sampler "lcm", 4 steps, guidance 8.5).

    The target network is not the loop's EMA: the loop gives a task no hook after the optimizer step and the
    objective no access to its EMA, and Algorithm 1 wants a fast one (mu = train.lcm_target_decay, 0.95 in the
    script) where the export wants the usual slow average (train.ema_decay). So the objective holds the target and
    the task updates it at the start of each step from the student the previous step left, which is the script's
    update after each optimizer step (a skipped non-finite step still moves the target towards the unchanged
    student). Being in the objective's state dict, it is checkpointed and resumes exactly."""

    kind = "lcm"

    def __init__(self, config: Config, dataset, dist, out_dir: Path, resume: bool):
        self.config, self.dataset, self.dist, self.out_dir = config, dataset, dist, out_dir
        m, device = config.model, dist.device
        teacher, teacher_scheduler = self.frozen_base("an lcm run needs the model it distils")
        if teacher.config.time_cond_proj_dim is not None:
            raise ValueError(f"model.base_model: {m.base_model!r} is already an LCM (its UNet has time_cond_proj_dim="
                             f"{teacher.config.time_cond_proj_dim}); distil a model that takes no guidance input")
        teacher_schedule = DiscreteSchedule.from_config(teacher_scheduler)
        self.scheduler_config = lcm_scheduler_config(teacher_schedule)
        self.schedule = DiscreteSchedule.from_config(self.scheduler_config)
        t = config.train
        student = lcm_student(teacher, m.lcm_w_embedding_dim)
        self.objective = LCDObjective(student, teacher, teacher_schedule, t.lcm_loss, t.lcm_huber_c).to(device)
        self._target_step = None  # the step whose start last updated the target

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.objective.student.parameters()), "lr": self.config.optim.lr}]

    def draw_time(self, draws: StepDraws) -> Tensor:
        """The items' skipping-step indices n (b,), UNetTask.inputs's first draw."""
        return draws.randint(self.objective.ddim_steps)

    def inputs(self, step: int, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        """UNetTask's inputs (latents, noise, the captions' frozen text states; train.cond_dropout empties captions
        as the script's --proportion_empty_prompts) with t the skipping-step index, plus w ~ U[w_min, w_max] and
        the text states of "". The first call of a step first updates the target network."""
        t_cfg = self.config.train
        if step != self._target_step:
            ema_update(self.objective.target, self.objective.student, t_cfg.lcm_target_decay)
            self._target_step = step
        out = super().inputs(step, items)
        out["index"] = out.pop("t")
        slots = [slot for slot, _ in items]
        u = StepDraws(mix_seed(t_cfg.seed, W_STREAM), step, t_cfg.batch_size, slots).rand()
        out["w"] = (t_cfg.lcm_w_min + (t_cfg.lcm_w_max - t_cfg.lcm_w_min) * u).to(self.dist.device)
        empty = [""] * len(items)
        out["uncond_context"] = self._cached_text(empty, self._token_ids(empty))["context"]
        return out

    # --- samples and export ------------------------------------------------------------------------------

    def pipeline(self, ema_objective: LCDObjective):
        from ..pipeline import Pipeline

        return Pipeline(ema_objective.student, self.vae, self.text_encoder, self.schedule, name=self.out_dir.name,
                        device=self.dist.device, scheduler_config=self.scheduler_config)

    def export(self, ema_objective: LCDObjective, path: Path) -> Path:
        """A diffusers LatentConsistencyModelPipeline folder with the EMA student (save_pretrained names that
        pipeline for a UNet with time_cond_proj_dim)."""
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pipeline(ema_objective).save_pretrained(tmp, dtype=getattr(torch, self.config.train.export_dtype))
        replace_dir(tmp, path)
        return path
