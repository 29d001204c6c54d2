"""The `reverie` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, sampler=args.sampler)
    print(f"wrote {args.out}")


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

    samplers = sub.add_parser("samplers", help="list the samplers")
    samplers.set_defaults(run=_samplers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        print(f"reverie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
