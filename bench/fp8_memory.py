"""Peak memory of one FLUX.1-dev-sized denoising step with fp8 weight storage (reverie.models.quant), on the CPU.

The transformer (FluxConfig defaults + guidance_embeds=True: 19 double and 38 single blocks, 3072 wide, 11.9B
parameters) is built on the meta device, then each tensor is materialised directly in its storage dtype: the
Linear weights as float8_e4m3fn, filled with nn.Linear's default init law 16M elements (one fp32 chunk) at a time;
biases and norm scales as bf16. The model never exists in fp32 or bf16. One step at 256x256 px (32x32 latent ->
256 packed image tokens), T5 length 512, batch 1, bf16 compute, torch.inference_mode.

Measured, in this process (Linux /proc/self/status): resident size before the weights exist (python + torch),
resident size with the weights, and the resident high-water mark during the step after resetting it
(/proc/self/clear_refs), whose excess over the resident size before the step is the activation overhead
(activations, workspace, and the one layer's weight upcast to bf16 at a time). Exact: parameter counts and bytes.
Computed, not run: the same step with bf16 or fp32 storage = parameters x 2 or x 4 + all that the fp8 run held
beyond its parameters (resident size with weights - parameter bytes, + the activation overhead); bf16 compute in
all three, so fp32 storage would also upcast per layer.

--layers D S builds D double and S single blocks instead of 19 and 38: the per-block bytes are exact at any
size, and the full-size rows are then extrapolated (activation memory does not grow with the number of blocks:
they run one after another). The run refuses to start when MemAvailable cannot hold the weights plus headroom.

    python bench/fp8_memory.py                 # full size: ~12 GB resident, a few minutes on 2 cores
    python bench/fp8_memory.py --layers 2 4    # the same measurement on a 6-block model
    python bench/fp8_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from reverie.models import quant
from reverie.models.flux import Flux, FluxConfig, image_ids, text_ids

FULL = FluxConfig(guidance_embeds=True)  # FLUX.1-dev's shape
CHUNK = 2 ** 24  # elements of the fp32 chunk through which the fp8 weights are filled (64 MiB)
HEADROOM = 3 * 2 ** 30  # bytes beyond the weights that must be free before starting
GIB = 2 ** 30


def kib_status(key: str) -> int:
    """A field of /proc/self/status (VmRSS: resident now; VmHWM: resident high-water mark) in bytes."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line for line in f if line.startswith(key + ":")).split()[1])


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return 1024 * int(next(line for line in f if line.startswith("MemAvailable:")).split()[1])


def counts(config: FluxConfig) -> dict[str, int]:
    """Parameter counts of the whole model, one double block, one single block (meta device: no memory)."""
    with torch.device("meta"):
        model = Flux(config)
    total = sum(p.numel() for p in model.parameters())
    double = sum(p.numel() for p in model.transformer_blocks[0].parameters()) if config.num_layers else 0
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters()) \
        if config.num_single_layers else 0
    return dict(total=total, double=double, single=single,
                rest=total - config.num_layers * double - config.num_single_layers * single)


def random_fp8_state_dict(model: Flux, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the (meta) model, materialised in its storage dtype: fp8 weights for its fp8 layers, drawn
    as nn.Linear's default init does, U(-1, 1) / sqrt(fan_in), through one reused fp32 chunk; bf16 biases (the
    same law) and norm scales (ones)."""
    g = torch.Generator().manual_seed(seed)
    fp8_keys = {f"{name}.weight" for name in quant.fp8_layers(model)}
    buffer = torch.empty(CHUNK)  # reused: no allocator churn, one chunk resident at a time
    out = {}
    for key, meta in model.state_dict().items():
        if key in fp8_keys:
            weight = torch.empty(meta.shape, dtype=torch.float8_e4m3fn)
            rows = weight.view(meta.shape[0], -1)  # (out, fan_in)
            fan_in = rows.shape[1]
            step = max(1, CHUNK // fan_in)
            for i in range(0, rows.shape[0], step):
                chunk = buffer[:rows[i:i + step].numel()].view(-1, fan_in)
                rows[i:i + step] = chunk.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=g)
            out[key] = weight
        elif key.endswith("weight"):  # RMSNorm scales (the only other weights)
            out[key] = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:  # biases: U(-1, 1) / sqrt(fan_in) of their layer, 3072 wide or more
            out[key] = torch.empty(meta.shape).uniform_(-3072 ** -0.5, 3072 ** -0.5, generator=g).bfloat16()
    return out


def inputs(config: FluxConfig, text_length: int, latent: int = 32):
    g = torch.Generator().manual_seed(1)
    n = (latent // 2) ** 2
    x = torch.randn(1, n, config.in_channels, generator=g).bfloat16()  # (B, N, 64) packed latent tokens
    context = torch.randn(1, text_length, config.joint_attention_dim, generator=g).bfloat16()  # (B, L, 4096)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=g).bfloat16()  # (B, 768)
    return x, 1.0, context, pooled, image_ids(latent, latent), text_ids(text_length), 3.5


def measure(double: int, single: int, text_length: int) -> dict:
    config = FluxConfig(guidance_embeds=True, num_layers=double, num_single_layers=single)
    n = counts(config)
    need = n["total"] + HEADROOM  # fp8: one byte per parameter (bf16 extras are < 0.1%)
    if mem_available() < need:
        per_double = n["double"] + 2 * n["single"]
        fits = max(0, (mem_available() - HEADROOM - n["rest"]) // max(per_double, 1))
        raise SystemExit(f"MemAvailable {mem_available() / GIB:.1f} GiB < {need / GIB:.1f} GiB (fp8 weights + "
                         f"{HEADROOM / GIB:.0f} GiB headroom) for {double} double + {single} single blocks; "
                         f"try --layers {min(fits, 19)} {min(2 * fits, 38)}")
    base = kib_status("VmRSS")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Flux(config).eval()
    quant.store_fp8(model, random_fp8_state_dict(model), compute_dtype=torch.bfloat16, name="flux")
    build_s = time.perf_counter() - t0
    with_weights = kib_status("VmRSS")
    held = quant.parameter_bytes(model)
    args = inputs(config, text_length)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size (Linux >= 4.0)
        f.write("5")
    before = kib_status("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(*args)
    step_s = time.perf_counter() - t0
    peak = kib_status("VmHWM")
    return dict(double=double, single=single, text_length=text_length, image_tokens=args[0].shape[1],
                counts=n, fp8_bytes=held.get(torch.float8_e4m3fn, 0), bf16_bytes=held.get(torch.bfloat16, 0),
                base_rss=base, rss_with_weights=with_weights, step_peak=peak, activation_overhead=peak - before,
                build_s=build_s, step_s=step_s, output_finite=bool(out.isfinite().all()),
                threads=torch.get_num_threads())


def figures(r: dict) -> list[tuple[str, str, float, float, str]]:
    """(storage, blocks, parameter GiB, peak GiB, how) rows for this run and for the full model."""
    rows = []
    fp8_params = r["fp8_bytes"] + r["bf16_bytes"]
    rows.append(("fp8", f"{r['double']}+{r['single']}", fp8_params / GIB, r["step_peak"] / GIB, "measured"))
    built, total = r["counts"]["total"], counts(FULL)
    full = r["double"] == FULL.num_layers and r["single"] == FULL.num_single_layers
    overhead = r["rss_with_weights"] - fp8_params + r["activation_overhead"]  # all that is not parameters
    for name, size in (("bf16", 2), ("fp32", 4)):
        rows.append((name, f"{r['double']}+{r['single']}", built * size / GIB,
                     (built * size + overhead) / GIB, "computed"))
    if not full:
        extras = fp8_params - built  # the bf16 biases and norm scales: one extra byte each
        fp8_full = total["total"] + extras * total["total"] / built
        rows.append(("fp8", "19+38", fp8_full / GIB, (fp8_full + overhead) / GIB, "extrapolated"))
        for name, size in (("bf16", 2), ("fp32", 4)):
            rows.append((name, "19+38", total["total"] * size / GIB, (total["total"] * size + overhead) / GIB,
                         "computed"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"),
                        default=[FULL.num_layers, FULL.num_single_layers])
    parser.add_argument("--text-length", type=int, default=512, help="T5 tokens (FLUX.1-dev: up to 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = measure(*args.layers, args.text_length)
    rows = figures(r)
    if args.json:
        return print(json.dumps(r | dict(rows=[dict(zip(("storage", "blocks", "params_gib", "peak_gib", "how"), row))
                                             for row in rows])))
    c = r["counts"]
    print(f"torch {torch.__version__}, {r['threads']} threads, load average {os.getloadavg()[0]:.1f}; FLUX.1-dev "
          f"shape, {r['double']} double + {r['single']} single blocks, {c['total'] / 1e9:.3f}B parameters")
    print(f"one step: {r['image_tokens']} image + {r['text_length']} text tokens, batch 1, bf16 compute: "
          f"{r['step_s']:.1f} s (materialising the weights: {r['build_s']:.1f} s); output finite: "
          f"{r['output_finite']}")
    print(f"per block: double {c['double'] / 1e6:.1f}M params ({c['double'] / 2 ** 20:.0f} MiB in fp8), "
          f"single {c['single'] / 1e6:.1f}M ({c['single'] / 2 ** 20:.0f} MiB); outside blocks "
          f"{c['rest'] / 1e6:.1f}M")
    print(f"measured: base RSS {r['base_rss'] / GIB:.2f} GiB, with weights {r['rss_with_weights'] / GIB:.2f} GiB, "
          f"step peak {r['step_peak'] / GIB:.2f} GiB, activation overhead {r['activation_overhead'] / 2 ** 20:.0f} "
          f"MiB (fp8 {r['fp8_bytes'] / GIB:.2f} GiB + bf16 {r['bf16_bytes'] / 2 ** 20:.0f} MiB of parameters)")
    print(f"{'storage':8} {'blocks':>7} {'params GiB':>11} {'peak GiB':>9}  how")
    for storage, blocks, params, peak, how in rows:
        print(f"{storage:8} {blocks:>7} {params:>11.2f} {peak:>9.2f}  {how}")
    print("peak: resident high-water mark of the process during the step. computed rows: parameters x 2 (bf16) "
          "or x 4 (fp32) + what the fp8 run held beyond its parameters (resident with weights - parameter bytes "
          "+ activation overhead)")


if __name__ == "__main__":
    main()
