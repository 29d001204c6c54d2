"""A training run's configuration: five nested dataclasses, read from JSON or TOML, with dotted overrides.

    config = load_config("configs/shapes_unet.toml", ["--optim.lr=2e-4", "--train.steps=100"])

Every value is checked against its field's type when it is read (from a file or the command line), and every
unknown key raises a ValueError that names it and lists the valid ones. Ranges and choices are checked once
the whole config is assembled (`Config.__post_init__`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("vae", "unet", "mmdit", "controlnet", "lcm", "video", "lora")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MIXED_PRECISION = ("no", "bf16", "fp16")
RECON_LOSSES = ("l1", "l2")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
LCM_LOSSES = ("huber", "l2")
CHOICES = {"model.kind": KINDS, "model.prediction": PREDICTIONS, "model.beta_schedule": BETA_SCHEDULES,
           "train.mixed_precision": MIXED_PRECISION, "train.recon_loss": RECON_LOSSES,
           "train.export_dtype": EXPORT_DTYPES, "train.lcm_loss": LCM_LOSSES}
MINIMUMS = {"model.text_hidden_size": 1, "model.text_layers": 0, "model.text_heads": 1, "model.text_max_length": 3,
            "model.vocab_size": 514, "optim.warmup_steps": 0, "train.steps": 1, "train.batch_size": 1,
            "train.grad_accum": 1, "train.seed": 0, "train.max_nonfinite": 1, "train.checkpoint_every": 0,
            "train.keep_checkpoints": 1, "train.time_limit_minutes": 0, "log.every": 1, "log.sample_every": 0,
            "log.sample_count": 1, "log.sample_steps": 1,
            "model.lcm_w_embedding_dim": 1}
RANGES = {"model.flow_shift": (0, math.inf), "optim.text_lr": (0, math.inf), "optim.weight_decay": (0, math.inf),
          "optim.min_lr_ratio": (0, 1), "model.p_image": (0, 1),
          "optim.grad_clip": (0, math.inf), "train.ema_decay": (0, 1), "train.cond_dropout": (0, 1),
          "train.offset_noise": (0, math.inf), "train.kl_weight": (0, math.inf), "log.sample_guidance": (0, math.inf),
          "train.lcm_w_min": (0, math.inf), "train.lcm_w_max": (0, math.inf), "train.lcm_target_decay": (0, 1)}


@dataclass
class ModelConfig:
    kind: str = "unet"  # what is trained: "vae" (the autoencoder), "unet" (latent denoiser, + text encoder),
    #                     "mmdit" (a rectified-flow MMDiT, + text encoder), "controlnet" (a ControlNet for the
    #                     frozen model.base_model), "lcm" (a Latent Consistency Model distilled from model.base_model)
    #                     "video" (a rectified-flow Wan transformer on clips, + text encoder) or "lora" (low-rank
    #                     adapters for the frozen model.base_model: reverie.train.lora)
    vae_preset: str = "small-f8"  # vae runs: architecture, a name in reverie.models.vae.VAE_PRESETS
    vae_path: str = ""  # unet runs: the frozen VAE (a vae run's output dir, a vae/ folder or a pipeline); vae runs: start from it
    unet_preset: str = "small"  # unet runs: UNET_PRESETS name; channels and text width adapt to the VAE and encoder
    mmdit_preset: str = "small"  # mmdit runs: reverie.models.mmdit.MMDIT_PRESETS name (latents and text width adapt)
    flow_shift: float = 1.0  # mmdit and video runs: the flow schedule's shift (SD3 eq. 23; 1: none)
    video_preset: str = "small"  # video runs: reverie.models.wan.WAN_PRESETS name (latents, text width adapt)
    p_image: float = 0.5  # video runs: fraction of clips trained image-to-video (first latent frame given clean)
    prediction: str = "epsilon"  # the network's target: epsilon | v_prediction | sample
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2 (SD's betas: scaled_linear)
    zero_terminal_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023; use with v_prediction)
    text_encoder_path: str = ""  # "": a new CLIP from scratch; else a pretrained one (reverie.models.text.
    #                              open_text_encoder: "all-MiniLM-L6-v2", a diffusers or a transformers folder);
    #                              a BERT-family encoder conditions the UNet through a text projection
    unet_init: str = ""  # unet runs: start from this model's UNet (a diffusers folder or a bundled name); new
    #                      parameters (a text projection) start fresh, all others must fit
    train_text_encoder: bool = True  # train the text encoder jointly (always, when it starts from scratch)
    text_hidden_size: int = 256  # from scratch: width of the CLIP text transformer (= UNet cross-attention width)
    text_layers: int = 4  # from scratch: transformer layers (0: token + position embeddings only)
    text_heads: int = 4  # from scratch: attention heads
    text_max_length: int = 77  # from scratch and BERT-family encoders: tokens per prompt, BOS and EOS included
    vocab_size: int = 1024  # from scratch: BPE vocabulary trained on the data set's captions (>= 514)
    base_model: str = ""  # controlnet, lcm and lora runs: the frozen text-to-image model (a diffusers folder or a bundled
    #                       name); lcm runs distil it (its UNet is the teacher and the student's init)
    lora_rank: int = 4  # lora runs: the adapters' rank r
    lora_alpha: float | None = None  # lora runs: the update is scaled by alpha / r (None: alpha = r, scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # lora runs:
    #                       the UNet Linears whose paths end with one of these get adapters
    lora_text: bool = False  # lora runs: adapters on the text encoder's attention projections too
    lcm_w_embedding_dim: int = 256  # lcm runs: the student's time_cond_proj_dim (width of the w-embedding)
    control_type: str = "segmentation"  # controlnet runs: the control derived from each image (segmentation | canny)


@dataclass
class DataConfig:
    name: str = "shapes"  # reverie.data.make_dataset name
    options: dict = field(default_factory=dict)  # keyword options for make_dataset (--data.options.KEY=VALUE)
    shuffle: bool = True  # a new seeded permutation every epoch (else: data set order)
    cache_latents: bool = True  # unet runs: encode every image once (posterior mean and std), sample per step


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW peak learning rate
    text_lr: float | None = None  # learning rate of the text encoder (None: lr)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    warmup_steps: int = 500  # linear warmup from lr / warmup_steps to lr
    min_lr_ratio: float = 0.0  # cosine decay from lr to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # checkpoints, logs, samples and the exported model go here
    steps: int = 10_000  # optimizer steps
    time_limit_minutes: float = 0.0  # 0: none; else finish (checkpoint, samples, export) at the first step
    # after this much wall time since the run began (its data pass and latent cache included), however many steps
    # are done: for a lease of fixed length. The LR schedule is
    # still laid out over train.steps, so pair it with optim.min_lr_ratio=1 (constant LR after warmup)
    batch_size: int = 32  # global batch per optimizer step (all processes and accumulation steps together)
    grad_accum: int = 1  # micro-batches per optimizer step and process
    seed: int = 0  # everything random derives from it: init, data order, noise, timesteps, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU only: autocast, a GradScaler for fp16; off on CPU)
    compile: bool = False  # torch.compile the training forward (the saved weights are the same module's)
    ema_decay: float = 0.9999  # EMA of the weights, used for samples and export (0: EMA = the weights)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so early EMA follows
    cond_dropout: float = 0.1  # unet runs: fraction of captions replaced by "" (classifier-free guidance)
    min_snr_gamma: float | None = None  # unet runs: min-SNR-gamma loss weight (Hang et al. 2023; 5 is typical)
    offset_noise: float = 0.0  # unet runs: per-channel constant noise added to the noise (Guttenberg 2023)
    recon_loss: str = "l1"  # vae runs: l1 | l2 pixel reconstruction loss
    kl_weight: float = 1e-6  # vae runs: KL weight, as in LDM (relative to a per-pixel reconstruction loss sum)
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row (each one skips its step)
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept (older ones deleted after a new one is committed)
    export_dtype: str = "float32"  # dtype of the exported weights: float32 | float16 | bfloat16
    lcm_w_min: float = 3.0  # lcm runs: guidance weights w ~ U[lcm_w_min, lcm_w_max] (guidance scale w + 1)
    lcm_w_max: float = 15.0  # lcm runs: see lcm_w_min
    lcm_loss: str = "huber"  # lcm runs: huber (pseudo-Huber, c = lcm_huber_c) | l2
    lcm_huber_c: float = 0.001  # lcm runs: the pseudo-Huber constant c (> 0)
    lcm_target_decay: float = 0.95  # lcm runs: EMA rate mu of the target network (the export uses ema_decay)


@dataclass
class LogConfig:
    every: int = 10  # steps between CSV / TensorBoard rows (non-finite steps are always logged)
    progress: bool = True  # tqdm progress bar with loss and it/s
    tensorboard: bool = True  # also write TensorBoard events, if torch.utils.tensorboard is importable
    sample_every: int = 1000  # steps between sample grids (0: only at the end)
    sample_count: int = 4  # images (unet: prompts, vae: reconstructions) per grid
    sample_prompts: list[str] = field(default_factory=list)  # unet runs: prompts ([]: the data set's first captions)
    sample_steps: int = 25  # unet runs: sampler steps
    sample_guidance: float = 5.0  # unet runs: classifier-free guidance scale
    sample_sampler: str = "dpmpp_2m"  # unet runs: any name reverie.samplers.resolve accepts


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            _choice(name, self.get(name), allowed)
        for name, low in MINIMUMS.items():
            if self.get(name) < low:
                raise ValueError(f"{name} must be >= {low}; got {self.get(name)}")
        for name, (low, high) in RANGES.items():
            value = self.get(name)
            if value is not None and not low <= value <= high:  # also rejects NaN
                raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
        for name in ("optim.lr", "optim.eps", "train.lcm_huber_c"):
            if not 0 < self.get(name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0; got {self.get(name)}")
        if not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1); got {self.optim.betas}")
        if self.train.min_snr_gamma is not None and not self.train.min_snr_gamma > 0:
            raise ValueError(f"train.min_snr_gamma must be None or > 0; got {self.train.min_snr_gamma}")
        if self.train.lcm_w_min > self.train.lcm_w_max:
            raise ValueError(f"train.lcm_w_min ({self.train.lcm_w_min}) must be <= train.lcm_w_max "
                             f"({self.train.lcm_w_max})")
        m = self.model
        if m.text_hidden_size % m.text_heads:
            raise ValueError(f"model.text_heads ({m.text_heads}) must divide model.text_hidden_size "
                             f"({m.text_hidden_size})")

    def get(self, dotted: str):
        """A value by its dotted name, e.g. config.get("optim.lr")."""
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _field_types(cls) -> dict[str, object]:
    """{field name: resolved type} of a dataclass (its annotations are strings here: `from __future__`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(kind: str, key: str, valid) -> ValueError:
    return ValueError(f"unknown {kind} {key!r}; valid: {', '.join(sorted(valid))}")


# ----------------------------------------------------------------------------------------------- values


def _type_name(tp) -> str:
    return str(tp) if typing.get_origin(tp) is not None else tp.__name__


def _check_value(name: str, value, tp):
    """A value read from JSON/TOML (or parsed from the command line) as field type `tp`, or a ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(name, value, inner)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_check_value(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_check_value(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ValueError(f"{name} must be {_type_name(tp)}; got {type(value).__name__} {value!r}")


def _parse_text(name: str, text: str, tp):
    """A command-line string as field type `tp`: numbers, true/false, none/null, JSON or comma lists."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_text(name, text, inner)
    try:
        if tp is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin in (tuple, list):
            if text.strip().startswith("["):  # a JSON list
                return _check_value(name, json.loads(text), tp)
            items = [s.strip() for s in text.split(",")] if text.strip() else []
            item_types = args if origin is tuple else [args[0]] * len(items)
            if len(item_types) != len(items):
                raise ValueError
            return _check_value(name, [_parse_text(f"{name}[{i}]", v, a) for i, (v, a) in
                                       enumerate(zip(items, item_types))], tp)
        if tp is dict or origin is dict:
            return _check_value(name, json.loads(text), tp)
    except (ValueError, json.JSONDecodeError):
        pass
    raise ValueError(f"{name} must be {_type_name(tp)}; could not parse {text!r}")


def _literal(text: str):
    """A free-form value (data.options.*): JSON if it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ----------------------------------------------------------------------------------------------- building


def from_dict(d: dict) -> Config:
    """A Config from a {section: {key: value}} dict (a parsed file); missing keys keep their defaults."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a mapping of sections; got {type(d).__name__}")
    classes = _field_types(Config)
    sections = {}
    for section, values in d.items():
        if section not in classes:
            raise _unknown("config section", section, classes)
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a table/object of keys; got {values!r}")
        types_ = _field_types(classes[section])
        kwargs = {}
        for key, value in values.items():
            if key not in types_:
                raise _unknown(f"key in section [{section}]", f"{section}.{key}", (f"{section}.{k}" for k in types_))
            kwargs[key] = _check_value(f"{section}.{key}", value, types_[key])
        sections[section] = classes[section](**kwargs)
    return Config(**sections)


def read_file(path) -> dict:
    """The raw {section: {key: value}} dict of a .json or .toml config file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    raise ValueError(f"{path}: config files must end in .json or .toml; got {path.suffix!r}")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `--section.key=value` (or `--section.key value`) overrides to a raw config dict, type-checked."""
    classes = _field_types(Config)
    d = {section: dict(values) for section, values in d.items()}
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"overrides must look like --section.key=value; got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if not args or args[0].startswith("--"):
                raise ValueError(f"override {arg!r} has no value (use --{key}=VALUE)")
            text = args.pop(0)
        section, dot, name = key.partition(".")
        if section not in classes:
            raise _unknown("config section", section, classes)
        types_ = _field_types(classes[section])
        name, _, subkey = name.partition(".")
        if not dot or name not in types_:
            raise _unknown("config key", key, (f"{section}.{k}" for k in types_))
        tp = types_[name]
        values = d.setdefault(section, {})
        if subkey:  # --data.options.size=64: one entry of a dict field
            if not (tp is dict or typing.get_origin(tp) is dict):
                raise ValueError(f"{section}.{name} is not a dict; {key!r} cannot set a sub-key")
            values[name] = {**values.get(name, {}), subkey: _literal(text)}
        else:
            values[name] = _parse_text(key, text, tp)
    return d


def load_config(path=None, overrides: list[str] = ()) -> Config:
    """Read a .json/.toml config (defaults if path is None) and apply command-line overrides."""
    raw = read_file(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def config_diff(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two {section: {key: value}} config dicts."""
    return [f"{section}.{key}" for section in sorted(set(a) | set(b))
            for key in sorted(set(a.get(section, {})) | set(b.get(section, {})))
            if a.get(section, {}).get(key) != b.get(section, {}).get(key)]
