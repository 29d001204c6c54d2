"""Training throughput of the shapes tasks, one optimizer step at a time, on CPU or GPU: the UNet (UNet "small",
configs/shapes_unet.toml) and reverie's MMDiT (configs/shapes_mmdit.toml), each with a 4-layer text encoder trained
jointly on 3x16x16 latents from the shipped VAE. Several configs are timed in one run, their steps interleaved
(round-robin), so the machine's noise falls on all of them alike; the last lines are images/s ratios against the
first config.

On the H100 lease the shapes UNet trained at about 9-10 it/s at batch 256 whether it had the GPU to itself or
shared it, so the step was not GPU-bound; the split below (host-side inputs vs the whole step) and --profile show
where the time goes.

    python bench/train_step.py                                  # UNet vs MMDiT on CPU, batch 32
    python bench/train_step.py --config configs/shapes_unet.toml --config configs/shapes_unet.toml --compile 1
    python bench/train_step.py --config configs/shapes_unet.toml --config configs/shapes_mmdit.toml \
        --config configs/shapes_mmdit.toml --set 2:model.text_max_length=16 --set 2:model.text_layers=1
    python bench/train_step.py --device cuda --batch 256 --amp bf16
    python bench/train_step.py --config configs/shapes_mmdit.toml --steps 30 --profile 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_CONFIGS = ["configs/shapes_unet.toml", "configs/shapes_mmdit.toml"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(path: str, args, out: Path, compiled: bool, overrides: list[str]):
    from reverie.data.shapes import ShapesDataset
    from reverie.train import load_config
    from reverie.train.distributed import setup_distributed
    from reverie.train.loop import Trainer

    config = load_config(path, [
        f"--model.vae_path={args.vae}", f"--train.output_dir={out}", f"--train.batch_size={args.batch}",
        f"--train.device={args.device}", f"--train.mixed_precision={args.amp}", "--log.progress=false",
        f"--data.options.size={args.images}", *overrides])
    dist = setup_distributed(config.train.device)
    trainer = Trainer(config, ShapesDataset(size=args.images, resolution=64, seed=0), dist, out, resume=False)
    trainer.start(None)
    if compiled:  # the loop calls trainer.ddp; the weights stay those of trainer.model
        trainer.ddp = torch.compile(trainer.model)
    for _ in range(3):  # warm-up (and compilation)
        trainer.step(False)
    sync(dist.device)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=None,
                        help=f"a shapes unet or mmdit config, repeatable (default: {' and '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--compile", action="append", type=int, default=None, metavar="INDEX",
                        help="torch.compile the objective of the config at this index (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="INDEX:KEY=VALUE",
                        help="a config override for the config at INDEX, e.g. 1:model.text_layers=1 (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (after 3 warm-up steps)")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps of each config")
    parser.add_argument("--vae", default="src/reverie/bundled/shapes/vae")
    parser.add_argument("--images", type=int, default=2000, help="data set size (its latents are cached first)")
    args = parser.parse_args()
    configs, compiled = args.config or DEFAULT_CONFIGS, set(args.compile or ())

    with tempfile.TemporaryDirectory() as root:
        overrides = [[f"--{o.split(':', 1)[1]}" for o in args.set if o.split(":", 1)[0] == str(i)]
                     for i in range(len(configs))]
        trainers = [make_trainer(path, args, Path(root) / str(i), i in compiled, overrides[i])
                    for i, path in enumerate(configs)]
        device = trainers[0].dist.device
        step_s = [[] for _ in trainers]
        inputs_s = [[] for _ in trainers]
        items = list(enumerate(range(args.batch)))
        for k in range(args.steps):
            for i, trainer in enumerate(trainers):  # round-robin: the same moment of the machine for each
                t0 = time.perf_counter()
                trainer.task.inputs(1000 + k, items)
                sync(device)
                t1 = time.perf_counter()
                trainer.step(False)
                sync(device)
                inputs_s[i].append(t1 - t0)
                step_s[i].append(time.perf_counter() - t1)

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        print(f"shapes training steps on {name}, batch {args.batch}, mixed precision {args.amp}, median of "
              f"{args.steps} interleaved steps (torch {torch.__version__})")
        rates = []
        for i, (path, trainer) in enumerate(zip(configs, trainers)):
            step, inp = statistics.median(step_s[i]), statistics.median(inputs_s[i])
            params = sum(p.numel() for p in trainer.task.network.parameters()) / 1e6
            rates.append(args.batch / step)
            print(f"  [{i}] {trainer.config.model.kind:6s} {params:5.1f}M parameters{', compiled' if i in compiled else ''}"
                  f"  ({path}{''.join(' ' + o for o in overrides[i])})")
            print(f"      whole step {step * 1e3:8.1f} ms   ({1 / step:.2f} it/s, {rates[-1]:.1f} images/s); "
                  f"task.inputs {inp * 1e3:.1f} ms ({inp / step:.1%})")
        for i in range(1, len(configs)):
            print(f"  [{i}] / [0] images/s: {rates[i] / rates[0]:.2f}x")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for i, trainer in enumerate(trainers):
                with profile(activities=activities) as prof:
                    for _ in range(args.profile):
                        trainer.step(False)
                    sync(device)
                print(f"[{i}] {configs[i]}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                if device.type == "cuda":
                    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
