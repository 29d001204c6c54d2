"""reverie against its peers on this CPU: one random-weight SD 1.5-architecture single file, the same image for all.

Install the peers first (they are not reverie dependencies; stable-diffusion.cpp builds from source, minutes on
2 cores):

    pip install -e ".[test]" -c constraints.txt          # diffusers, as the tests use it
    pip install openvino stable-diffusion-cpp-python

1. Builds `--file` (default /tmp/reverie-peers/sd15-random.safetensors, fp16, about 2 GB) once: an SD 1.5 UNet,
   VAE and CLIP ViT-L/14 text encoder with name-seeded random weights (fan-in-scaled normals, norms near 1) in the
   original (LDM / A1111) key layout, as people download them; and a diffusers config folder beside it (what
   diffusers' from_single_file needs offline; its tokenizer is a small byte-level CLIP BPE built here, so the
   prompt's token ids differ from sd.cpp's built-in CLIP vocabulary: the timings do not depend on them).
2. Times one whole image — text encoding, --steps Euler steps with classifier-free guidance --guidance, VAE
   decode — at --size, --threads threads, fp32, in a fresh subprocess per framework and repetition (load not
   timed, one warm-up image first): reverie (`Pipeline.from_pretrained` of the file), diffusers
   (`StableDiffusionPipeline.from_single_file`), stable-diffusion.cpp (its Python binding, f32 and q8_0 weights).
   The frameworks alternate, --reps times; printed: median seconds and the ratio to reverie.
3. One UNet step (latent 32x32, batch 2, fp32): reverie eager and diffusers eager alternating in one process,
   and OpenVINO (`openvino.convert_model` of diffusers' UNet with the same weights, compiled for the CPU with
   --threads inference threads and f32 precision) in another; median of --step-reps; the max abs difference of
   each output from diffusers'.

    python bench/peers.py [--reps 2] [--step-reps 5] [--size 256] [--steps 4] [--threads 2] [--only reverie,diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
              eos_token_id=49407, pad_token_id=49407)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=512)


def fill(module) -> None:
    """Name-seeded weights: fan-in-scaled normals for matrices and kernels, 1 +- 0.02 for norm weights."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "norm" in name and "weight" in name else 0))


def build(file: Path) -> Path:
    """The single file and the diffusers config folder beside it (made once)."""
    folder = file.with_suffix("")
    if file.is_file() and (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_families import clip_tokenizer

    from reverie.formats.safetensors_io import save_safetensors
    from reverie.formats.single_file import to_ldm_checkpoint
    from reverie.models.unet import UNET_PRESETS

    unet = UNet2DConditionModel.from_config(UNET_PRESETS["sd15"].to_dict())
    vae, text = AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**CLIP_L))
    for module in (unet, vae, text):
        fill(module)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):  # the folder keeps configs only: the weights are the file's
        for weights in (folder / name).glob("*.safetensors"):
            weights.unlink()
    te = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()}
    state = to_ldm_checkpoint({"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": te})
    save_safetensors({k: v.half().contiguous() for k, v in state.items() if v.is_floating_point()}
                     | {k: v for k, v in state.items() if not v.is_floating_point()}, file)
    return folder


def generate(framework: str, file: Path, folder: Path, size: int, steps: int, guidance: float, threads: int) -> float:
    """In this (fresh) process: load, one warm-up image, then one timed image; returns its seconds."""
    import torch

    torch.set_num_threads(threads)
    if framework == "reverie":
        from reverie import Pipeline

        pipe = Pipeline.from_pretrained(file, tokenizer=folder / "tokenizer", dtype=torch.float32)
        run = lambda: pipe(PROMPT, steps=steps, guidance_scale=guidance, sampler="euler", width=size, height=size,
                           seed=[0], progress=False)
    elif framework == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                           generator=torch.Generator().manual_seed(0))
    else:  # sdcpp-f32, sdcpp-q8_0
        from stable_diffusion_cpp import StableDiffusion

        sd = StableDiffusion(model_path=str(file), n_threads=threads, wtype=framework.split("-")[1], verbose=False)
        run = lambda: sd.generate_image(prompt=PROMPT, width=size, height=size, sample_steps=steps, cfg_scale=guidance,
                                        sample_method="euler", seed=0)
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def unet_steps(folder: Path, file: Path, reps: int, threads: int, which: str, out: Path) -> dict:
    """One UNet step in this process: which="torch" times reverie and diffusers eager in turn, which="openvino"
    OpenVINO (in a process of its own: its worker threads keep spinning after each call, slowing whatever runs
    next). Median seconds per name; the outputs are saved to `out` for the comparison."""
    import torch
    from diffusers import UNet2DConditionModel

    from reverie.formats.safetensors_io import load_safetensors
    from reverie.formats.single_file import split_ldm_checkpoint
    from reverie.models.unet import UNet

    torch.set_num_threads(threads)
    weights = {k: v.float() for k, v in split_ldm_checkpoint(load_safetensors(file))["unet"].items()}
    theirs = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).eval()
    theirs.load_state_dict(weights)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([801.0, 801.0]), torch.randn(2, 77, 768, generator=g)
    if which == "torch":
        ours = UNet.from_config(json.loads((folder / "unet" / "config.json").read_text())).eval()
        ours.load_state_dict(weights)
        calls = {"reverie": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t, ctx).sample}
    else:
        import numpy as np
        import openvino as ov

        class Plain(torch.nn.Module):  # diffusers' UNet with a tensor output, for the converter
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x, t, ctx):
                return self.net(x, t, ctx).sample

        model = ov.convert_model(Plain(theirs), example_input=(x, t, ctx))
        # f32 inference precision: on CPUs with bf16 units OpenVINO otherwise runs in bf16 (max abs diff ~0.3 here)
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "INFERENCE_PRECISION_HINT": "f32"})
        calls = {"openvino": lambda: torch.from_numpy(np.asarray(compiled((x.numpy(), t.numpy(), ctx.numpy()))[0]))}
    times, outputs = {name: [] for name in calls}, {}
    with torch.inference_mode():
        for name, call in calls.items():
            outputs[name] = call()  # warm-up
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    torch.save(outputs, out)
    return {name: statistics.median(times[name]) for name in calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="/tmp/reverie-peers/sd15-random.safetensors")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--step-reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="reverie,diffusers,sdcpp-f32,sdcpp-q8_0")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    file = Path(args.file)
    if args.worker:  # one timed image in this process
        seconds = generate(args.worker, file, file.with_suffix(""), args.size, args.steps, args.guidance, args.threads)
        print(json.dumps({"seconds": seconds}))
        return 0
    if args.step_worker:  # one UNet-step measurement in this process
        print(json.dumps(unet_steps(file.with_suffix(""), file, args.step_reps, args.threads, args.step_worker,
                                    Path(args.out))))
        return 0
    file.parent.mkdir(parents=True, exist_ok=True)
    folder = build(file)
    frameworks = args.only.split(",")
    print(f"peers: one random SD 1.5-architecture file ({file.stat().st_size / 2**30:.2f} GiB fp16), {args.size}x"
          f"{args.size}, {args.steps} Euler steps, guidance {args.guidance}, {args.threads} threads, fp32 compute, "
          f"CPU ({os.cpu_count()} cores); whole image (text, sampling, decode), median of {args.reps}", flush=True)
    samples = {name: [] for name in frameworks}
    for _ in range(0 if args.skip_images else args.reps):
        for name in frameworks:
            command = [sys.executable, __file__, "--worker", name, "--file", str(file), "--size", str(args.size),
                       "--steps", str(args.steps), "--guidance", str(args.guidance), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            samples[name].append(seconds)
            print(f"  {name}: {seconds:.2f} s", flush=True)
    rows = {name: statistics.median(values) for name, values in samples.items() if values}
    base = rows.get("reverie")
    print("\n| framework | seconds per image | vs reverie |" if rows else "")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x |" if base else f"| {name} | {seconds:.2f} | - |")
    if not args.skip_step:
        import tempfile

        import torch

        seconds, outputs = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for which in ("torch", "openvino"):
                out = Path(tmp) / f"{which}.pt"
                command = [sys.executable, __file__, "--step-worker", which, "--file", str(file), "--step-reps",
                           str(args.step_reps), "--threads", str(args.threads), "--out", str(out)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(f"UNet step ({which}): failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                seconds |= json.loads(done.stdout.strip().splitlines()[-1])
                outputs |= torch.load(out)
        reference = outputs["diffusers"]
        print("\n| UNet step, 32x32 latent, batch 2 | seconds | diffusers / it | max abs diff from diffusers |")
        print("|---|---|---|---|")
        for name, value in seconds.items():
            print(f"| {name} | {value:.3f} | {seconds['diffusers'] / value:.2f}x | "
                  f"{float((outputs[name] - reference).abs().max()):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
