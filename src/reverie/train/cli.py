"""`reverie train CONFIG [--resume | --resume-from CHECKPOINT] [--section.key=value ...]`, alone or under torchrun.

    reverie train configs/shapes_vae.json --train.steps=2000
    torchrun --nproc_per_node=2 -m reverie.train.cli configs/shapes_unet.toml --resume
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """overrides: any config key as --section.key=value (sections: model, data, optim, train, log), e.g.
  --optim.lr=2e-4 --train.steps=100 --train.batch_size=64 --data.options.size=64 --model.prediction=v_prediction
Values are checked against the config's types; an unknown key is an error that lists the valid ones."""


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand to an argparse subparsers object (reverie.cli)."""
    parser = subparsers.add_parser(
        "train", help="train a VAE or a text-to-image latent diffusion model from a config file",
        description="Train a VAE or a latent denoiser (+ text encoder). Runs under torchrun unchanged.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("config", help="a .json or .toml config file (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in train.output_dir (a new run if there is none)")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                        help="continue from this checkpoint directory (e.g. RUN/checkpoints/step_00001000)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(run=run_train, overrides_allowed=True)
    return parser


def run_train(args) -> None:
    """The `train` subcommand. ValueErrors (bad config, bad data) propagate to the caller's error handler."""
    import json

    from .config import load_config
    from .loop import NonFiniteLossError, train

    config = load_config(args.config, getattr(args, "overrides", []))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return
    try:
        result = train(config, resume=args.resume_from or args.resume)
    except NonFiniteLossError as e:
        print(f"reverie train: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if result.rank != 0:
        return
    if result.stopped:
        print(f"reverie train: stopped at step {result.step}; checkpoint {result.checkpoint}")
    else:
        print(f"reverie train: done, {result.step} steps ({result.skipped} skipped); model in {result.export}")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_known_args, with the leftover --section.key=value arguments kept as config overrides."""
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "overrides_allowed", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reverie")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parse_args(parser, ["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.run(args)
    except ValueError as e:
        print(f"reverie train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
