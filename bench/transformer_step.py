"""One denoising step of reverie's MMDiT (SD3) and Flux against diffusers' SD3Transformer2DModel and
FluxTransformer2DModel with identical weights, at CPU-sized configs.

Each diffusers model is built on the meta device and filled per parameter from a generator seeded by the
parameter's name (fan-in-scaled normal matrices, norm scales near one); its state dict is then loaded strictly
into reverie's module (reverie.formats.safetensors_io.load_state_dict_strict), so both hold the same weights.
One process holds all the models and alternates their timed reps after a warm-up each, so load from other
processes on a shared machine hits them alike; it prints the median and min per step and reverie / diffusers
for both (on a loaded machine the min is the steadier estimate), and the largest output difference.

A third row, "reverie-fp8", times reverie with its Linear weights stored as float8_e4m3fn and upcast per layer
(reverie.models.quant.store_fp8, compute in --dtype): the cost of the upcasts. Its difference from diffusers is
fp8's rounding, not an error.

    python bench/transformer_step.py [--config small|medium] [--dtype float32|bfloat16] [--device cpu|cuda]
                                     [--reps N] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import zlib

import torch

from reverie.formats.safetensors_io import load_state_dict_strict
from reverie.models import quant
from reverie.models.flux import Flux, image_ids, text_ids
from reverie.models.mmdit import MMDiT

# (model config, latent side, text length); small: 256 image tokens, medium: 1024
CONFIGS = {
    "small": {
        "sd3": (dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                     attention_head_dim=64, num_attention_heads=8, caption_projection_dim=512,
                     joint_attention_dim=1024, pooled_projection_dim=512, pos_embed_max_size=64), 32, 128),
        "flux": (dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                      num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=512,
                      guidance_embeds=True, axes_dims_rope=[8, 28, 28]), 32, 128),
    },
    "medium": {  # SD3.5-style qk-norm for the MMDiT
        "sd3": (dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8,
                     attention_head_dim=64, num_attention_heads=12, caption_projection_dim=768,
                     joint_attention_dim=1024, pooled_projection_dim=768, pos_embed_max_size=64,
                     qk_norm="rms_norm"), 64, 256),
        "flux": (dict(in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=64,
                      num_attention_heads=12, joint_attention_dim=1024, pooled_projection_dim=768,
                      guidance_embeds=True, axes_dims_rope=[8, 28, 28]), 64, 256),
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fill_(model: torch.nn.Module) -> torch.nn.Module:
    """Name-seeded weights: matrices N(0, 1/fan_in), vectors N(0, 0.02) (norm scales N(1, 0.02))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            values = torch.empty(p.shape)
            if p.ndim > 1:
                values.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            else:
                values.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
            p.copy_(values)
    return model


def build(family: str, size: str, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its note on .to(dtype) and fp32 modules (it has none here)
    config = CONFIGS[size][family][0]
    ref_cls, ours_cls = {"sd3": (diffusers.SD3Transformer2DModel, MMDiT),
                         "flux": (diffusers.FluxTransformer2DModel, Flux)}[family]
    with torch.device("meta"):
        ref = ref_cls.from_config(config)
    ref = fill_(ref.to_empty(device="cpu")).eval()
    ours = ours_cls.from_config(dict(ref.config)).eval()
    load_state_dict_strict(ours, ref.state_dict(), name=f"reverie {ours_cls.__name__}")
    fp8 = quant.store_fp8(copy.deepcopy(ours), compute_dtype=dtype)
    return {"reverie": ours.to(device, dtype), "diffusers": ref.to(device, dtype), "reverie-fp8": fp8.to(device)}


def inputs(family: str, size: str, dtype: torch.dtype, device: str) -> dict:
    config, side, length = CONFIGS[size][family]
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, length, config["joint_attention_dim"], generator=g)  # (B, L, D)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)  # (B, P)
    if family == "sd3":
        x = torch.randn(1, config["in_channels"], side, side, generator=g)  # (B, C, H, W)
        kw = dict(timestep=torch.tensor([800.0], device=device))
    else:
        x = torch.randn(1, (side // 2) ** 2, config["in_channels"], generator=g)  # (B, N, 4C) packed
        kw = dict(timestep=torch.tensor([0.8], device=device), img_ids=image_ids(side, side, device),
                  txt_ids=text_ids(length, device), guidance=torch.tensor([3.5], device=device))
    return dict(hidden_states=x.to(device, dtype), encoder_hidden_states=context.to(device, dtype),
                pooled_projections=pooled.to(device, dtype), **kw)


def image_tokens(family: str, size: str) -> int:
    config, side, _ = CONFIGS[size][family]
    return (side // (config["patch_size"] if family == "sd3" else 2)) ** 2  # FLUX packs 2x2 outside the model


def step(name: str, model, kw: dict) -> torch.Tensor:
    if name == "diffusers":
        return model(**kw).sample
    x, t, c, p = kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"], kw["pooled_projections"]
    if isinstance(model, Flux):
        return model(x, t, c, p, kw["img_ids"], kw["txt_ids"], kw["guidance"])
    return model(x, t, c, p)


def time_family(family: str, size: str, dtype: torch.dtype, device: str, reps: int) -> dict:
    models, kw = build(family, size, dtype, device), inputs(family, size, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, outs = {name: [] for name in models}, {}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            outs[name] = step(name, model, kw).float()
        for _ in range(reps):
            for name, model in models.items():
                sync()
                t0 = time.perf_counter()
                step(name, model, kw)
                sync()
                times[name].append(time.perf_counter() - t0)
    ref = outs["diffusers"]
    return dict(times=times, diffs={name: (out - ref).abs().max().item() for name, out in outs.items()},
                scale=ref.abs().max().item(), tokens=image_tokens(family, size),
                params=sum(p.numel() for p in models["reverie"].parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--families", nargs="+", choices=["sd3", "flux"], default=["sd3", "flux"])
    parser.add_argument("--reps", type=int, default=10, help="timed reps per model, after one warm-up each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start; config {args.config}, {args.reps} timed reps each, alternating")
    print(f"{'family':6} {'impl':12} {'params':>7} {'img tok':>7} {'median s':>9} {'min s':>7} {'/ diffusers':>12} "
          f"{'max|diff|':>10} {'max|out|':>9}")
    for family in args.families:
        r = time_family(family, args.config, dtype, args.device, args.reps)
        med = {name: statistics.median(t) for name, t in r["times"].items()}
        low = {name: min(t) for name, t in r["times"].items()}
        for name in r["times"]:
            ratio = f"{med[name] / med['diffusers']:.3f}/{low[name] / low['diffusers']:.3f}"
            print(f"{family:6} {name:12} {r['params'] / 1e6:>6.0f}M {r['tokens']:>7} {med[name]:>9.4f} "
                  f"{low[name]:>7.4f} {ratio:>12} {r['diffs'][name]:>10.2e} {r['scale']:>9.2f}")
    print("/ diffusers: median/min step time relative to diffusers' (< 1: reverie is faster); max|diff|: largest "
          "absolute output difference from diffusers (reverie-fp8: fp8 weight rounding)")


if __name__ == "__main__":
    main()
