"""What a run trains: the VAE, or a latent denoiser (with its text encoder, jointly or frozen).

A task builds the modules, turns data-set items into the inputs of one micro-batch, and knows how to draw a
sample grid and export the result. The trained modules sit in one `objective` module whose forward returns the
per-item loss, so the loop can wrap it in DistributedDataParallel and average it without knowing what it is.

Every random quantity of a step (posterior sample, timestep, noise, offset noise, caption dropout) is drawn for the
whole global batch at once and each item takes its slot's row (optim.StepDraws), so a batch gives the same numbers
however it is split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from ..denoisers import DiscreteDenoiser, FlowDenoiser
from ..eval.plot import image_grid as grid
from ..formats import (
    load_safetensors,
    load_state_dict_strict,
    load_weights,
    read_config,
    save_component,
    save_safetensors,
)
from ..models.unet import UNET_PRESETS, UNet
from ..models.vae import VAE_PRESETS, AutoencoderKL
from ..schedules import DiscreteSchedule
from .checkpoint import latest_checkpoint
from .config import Config
from .optim import StepDraws, mix_seed

WEIGHTS = "diffusion_pytorch_model.safetensors"
ENCODE_CHUNK = 16  # images per VAE forward when caching latents (fixed, so the cache is the same every time)
TEXT_CACHE = 4096  # captions whose frozen-encoder states a run keeps (UNetTask._cached_text)


# ------------------------------------------------------------------------------------------------ objectives


class VAEObjective(nn.Module):
    """Per-item autoencoder loss: mean pixel error (L1 or L2) of a reconstruction from a posterior sample, plus
    kl_weight * KL(q(z|x) || N(0, I)) / pixels. LDM sums both terms over pixels (Rombach et al. 2022, appendix G);
    dividing both by the pixel count keeps its kl_weight (1e-6) meaningful."""

    def __init__(self, vae: AutoencoderKL, recon_loss: str = "l1", kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.recon_loss, self.kl_weight = vae, recon_loss, kl_weight

    def forward(self, images: Tensor, eps: Tensor) -> Tensor:  # images (B, 3, H, W), eps (B, C, h, w)
        posterior = self.vae.encode(images)
        reconstruction = self.vae.decode(posterior.mean + posterior.std * eps)
        diff = reconstruction.float() - images.float()
        error = (diff.abs() if self.recon_loss == "l1" else diff**2).flatten(1).mean(1)  # (B,)
        return error + self.kl_weight * posterior.kl().float() / images[0].numel()


class DiffusionObjective(nn.Module):
    """Per-item latent-diffusion loss of DiscreteDenoiser.loss; holds the text encoder when it is trained."""

    def __init__(self, unet: UNet, schedule: DiscreteSchedule, min_snr_gamma: float | None, text_encoder=None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.schedule, self.min_snr_gamma = schedule, min_snr_gamma

    def forward(self, latents: Tensor, t: Tensor, noise: Tensor, ids: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        if self.text_encoder is not None:
            context = self.text_encoder.encode_ids(ids)  # (B, L, D)
        denoiser = DiscreteDenoiser(self.unet, self.schedule)
        return denoiser.loss(latents, t=t, noise=noise, min_snr_gamma=self.min_snr_gamma,
                             encoder_hidden_states=context)


class FlowObjective(nn.Module):
    """Per-item rectified-flow loss of FlowDenoiser.loss (the network predicts v = eps - x0 at
    x_t = (1 - t) x0 + t eps and sees t * 1000), conditioned as reverie's MMDiT family is: the text encoder's
    final states and pooled EOS state (TextEncoder.encode_ids_pooled); holds the text encoder when it is trained."""

    def __init__(self, transformer: nn.Module, text_encoder=None):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def forward(self, latents: Tensor, t: Tensor, noise: Tensor, ids: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None) -> Tensor:
        if self.text_encoder is not None:
            context, pooled = self.text_encoder.encode_ids_pooled(ids)  # (B, L, D), (B, D)
        return FlowDenoiser(self.transformer).loss(latents, sigma=t, noise=noise, encoder_hidden_states=context,
                                                   pooled_projections=pooled)


# ------------------------------------------------------------------------------------------------ helpers


def check_item(item, index: int = 0) -> tuple[int, int]:
    """(H, W) of a data-set item, or a ValueError saying what the data interface must return."""
    image = item.get("image") if isinstance(item, dict) else None
    if not (isinstance(image, Tensor) and image.is_floating_point() and image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"data set item {index}: expected a dict with 'image' a float tensor (3, H, W) in [-1, 1] "
                         f"and 'caption' a str; got {type(item).__name__} with image "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if not isinstance(item.get("caption"), str):
        raise ValueError(f"data set item {index}: 'caption' must be a str; got {type(item.get('caption')).__name__}")
    return tuple(image.shape[1:])


def latent_shape(vae, dataset, hint: str = "") -> tuple[int, int, int]:
    """(C, h, w) of the data set's latents under `vae`; a ValueError (ending with `hint`) if its images do not
    divide evenly."""
    h, w = check_item(dataset[0])
    f = vae.downsample_factor
    if h % f or w % f:
        raise ValueError(f"data: images are {h}x{w}, not multiples of the VAE's downsample factor {f}{hint}")
    return vae.config.latent_channels, h // f, w // f


def stack_images(dataset, indices: list[int]) -> Tensor:
    return torch.stack([dataset[i]["image"].float() for i in indices])  # (B, 3, H, W)


def save_png_atomic(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one (export folders)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def load_frozen_vae(path: str) -> AutoencoderKL:
    """A trained VAE from: a vae run's output dir (its exported model/vae, else its latest checkpoint's EMA), a
    vae/ component folder (config.json + safetensors), a diffusers pipeline folder (or a bundled model's name), or
    a checkpoint directory."""
    from ..loading import BUNDLED

    p = Path(path)
    if not p.exists() and (BUNDLED / path / "vae").is_dir():
        p = BUNDLED / path
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "model" / "vae").is_dir():
        p = latest_checkpoint(p / "checkpoints") or p
    for folder in (p / "model" / "vae", p / "vae", p):
        if (folder / "config.json").is_file():
            vae = AutoencoderKL.from_config(read_config(folder))
            load_state_dict_strict(vae, load_weights(folder), name="vae")
            return vae
    if (p / "state.json").is_file() and (p / "ema.safetensors").is_file():  # a training checkpoint of a vae run
        config = json.loads((p / "state.json").read_text())["config"]
        if config["model"]["kind"] != "vae":
            raise ValueError(f"model.vae_path: {p} is a checkpoint of a {config['model']['kind']} run, not a vae run")
        vae = AutoencoderKL(VAE_PRESETS[config["model"]["vae_preset"]])
        ema = load_safetensors(p / "ema.safetensors")
        load_state_dict_strict(vae, {k.removeprefix("vae."): v for k, v in ema.items()}, name="vae")
        return vae
    raise ValueError(f"model.vae_path: no VAE at {path!r}; give a vae run's output dir, a vae/ component folder "
                     f"(config.json + {WEIGHTS}), a diffusers pipeline folder or a vae run's checkpoint directory")


def fingerprint(vae: nn.Module, config: Config, length: int) -> str:
    """Names a latent cache: the VAE's weights, the data settings and the data-set length."""
    h = hashlib.sha256(json.dumps([config.data.name, config.data.options, length], sort_keys=True,
                                  default=str).encode())
    for name, t in vae.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ tasks


class VAETask:
    """Train an AutoencoderKL on the data set's images: from scratch, or fine-tuning model.vae_path."""

    kind = "vae"

    def __init__(self, config: Config, dataset, dist, out_dir: Path, resume: bool):
        self.config, self.dataset, self.dist, self.out_dir = config, dataset, dist, out_dir
        preset = config.model.vae_preset
        if preset not in VAE_PRESETS:
            raise ValueError(f"model.vae_preset must be one of {', '.join(VAE_PRESETS)}; got {preset!r}")
        torch.manual_seed(config.train.seed)
        self.vae = load_frozen_vae(config.model.vae_path).requires_grad_(True) if config.model.vae_path else \
            AutoencoderKL(VAE_PRESETS[preset])
        self.latent_shape = latent_shape(self.vae, dataset, f" (model.vae_preset={preset!r})")
        self.objective = VAEObjective(self.vae, config.train.recon_loss, config.train.kl_weight).to(dist.device)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.objective.parameters()), "lr": self.config.optim.lr}]

    def inputs(self, step: int, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        """items: (slot in the global batch, data-set index)."""
        t_cfg = self.config.train
        eps = StepDraws(t_cfg.seed, step, t_cfg.batch_size, [slot for slot, _ in items]).randn(*self.latent_shape)
        images = stack_images(self.dataset, [i for _, i in items])
        return {"images": images.to(self.dist.device), "eps": eps.to(self.dist.device)}

    @torch.no_grad()
    def sample(self, ema_objective: VAEObjective, path: Path) -> None:
        """Originals (top row) and the EMA model's reconstructions (posterior mode, bottom row)."""
        from ..pipeline import to_pil

        n = min(self.config.log.sample_count, len(self.dataset))
        images = stack_images(self.dataset, list(range(n))).to(self.dist.device)
        vae = ema_objective.vae
        reconstructions = vae.decode(vae.encode(images).mode())
        save_png_atomic(grid(to_pil(images) + to_pil(reconstructions), n), path)

    @torch.no_grad()
    def export(self, ema_objective: VAEObjective, path: Path) -> Path:
        """The EMA VAE as a diffusers vae/ component folder, its scaling_factor measured as 1 / std of the
        latents of (up to 256 of) the training images, as LDM/SD chose theirs (Rombach et al. 2022, D.1)."""
        vae = ema_objective.vae
        n = min(256, len(self.dataset))
        latents = torch.cat([vae.encode(stack_images(self.dataset, list(range(i, min(n, i + ENCODE_CHUNK))))
                                        .to(self.dist.device)).mode().float().cpu()
                             for i in range(0, n, ENCODE_CHUNK)])
        config = vae.to_config()
        config["scaling_factor"] = float(1 / latents.std()) if n > 1 and latents.std() > 0 else vae.scaling_factor
        dtype = getattr(torch, self.config.train.export_dtype)
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        save_component(tmp / "vae", vae.state_dict(), config, WEIGHTS, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, path)
        return path / "vae"


class UNetTask:
    """Train a text-conditioned UNet in the latent space of a frozen VAE; the text encoder is loaded (frozen or
    trained) or built from scratch with a BPE tokenizer trained on the data set's captions."""

    kind = "unet"
    network_dir = "unet"  # the network's folder in an exported model

    def __init__(self, config: Config, dataset, dist, out_dir: Path, resume: bool):
        from ..models.text import TextEncoder, load_tokenizer, open_text_encoder, train_bpe_tokenizer

        self.config, self.dataset, self.dist, self.out_dir = config, dataset, dist, out_dir
        m, device = config.model, dist.device
        if not m.vae_path:
            raise ValueError("model.vae_path: a unet run needs the frozen VAE it trains in (a vae run's output "
                             "dir, a vae/ component folder or a diffusers pipeline folder)")
        if not m.text_encoder_path and not m.train_text_encoder:
            raise ValueError("model.train_text_encoder must be true when the text encoder starts from scratch "
                             "(model.text_encoder_path is empty)")
        self.vae = load_frozen_vae(m.vae_path).to(device).eval().requires_grad_(False)
        self.latent_shape = self.data_latent_shape()
        self.scheduler_config, self.schedule = self.make_schedule(m)

        # the data pass: captions (for a new tokenizer) and the latent cache, done by rank 0, read by all
        self.captions, self.moments = None, None
        cache = None
        if config.data.cache_latents:
            cache = out_dir / "cache" / f"latents-{fingerprint(self.vae, config, len(dataset))}.safetensors"
        tokenizer_dir = out_dir / "tokenizer"
        new_tokenizer = not m.text_encoder_path and not resume
        if dist.is_main:
            if cache is not None and not cache.is_file():
                self._write_cache(cache)
            if new_tokenizer:
                captions = self._read_cache(cache)[2] if cache is not None else self._scan(images=False)[2]
                train_bpe_tokenizer(captions, m.vocab_size, tokenizer_dir, max_length=m.text_max_length)
        dist.barrier()
        if cache is not None:
            mean, std, self.captions = self._read_cache(cache)
            self.moments = (mean, std)

        torch.manual_seed(config.train.seed)
        if m.text_encoder_path:
            self.text_encoder = open_text_encoder(m.text_encoder_path, max_length=m.text_max_length)
        else:
            if not (tokenizer_dir / "vocab.json").is_file():
                raise ValueError(f"{tokenizer_dir}: the run's tokenizer is missing (it is trained on a fresh run)")
            tokenizer = load_tokenizer(tokenizer_dir, m.text_max_length)
            self.text_encoder = TextEncoder.small(tokenizer, m.text_hidden_size, m.text_layers, m.text_heads,
                                                  m.text_max_length)
        self.text_encoder.to(device)
        self.train_text_encoder = m.train_text_encoder
        if not self.train_text_encoder:
            self.text_encoder.eval().requires_grad_(False)
        self.network = self.make_network(m)
        if m.unet_init and not resume:
            self._init_unet(m.unet_init)
        self.objective = self.make_objective().to(device)
        self._ids: dict[str, Tensor] = {}
        self._text_cache: dict[str, dict[str, Tensor]] = {}

    # --- what the run trains: schedule, network, objective (MMDiTTask changes these) -------------------------

    def make_schedule(self, m) -> tuple[dict, DiscreteSchedule]:
        """(diffusers scheduler config, schedule) of the model being trained: a DDIM config of model.prediction
        and model.beta_schedule (SD's betas for scaled_linear)."""
        linear = m.beta_schedule == "linear"
        config = {
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": m.beta_schedule,
            "beta_start": 0.0001 if linear else 0.00085, "beta_end": 0.02 if linear else 0.012,
            "prediction_type": m.prediction, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "timestep_spacing": "trailing" if m.zero_terminal_snr else "leading",
            "rescale_betas_zero_snr": m.zero_terminal_snr}
        return config, DiscreteSchedule.from_config(config)

    def make_network(self, m) -> nn.Module:
        """The UNet of model.unet_preset, fitted to the latents and the text encoder's width."""
        if m.unet_preset not in UNET_PRESETS:
            raise ValueError(f"model.unet_preset must be one of {', '.join(UNET_PRESETS)}; got {m.unet_preset!r}")
        # a CLIP's states feed cross-attention as they are; another encoder's go through a Linear to the
        # model.text_hidden_size width (diffusers' encoder_hid_dim "text_proj")
        width = self.text_encoder.hidden_size if self.text_encoder.is_clip else m.text_hidden_size
        unet_config = dataclasses.replace(UNET_PRESETS[m.unet_preset], in_channels=self.latent_shape[0],
                                          out_channels=self.latent_shape[0], sample_size=self.latent_shape[1],
                                          cross_attention_dim=width,
                                          encoder_hid_dim=None if self.text_encoder.is_clip else
                                          self.text_encoder.hidden_size)
        return UNet(unet_config)

    def make_objective(self) -> nn.Module:
        return DiffusionObjective(self.network, self.schedule, self.config.train.min_snr_gamma,
                                  self.text_encoder if self.train_text_encoder else None)

    def draw_time(self, draws: StepDraws) -> Tensor:
        """The items' training times (b,): timesteps uniform in [0, T)."""
        return draws.randint(self.schedule.num_train_timesteps)

    def _init_unet(self, source: str) -> None:
        """Copy a trained model's UNet weights into this run's UNet: every parameter it has must fit; the ones it
        lacks (a new text projection) keep their fresh initialisation."""
        from ..loading import model_path

        folder = model_path(source) / self.network_dir
        weights = load_weights(folder)
        own = self.network.state_dict()
        unknown = sorted(set(weights) - set(own))
        misfit = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
        if unknown or misfit:
            raise ValueError(f"model.unet_init: {folder}'s UNet does not fit this run's (model.unet_preset, the VAE's "
                             f"channels, model.text_hidden_size): unknown {unknown[:3]}, other shapes {misfit[:3]}")
        self.network.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)

    def frozen_base(self, need: str) -> tuple[UNet, dict]:
        """Set up a task on a frozen trained model (model.base_model: a diffusers folder or a bundled name; `need`
        says in the error what the run needs it for, "a controlnet run needs ..."): its VAE and text encoder (frozen, on the device), the data
        set's latent shape and latent cache, no trained encoder. Returns its frozen UNet and scheduler config."""
        from ..loading import load_folder, model_path

        config, device = self.config, self.dist.device
        if not config.model.base_model:
            raise ValueError(f"model.base_model: {need} (a diffusers folder or a bundled model's name)")
        unet, vae, text_encoder, scheduler_config = load_folder(model_path(config.model.base_model))
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        unet.to(device).eval().requires_grad_(False)
        self.latent_shape = latent_shape(self.vae, self.dataset)
        self.train_text_encoder, self._ids, self._text_cache = False, {}, {}
        self.captions, self.moments = None, None
        if config.data.cache_latents:
            cache = self.out_dir / "cache" / f"latents-{fingerprint(self.vae, config, len(self.dataset))}.safetensors"
            if self.dist.is_main and not cache.is_file():
                self._write_cache(cache)
            self.dist.barrier()
            mean, std, self.captions = self._read_cache(cache)
            self.moments = (mean, std)
        return unet, scheduler_config

    # --- the data pass and the latent cache (VideoTask encodes clips frame by frame) -------------------------

    def data_latent_shape(self) -> tuple[int, ...]:
        """The shape of one item's latents: (C, h, w)."""
        return latent_shape(self.vae, self.dataset)

    def check_data_item(self, item, index: int) -> None:
        check_item(item, index)

    def posterior(self, items: list[dict]) -> tuple[Tensor, Tensor]:
        """The VAE posterior's (mean, std) of data-set items' images, float32 on the CPU: (B, C, h, w) each."""
        with torch.no_grad():
            posterior = self.vae.encode(torch.stack([it["image"].float() for it in items]).to(self.dist.device))
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def _scan(self, images: bool):
        """One pass over the data set: posterior (mean, std) of every image if `images`, and every caption."""
        from tqdm.auto import tqdm

        means, stds, captions = [], [], []
        n = len(self.dataset)
        bar = tqdm(total=n, desc="reading the data set", disable=not self.config.log.progress, leave=False)
        for start in range(0, n, ENCODE_CHUNK):
            items = [self.dataset[i] for i in range(start, min(n, start + ENCODE_CHUNK))]
            for k, item in enumerate(items):
                self.check_data_item(item, start + k)
            captions += [item["caption"] for item in items]
            if images:
                mean, std = self.posterior(items)
                means.append(mean)
                stds.append(std)
            bar.update(len(items))
        bar.close()
        return (torch.cat(means), torch.cat(stds), captions) if images else (None, None, captions)

    def _write_cache(self, path: Path) -> None:
        mean, std, captions = self._scan(images=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({"mean": mean, "std": std}, path, metadata={"captions": json.dumps(captions)})

    @staticmethod
    def _read_cache(path: Path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            captions = json.loads(f.metadata()["captions"])
        tensors = load_safetensors(path)
        return tensors["mean"], tensors["std"], captions

    # --- training --------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        o = self.config.optim
        groups = [{"params": list(self.network.parameters()), "lr": o.lr}]
        if self.train_text_encoder:
            groups.append({"params": list(self.text_encoder.parameters()),
                           "lr": o.lr if o.text_lr is None else o.text_lr})
        return groups

    def _token_ids(self, captions: list[str]) -> Tensor:
        """(B, 1, L) ids: the first 77-token chunk, so an item's ids never depend on the rest of its batch."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            for c, ids in zip(missing, self.text_encoder.tokenize(missing)[:, :1]):
                self._ids[c] = ids
        return torch.stack([self._ids[c] for c in captions])

    def inputs(self, step: int, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        """items: (slot in the global batch, data-set index)."""
        t_cfg, shape = self.config.train, self.latent_shape
        draws = StepDraws(t_cfg.seed, step, t_cfg.batch_size, [slot for slot, _ in items])
        t = self.draw_time(draws)  # (b,), then in this order:
        noise = draws.randn(*shape) + t_cfg.offset_noise * draws.randn(shape[0], *[1] * (len(shape) - 1))
        eps, drops = draws.randn(*shape), draws.rand()
        indices = [i for _, i in items]
        if self.moments is not None:
            mean, std = self.moments[0][indices], self.moments[1][indices]
            captions = [self.captions[i] for i in indices]
        else:
            batch = [self.dataset[i] for i in indices]
            captions = [item["caption"] for item in batch]
            mean, std = self.posterior(batch)
        z = mean + std * eps
        latents = (z - self.vae.shift_factor) * self.vae.scaling_factor  # (b, C, h, w)
        captions = ["" if float(u) < t_cfg.cond_dropout else c for u, c in zip(drops, captions)]
        ids = self._token_ids(captions)
        device = self.dist.device
        out = {"latents": latents.to(device), "t": t.to(device), "noise": noise.to(device)}
        if self.train_text_encoder:
            out["ids"] = ids.to(device)
        else:
            out |= self._cached_text(captions, ids)
        return out

    def _cached_text(self, captions: list[str], ids: Tensor) -> dict[str, Tensor]:
        """frozen_text of the captions, each caption encoded once, alone (so its states never depend on a batch, and
        a resumed run gets the same numbers), and reused while it stays among the TEXT_CACHE most recently added: a
        frozen encoder gives a caption the same states every step."""
        cache = self._text_cache
        for i, c in enumerate(captions):
            if c not in cache:
                with torch.no_grad():
                    cache[c] = {k: v[0] for k, v in self.frozen_text(ids[i:i + 1].to(self.dist.device)).items()}
                if len(cache) > TEXT_CACHE:
                    cache.pop(next(iter(cache)))
        return {name: torch.stack([cache[c][name] for c in captions]) for name in cache[captions[0]]}

    def frozen_text(self, ids: Tensor) -> dict[str, Tensor]:
        """The objective's text inputs from a frozen encoder."""
        return {"context": self.text_encoder.encode_ids(ids)}

    # --- samples and export ------------------------------------------------------------------------------

    def pipeline(self, ema_objective: DiffusionObjective):
        from ..pipeline import Pipeline

        text_encoder = ema_objective.text_encoder if self.train_text_encoder else self.text_encoder
        return Pipeline(ema_objective.unet, self.vae, text_encoder, self.schedule, name=self.out_dir.name,
                        device=self.dist.device, scheduler_config=self.scheduler_config)

    def sample_prompts(self) -> list[str]:
        lg = self.config.log
        if lg.sample_prompts:
            return list(lg.sample_prompts)
        if self.captions is not None:
            captions = self.captions
        else:
            captions = [self.dataset[i]["caption"] for i in range(min(len(self.dataset), 64))]
        distinct = list(dict.fromkeys(c for c in captions if c))
        return (distinct or [""])[:lg.sample_count]

    def sample(self, ema_objective: DiffusionObjective, path: Path) -> None:
        """One image per prompt from the EMA weights, seeds 0.. (a row of the grid per 4 prompts)."""
        lg = self.config.log
        prompts = self.sample_prompts()
        pipe = self.pipeline(ema_objective)
        f = self.vae.downsample_factor
        result = pipe(prompts, steps=lg.sample_steps, guidance_scale=lg.sample_guidance, sampler=lg.sample_sampler,
                      width=self.latent_shape[2] * f, height=self.latent_shape[1] * f, seed=list(range(len(prompts))),
                      progress=False)
        save_png_atomic(grid(result.images, min(4, len(prompts))), path)

    def export(self, ema_objective: DiffusionObjective, path: Path) -> Path:
        """A diffusers StableDiffusionPipeline folder with the EMA weights."""
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pipeline(ema_objective).save_pretrained(tmp, dtype=getattr(torch, self.config.train.export_dtype))
        replace_dir(tmp, path)
        return path


# ------------------------------------------------------------------------------------------------ mmdit


class MMDiTTask(UNetTask):
    """Train reverie's own text-to-image transformer (reverie.families.mmdit): an MMDiT of model.mmdit_preset on
    rectified flow (logit-normal training times, Esser et al. 2024) in the latent space of a frozen VAE, with the
    UNet task's text encoder, tokenizer, latent cache and caption dropout. Exports a ReverieMMDiTPipeline folder."""

    kind = "mmdit"
    network_dir = "transformer"

    def make_schedule(self, m):
        from ..flow import FlowSchedule

        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "shift": m.flow_shift}
        return config, FlowSchedule.from_config(config)

    def make_network(self, m) -> nn.Module:
        from ..models.mmdit import MMDIT_PRESETS, MMDiT

        if m.mmdit_preset not in MMDIT_PRESETS:
            raise ValueError(f"model.mmdit_preset must be one of {', '.join(MMDIT_PRESETS)}; got {m.mmdit_preset!r}")
        if not self.text_encoder.is_clip:
            raise ValueError("model.text_encoder_path: an mmdit run needs a CLIP text encoder (its pooled state "
                             "conditions the transformer)")
        C, h, _ = self.latent_shape
        width = self.text_encoder.hidden_size
        config = dataclasses.replace(MMDIT_PRESETS[m.mmdit_preset], in_channels=C, out_channels=C, sample_size=h,
                                     pos_embed_max_size=h // MMDIT_PRESETS[m.mmdit_preset].patch_size,
                                     joint_attention_dim=width, pooled_projection_dim=width)
        return MMDiT(config)

    def make_objective(self) -> nn.Module:
        return FlowObjective(self.network, self.text_encoder if self.train_text_encoder else None)

    def draw_time(self, draws: StepDraws) -> Tensor:
        """The items' flow times (b,): logit-normal(0, 1), SD3's default (FlowDenoiser.loss)."""
        return torch.sigmoid(draws.randn())

    def _token_ids(self, captions: list[str]) -> Tensor:
        """(B, L) ids as the family's pipeline tokenizes them (TextEncoder.tokenize_truncated)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            for c, ids in zip(missing, self.text_encoder.tokenize_truncated(missing)):
                self._ids[c] = ids
        return torch.stack([self._ids[c] for c in captions])

    def frozen_text(self, ids: Tensor) -> dict[str, Tensor]:
        context, pooled = self.text_encoder.encode_ids_pooled(ids)
        return {"context": context, "pooled": pooled}

    def pipeline(self, ema_objective: FlowObjective):
        from ..pipeline import Pipeline

        text_encoder = ema_objective.text_encoder if self.train_text_encoder else self.text_encoder
        components = dict(transformer=ema_objective.transformer, vae=self.vae, text_encoder=text_encoder)
        return Pipeline.from_components("mmdit", components, self.schedule, name=self.out_dir.name,
                                        device=self.dist.device, scheduler_config=self.scheduler_config)


# ------------------------------------------------------------------------------------------------ video

FIRST_FRAME_STREAM = 0xF1F  # seeds the image-to-video draws, a stream apart from UNetTask's (t, noise, eps, dropout)


def check_clip(item, index: int = 0) -> tuple[int, int, int]:
    """(frames, H, W) of a video data-set item, or a ValueError saying what the data interface must return."""
    video = item.get("video") if isinstance(item, dict) else None
    if not (isinstance(video, Tensor) and video.is_floating_point() and video.ndim == 4 and video.shape[0] == 3):
        raise ValueError(f"data set item {index}: a video run expects a dict with 'video' a float tensor "
                         f"(3, frames, H, W) in [-1, 1] and 'caption' a str; got {type(item).__name__} with video "
                         f"{getattr(video, 'shape', type(video).__name__)}")
    if not isinstance(item.get("caption"), str):
        raise ValueError(f"data set item {index}: 'caption' must be a str; got {type(item.get('caption')).__name__}")
    return tuple(video.shape[1:])


class VideoFlowObjective(nn.Module):
    """Per-item rectified-flow loss on clips: FlowDenoiser.loss's ||v - (eps - x0)||^2 at x_t = (1 - t) x0 + t eps,
    the network seeing t * 1000, averaged over the latent frames that are not given. For an item with `first` set
    (image-to-video) the first latent frame is given clean (flow time 0, as the encoded image is at sampling:
    reverie.families.spacetime.FirstFrame) and left out of the loss. The text is the encoder's final states;
    holds the text encoder when it is trained."""

    def __init__(self, transformer: nn.Module, text_encoder=None):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def forward(self, latents: Tensor, t: Tensor, noise: Tensor, first: Tensor, ids: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:  # latents, noise (B, C, F, h, w); t, first (B,)
        if self.text_encoder is not None:
            context = self.text_encoder.encode_ids_pooled(ids)[0]  # (B, L, D)
        given = torch.zeros(latents.shape[0], latents.shape[2], dtype=torch.bool, device=latents.device)  # (B, F)
        given[:, 0] = first
        s = t.reshape(-1, 1, 1, 1, 1)
        x_t = torch.where(given[:, None, :, None, None], latents, (1 - s) * latents + s * noise)
        v = self.transformer(x_t, t * 1000, encoder_hidden_states=context)
        error = ((v.float() - (noise - latents).float()) ** 2).mean((1, 3, 4))  # (B, F)
        weight = (~given).float()
        return (error * weight).sum(1) / weight.sum(1)


class VideoTask(MMDiTTask):
    """Train reverie's own text-to-video model (reverie.families.spacetime): a Wan transformer of
    model.video_preset over (1, 2, 2) spacetime patches on rectified flow, in the latent space of a frozen image
    VAE applied frame by frame, with the MMDiT task's CLIP text encoder (its final states through the
    cross-attention), tokenizer, latent cache, caption dropout and logit-normal times. A fraction model.p_image of
    the clips is trained image-to-video (VideoFlowObjective). Data items are {"video": (3, F, H, W), "caption"}.
    Exports a ReverieVideoPipeline folder."""

    kind = "video"

    def data_latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F, h, w): every frame encoded alone, so latent frames = frames."""
        frames, H, W = check_clip(self.dataset[0])
        f = self.vae.downsample_factor
        if H % f or W % f:
            raise ValueError(f"data: frames are {H}x{W}, not multiples of the VAE's downsample factor {f}")
        if frames < 2 and self.config.model.p_image > 0:
            raise ValueError("model.p_image must be 0 for one-frame clips (image-to-video needs frames after the "
                             "first)")
        return self.vae.config.latent_channels, frames, H // f, W // f

    def check_data_item(self, item, index: int) -> None:
        check_clip(item, index)

    def posterior(self, items: list[dict]) -> tuple[Tensor, Tensor]:
        """(mean, std) of every frame's posterior, (B, C, F, h, w) each."""
        clips = torch.stack([it["video"].float() for it in items])  # (B, 3, F, H, W)
        B, _, F, H, W = clips.shape
        frames = clips.transpose(1, 2).reshape(B * F, 3, H, W)
        with torch.no_grad():
            posterior = self.vae.encode(frames.to(self.dist.device))
        return tuple(m.float().cpu().unflatten(0, (B, F)).transpose(1, 2) for m in (posterior.mean, posterior.std))

    def make_network(self, m) -> nn.Module:
        from ..models.wan import WAN_PRESETS, WanTransformer

        if m.video_preset not in WAN_PRESETS:
            raise ValueError(f"model.video_preset must be one of {', '.join(WAN_PRESETS)}; got {m.video_preset!r}")
        if not self.text_encoder.is_clip:
            raise ValueError("model.text_encoder_path: a video run needs a CLIP text encoder (the spacetime family "
                             "encodes prompts with CLIP)")
        preset = WAN_PRESETS[m.video_preset]
        C, frames, h, w = self.latent_shape
        _, ph, pw = preset.patch_size
        if h % ph or w % pw:
            raise ValueError(f"data: latent frames are {h}x{w}, not multiples of the patch {ph}x{pw} "
                             f"(model.video_preset={m.video_preset!r})")
        # the RoPE length is the clip's longest axis in tokens: the family refuses longer videos
        config = dataclasses.replace(preset, in_channels=C, out_channels=C, text_dim=self.text_encoder.hidden_size,
                                     rope_max_seq_len=max(frames, h // ph, w // pw))
        return WanTransformer(config)

    def make_objective(self) -> nn.Module:
        return VideoFlowObjective(self.network, self.text_encoder if self.train_text_encoder else None)

    def frozen_text(self, ids: Tensor) -> dict[str, Tensor]:
        return {"context": self.text_encoder.encode_ids_pooled(ids)[0]}

    def inputs(self, step: int, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        """MMDiTTask's inputs on clips, plus `first` (B,): whether an item is trained image-to-video."""
        t_cfg = self.config.train
        out = super().inputs(step, items)
        u = StepDraws(mix_seed(t_cfg.seed, FIRST_FRAME_STREAM), step, t_cfg.batch_size, [s for s, _ in items]).rand()
        out["first"] = (u < self.config.model.p_image).to(self.dist.device)
        return out

    def pipeline(self, ema_objective: VideoFlowObjective):
        from ..pipeline import Pipeline

        text_encoder = ema_objective.text_encoder if self.train_text_encoder else self.text_encoder
        components = dict(transformer=ema_objective.transformer, vae=self.vae, text_encoder=text_encoder)
        return Pipeline.from_components("spacetime", components, self.schedule, name=self.out_dir.name,
                                        device=self.dist.device, scheduler_config=self.scheduler_config)

    def sample(self, ema_objective: VideoFlowObjective, path: Path) -> None:
        """One clip per prompt from the EMA weights, seeds 0..: a row of frames per prompt."""
        lg = self.config.log
        prompts = self.sample_prompts()
        _, frames, h, w = self.latent_shape
        f = self.vae.downsample_factor
        result = self.pipeline(ema_objective)(prompts, steps=lg.sample_steps, guidance_scale=lg.sample_guidance,
                                              sampler=lg.sample_sampler, width=w * f, height=h * f,
                                              seed=list(range(len(prompts))), num_frames=frames, progress=False)
        save_png_atomic(grid([frame for video in result.frames for frame in video], frames), path)


# ------------------------------------------------------------------------------------------------ controlnet


class Frozen:
    """A module held by reference: not a submodule (never trained, not in the objective's state dict or
    checkpoints) and shared, not copied, when the objective is deep-copied (the EMA)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class ControlNetObjective(nn.Module):
    """Per-item latent-diffusion loss of the frozen UNet with a trainable ControlNet's residuals added
    (Zhang et al. 2023, eq. 1: the UNet's own loss, with the control as an extra condition)."""

    def __init__(self, controlnet: nn.Module, unet: UNet, schedule: DiscreteSchedule, min_snr_gamma: float | None):
        super().__init__()
        self.controlnet, self.unet = controlnet, Frozen(unet)
        self.schedule, self.min_snr_gamma = schedule, min_snr_gamma

    def forward(self, latents: Tensor, t: Tensor, noise: Tensor, context: Tensor, control: Tensor) -> Tensor:
        def net(x_t, timestep, encoder_hidden_states):  # control: (B, 3, H, W) in [0, 1]
            down, mid = self.controlnet(x_t, timestep, encoder_hidden_states, control)
            return self.unet.module(x_t, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                                    mid_block_additional_residual=mid)

        denoiser = DiscreteDenoiser(net, self.schedule)
        return denoiser.loss(latents, t=t, noise=noise, min_snr_gamma=self.min_snr_gamma,
                             encoder_hidden_states=context)


class ControlNetTask(UNetTask):
    """Train a ControlNet for a frozen text-to-image model (model.base_model: its UNet, VAE, text encoder and
    schedule), initialised from its UNet; each item's control (model.control_type) is derived from the item
    itself (reverie.control.dataset_control). Exports a diffusers ControlNetModel folder."""

    kind = "controlnet"

    def __init__(self, config: Config, dataset, dist, out_dir: Path, resume: bool):
        from ..control import CONTROL_TYPES, check_control_type
        from ..models.controlnet import ControlNet

        self.config, self.dataset, self.dist, self.out_dir = config, dataset, dist, out_dir
        m, device = config.model, dist.device
        self.control_type = check_control_type(m.control_type, "model.control_type")
        if self.control_type == "none":
            raise ValueError(f"model.control_type must be one of "
                             f"{', '.join(repr(k) for k in CONTROL_TYPES if k != 'none')}; got 'none'")
        unet, self.scheduler_config = self.frozen_base("a controlnet run needs the frozen model it controls")
        self.schedule = DiscreteSchedule.from_config(self.scheduler_config)
        torch.manual_seed(config.train.seed)  # the control encoder's random init
        # its control encoder downsamples as the VAE
        controlnet = ControlNet.from_unet(unet, downsample_factor=self.vae.downsample_factor)
        self.objective = ControlNetObjective(controlnet, unet, self.schedule, config.train.min_snr_gamma).to(device)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.objective.controlnet.parameters()), "lr": self.config.optim.lr}]

    def controls(self, indices: list[int]) -> Tensor:
        """(B, 3, H, W) control images in [0, 1] of data-set items."""
        from ..control import control_tensor, dataset_control

        images = [dataset_control(self.dataset, i, self.control_type) for i in indices]
        return control_tensor(images, *images[0].size)

    def inputs(self, step: int, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        """UNetTask's inputs (latents, t, noise, context), plus each item's control image."""
        out = super().inputs(step, items)
        out["control"] = self.controls([i for _, i in items]).to(self.dist.device)
        return out

    def pipeline(self, ema_objective: ControlNetObjective):
        from ..pipeline import Pipeline

        return Pipeline(ema_objective.unet.module, self.vae, self.text_encoder, self.schedule,
                        name=self.out_dir.name, device=self.dist.device, scheduler_config=self.scheduler_config)

    def sample(self, ema_objective: ControlNetObjective, path: Path) -> None:
        """The first items' controls (top row) and the EMA ControlNet's images for their captions (bottom row)."""
        from ..pipeline import to_pil

        lg = self.config.log
        indices = list(range(min(lg.sample_count, len(self.dataset))))
        captions = [self.dataset[i]["caption"] for i in indices]
        controls = self.controls(indices)
        pipe = self.pipeline(ema_objective)
        result = pipe(captions, steps=lg.sample_steps, guidance_scale=lg.sample_guidance, sampler=lg.sample_sampler,
                      seed=indices, controlnet=ema_objective.controlnet, control_image=controls, progress=False)
        save_png_atomic(grid(to_pil(controls * 2 - 1) + result.images, len(indices)), path)

    def export(self, ema_objective: ControlNetObjective, path: Path) -> Path:
        """The EMA ControlNet as a diffusers ControlNetModel folder; config.json also records the control type
        ("_control_type", which diffusers ignores)."""
        controlnet = ema_objective.controlnet
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        save_component(tmp, controlnet.state_dict(), controlnet.to_config() | {"_control_type": self.control_type},
                       WEIGHTS, getattr(torch, self.config.train.export_dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, path)
        return path


from .lcd import LCMDistillTask  # noqa: E402  (lcd.py and lora.py build on the classes above)
from .lora import LoraTask  # noqa: E402

TASKS = {"vae": VAETask, "unet": UNetTask, "mmdit": MMDiTTask, "controlnet": ControlNetTask, "lcm": LCMDistillTask,
         "video": VideoTask, "lora": LoraTask}
