"""The `lora` training task: low-rank adapters (Hu et al. 2021) on a frozen text-to-image model, saved in kohya's
and in diffusers / PEFT's format, both of which reverie.lora reads back (and diffusers reads the PEFT one).

    reverie train configs/shapes_lora_star.toml        # teach the shipped shapes model "a purple star"

Each Linear or Conv2d whose path ends with one of model.lora_targets (default: the attention projections to_q, to_k,
to_v, to_out.0; "conv1", "conv2" add the resnets' 3x3 convolutions, kohya's LoCon; with model.lora_text also the
text encoder's q_proj, k_proj, v_proj, out_proj) gets y = W x + (alpha / r) up(down(x)), down kaiming-uniform and
up zero (sd-scripts' init: step 0 is the base model exactly). Only the factors train; the base, its VAE and its
text encoder stay frozen.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import torch
from torch import Tensor, nn

from ..schedules import DiscreteSchedule
from .config import Config
from .tasks import DiffusionObjective, UNetTask, replace_dir

KOHYA_FILE = "lora.safetensors"  # kohya / A1111 names: lora_unet_*, lora_te_*
PEFT_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: unet.*.lora_A.weight, with lora_adapter_metadata
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoraLayer(nn.Module):
    """A frozen Linear or Conv2d plus a trainable low-rank update: base(x) + scale * up(down(x)). For a Conv2d
    (kohya's LoCon) down is a conv of the base's kernel, stride and padding into r channels, up a 1x1 conv."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False, padding_mode=base.padding_mode)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


def add_lora_layers(root: nn.Module, targets, rank: int, alpha: float, what: str) -> dict[str, nn.Module]:
    """Wrap every Linear or Conv2d of `root` whose path ends with a target ("to_q", "to_out.0", "conv1");
    path -> its LoraLayer."""
    found = {}
    for path, module in list(root.named_modules()):
        if not any(path == t or path.endswith("." + t) for t in targets):
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise ValueError(f"model.lora_targets: {what} module {path} is a {type(module).__name__}; LoRA training "
                             f"takes Linear and Conv2d layers")
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        found[path] = LoraLayer(module, rank, alpha)
        parent._modules[child] = found[path]
    if not found:
        raise ValueError(f"model.lora_targets {list(targets)}: no {what} module's name ends with one of them")
    return found


class LoraTask(UNetTask):
    """Train a LoRA for a frozen SD-layout model (model.base_model) on the data set's images and captions.
    Exports a folder with the adapter in both formats and the base model's name (`lora.json`)."""

    kind = "lora"

    def __init__(self, config: Config, dataset, dist, out_dir: Path, resume: bool):
        self.config, self.dataset, self.dist, self.out_dir = config, dataset, dist, out_dir
        m, device = config.model, dist.device
        if m.lora_rank < 1:
            raise ValueError(f"model.lora_rank must be >= 1; got {m.lora_rank}")
        unet, self.scheduler_config = self.frozen_base("a lora run needs the model it adapts")
        self.schedule = DiscreteSchedule.from_config(self.scheduler_config)
        self.alpha = float(m.lora_alpha if m.lora_alpha is not None else m.lora_rank)
        torch.manual_seed(config.train.seed)  # the factors' init
        self.layers = {"unet": add_lora_layers(unet, m.lora_targets, m.lora_rank, self.alpha, "UNet")}
        text_encoder = None
        if m.lora_text:
            self.layers["text_encoder"] = add_lora_layers(self.text_encoder.text_model, TEXT_TARGETS, m.lora_rank,
                                                          self.alpha, "text encoder")
            text_encoder = self.text_encoder
            self.train_text_encoder = True  # the text states change: encode the ids every step, cache nothing
        for layers in self.layers.values():
            for layer in layers.values():
                layer.down.to(device).requires_grad_(True)
                layer.up.to(device).requires_grad_(True)
        self.unet = unet
        self.objective = DiffusionObjective(unet, self.schedule, config.train.min_snr_gamma, text_encoder).to(device)

    def param_groups(self) -> list[dict]:
        factors = [p for layers in self.layers.values() for layer in layers.values()
                   for p in (layer.down.weight, layer.up.weight)]
        return [{"params": factors, "lr": self.config.optim.lr}]

    def pipeline(self, ema_objective: DiffusionObjective):
        from ..pipeline import Pipeline

        text_encoder = ema_objective.text_encoder or self.text_encoder
        return Pipeline(ema_objective.unet, self.vae, text_encoder, self.schedule, name=self.out_dir.name,
                        device=self.dist.device, scheduler_config=self.scheduler_config)

    def factors(self, ema_objective: DiffusionObjective) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
        """component -> module path (of the base model, the wrapper's own level left out) -> (down, up) of the
        EMA's layers."""
        roots = {"unet": ema_objective.unet}
        if ema_objective.text_encoder is not None:
            roots["text_encoder"] = ema_objective.text_encoder.text_model
        out = {}
        for component, root in roots.items():
            out[component] = {path: (m.down.weight.detach().float().cpu(), m.up.weight.detach().float().cpu())
                              for path, m in root.named_modules() if isinstance(m, LoraLayer)}
        return out

    def export(self, ema_objective: DiffusionObjective, path: Path) -> Path:
        """The folder: lora.safetensors (kohya), pytorch_lora_weights.safetensors (diffusers / PEFT) and lora.json
        (base model, rank, alpha, targets)."""
        from safetensors.torch import save_file

        dtype = getattr(torch, self.config.train.export_dtype)
        m = self.config.model
        kohya, peft, metadata = {}, {}, {}
        prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
        for component, layers in self.factors(ema_objective).items():
            names = sorted(layers)
            for name in names:
                down, up = layers[name]
                # CLIPTextModel (transformers 5) has no text_model level; files name it
                file_name = f"text_model.{name}" if component == "text_encoder" and \
                    not name.startswith("text_model.") else name
                stem = f"{prefixes[component]}_{file_name.replace('.', '_')}"
                kohya |= {f"{stem}.lora_down.weight": down.to(dtype), f"{stem}.lora_up.weight": up.to(dtype),
                          f"{stem}.alpha": torch.tensor(self.alpha)}
                peft |= {f"{component}.{file_name}.lora_A.weight": down.to(dtype),
                         f"{component}.{file_name}.lora_B.weight": up.to(dtype)}
            targets = list(m.lora_targets) if component == "unet" else list(TEXT_TARGETS)
            metadata |= {f"{component}.r": m.lora_rank, f"{component}.lora_alpha": self.alpha,
                         f"{component}.target_modules": targets}
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        info = {"base_model": m.base_model, "rank": m.lora_rank, "alpha": self.alpha,
                "targets": list(m.lora_targets), "text_encoder": m.lora_text}
        save_file(kohya, str(tmp / KOHYA_FILE), metadata={"ss_network_dim": str(m.lora_rank),
                                                          "ss_network_alpha": str(self.alpha),
                                                          "ss_output_name": self.out_dir.name})
        save_file(peft, str(tmp / PEFT_FILE),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)})
        (tmp / "lora.json").write_text(json.dumps(info, indent=2) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, path)
        return path
