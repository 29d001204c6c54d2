"""The `reverie` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .train.cli import add_train_parser, parse_args


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, sampler=args.sampler)
    print(f"wrote {args.out}")


BUNDLED = Path(__file__).parent / "bundled"  # models trained by reverie, shipped with the package


def model_path(model: str | None) -> Path:
    """A path as given, or the name of a bundled model ("shapes" when None)."""
    bundled = sorted(p.name for p in BUNDLED.iterdir() if (p / "model_index.json").is_file()) \
        if BUNDLED.is_dir() else []
    if model is None:
        if "shapes" not in bundled:
            raise ValueError("--model: no bundled model is installed; pass a diffusers folder or a .safetensors file")
        return BUNDLED / "shapes"
    if Path(model).exists():
        return Path(model)
    if model in bundled:
        return BUNDLED / model
    raise ValueError(f"--model: {model!r} is neither a path nor a bundled model ({', '.join(bundled) or 'none'})")


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _generate(args) -> None:
    import torch

    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_path(args.model), device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, offload=args.offload)
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    result = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, scheduler=args.scheduler, width=args.width, height=args.height,
                  seed=args.seed, num_images=args.num_images, clip_skip=args.clip_skip)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        print(f"wrote {path} (seed {result.params['seeds'][i]})")


def _eval(args) -> None:
    from .eval.adherence import evaluate_shapes, shapes_captions
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_path(args.model), device=args.device)
    captions = shapes_captions(args.split, args.n, args.caption_seed)
    scores = evaluate_shapes(pipe, captions, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                             seed=args.seed)
    print(f"shapes adherence, {args.split} captions, {args.sampler}, {args.steps} steps, guidance {args.guidance}:")
    for key, value in scores.items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")


def _samplers(args) -> None:
    from .samplers import SAMPLERS

    for name, fn in SAMPLERS.items():
        print(f"{name:16s} {(fn.__doc__ or '').splitlines()[0]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reverie", description="Diffusion models built for real.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write a PNG of the forward and reverse diffusion process")
    demo.add_argument("--out", default="demo.png", help="output PNG path (default: demo.png)")
    demo.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--sampler", default="DPM++ 2M Karras", help="any name reverie.samplers.resolve accepts")
    demo.set_defaults(run=_demo)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="a bundled model's name (default: shapes), a diffusers folder or a "
                                     "single-file .safetensors checkpoint")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--sampler", default="dpmpp_2m", help="any name reverie.samplers.resolve accepts")
    gen.add_argument("--scheduler", default=None, help="schedule type: karras, exponential, normal, automatic")
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--clip-skip", type=int, default=None, help="CLIP layers to skip (A1111's 'Clip skip 2' = 1)")
    gen.add_argument("--out", default="out.png")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    gen.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file checkpoints have none)")
    gen.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"])
    gen.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (can run code!)")
    gen.add_argument("--attention-slicing", action="store_true", help="less memory, a little slower")
    gen.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    gen.add_argument("--offload", action="store_true", help="keep models on the CPU until each is needed")
    gen.set_defaults(run=_generate)

    add_train_parser(sub)

    ev = sub.add_parser("eval", help="score a shapes model's prompt adherence with the shapes analyzer")
    ev.add_argument("--model", help="a bundled model's name (default: shapes) or a model folder")
    ev.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ev.add_argument("--n", type=int, default=200, help="number of captions (default: 200)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=7.5)
    ev.add_argument("--sampler", default="dpmpp_2m")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--caption-seed", type=int, default=1)
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(run=_eval)

    samplers = sub.add_parser("samplers", help="list the samplers")
    samplers.set_defaults(run=_samplers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # routes --section.key=value overrides to `train`
    try:
        args.run(args)
    except ValueError as e:
        print(f"reverie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
