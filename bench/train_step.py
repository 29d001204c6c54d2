"""Where a training step's time goes: the shapes UNet task (UNet "small" + a 4-layer text encoder trained jointly,
3x16x16 latents from a VAE), one optimizer step at a time, on CPU or GPU.

On the H100 lease the shapes UNet trained at about 9-10 it/s at batch 256 whether it had the GPU to itself or
shared it, so the step was not GPU-bound; this prints the split between the host-side inputs (per-item noise
generators, token ids), the whole step, and the top operators by host and device time (torch.profiler).

    python bench/train_step.py                                  # CPU, batch 32
    python bench/train_step.py --device cuda --batch 256 --amp bf16 [--compile]
    python bench/train_step.py --vae src/reverie/bundled/shapes/vae --steps 30 --profile 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    from reverie.data.shapes import ShapesDataset
    from reverie.train import load_config
    from reverie.train.distributed import setup_distributed
    from reverie.train.loop import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps with torch.profiler")
    parser.add_argument("--compile", action="store_true", help="torch.compile the objective (UNet + text encoder)")
    parser.add_argument("--vae", default="src/reverie/bundled/shapes/vae")
    parser.add_argument("--images", type=int, default=2000, help="data set size (its latents are cached first)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        config = load_config("configs/shapes_unet.toml", [
            f"--model.vae_path={args.vae}", f"--train.output_dir={out}", f"--train.batch_size={args.batch}",
            f"--train.device={args.device}", f"--train.mixed_precision={args.amp}", "--log.progress=false",
            f"--data.options.size={args.images}"])
        dist = setup_distributed(config.train.device)
        trainer = Trainer(config, ShapesDataset(size=args.images, resolution=64, seed=0), dist, Path(out),
                          resume=False)
        trainer.start(None)
        if args.compile:  # the loop calls trainer.ddp; the weights stay those of trainer.model
            trainer.ddp = torch.compile(trainer.model)
        device, task = dist.device, trainer.task
        for _ in range(3):
            trainer.step(False)
        sync(device)

        items = [(s, i) for s, i in enumerate(range(args.batch))]
        inputs_s = []
        for k in range(args.steps):
            t0 = time.perf_counter()
            task.inputs(1000 + k, items)
            sync(device)
            inputs_s.append(time.perf_counter() - t0)
        step_s = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.step(False)
            sync(device)
            step_s.append(time.perf_counter() - t0)

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        step, inp = statistics.median(step_s), statistics.median(inputs_s)
        print(f"shapes UNet task on {name}, batch {args.batch}, mixed precision {args.amp}"
              f"{', compiled' if args.compile else ''} (torch {torch.__version__})")
        print(f"  whole step      {step * 1e3:8.1f} ms   ({1 / step:.2f} it/s, {args.batch / step:.0f} images/s)")
        print(f"  task.inputs     {inp * 1e3:8.1f} ms   ({inp / step:.0%} of the step: per-item noise and token ids)")
        print(f"  the rest        {(step - inp) * 1e3:8.1f} ms   (forward, backward, clipping, AdamW, EMA)")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(args.profile):
                    trainer.step(False)
                sync(device)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            if device.type == "cuda":
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
