"""Reconstruction PSNR of a trained VAE on the shapes data set (training and held-out splits) or on emoji.

    python bench/vae_psnr.py runs/shapes_vae/model/vae [--n 128]
    python bench/vae_psnr.py runs/emoji_vae/model/vae --data emoji   # n emoji spread evenly over all 3,655

Images in [-1, 1] are encoded (posterior mode) and decoded; PSNR is computed on [0, 1] per image, then
averaged. This is how the VAE's downsampling factor (4 or 8) is chosen."""

import argparse

import torch

from reverie.data.shapes import ShapesDataset
from reverie.formats import load_state_dict_strict, load_weights, read_config
from reverie.models.vae import AutoencoderKL


def psnr(vae, split: str, n: int) -> float:
    if split == "emoji":
        from reverie.data import make_dataset

        data = make_dataset("emoji", resolution=64)
        x = torch.stack([data[i * len(data) // n]["image"] for i in range(n)])
    else:
        data = ShapesDataset(size=n, split=split, seed=7)
        x = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", help="a vae/ component folder (config.json + safetensors)")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--data", choices=["shapes", "emoji"], default="shapes")
    args = parser.parse_args()
    vae = AutoencoderKL.from_config(read_config(args.vae))
    load_state_dict_strict(vae, load_weights(args.vae), name="vae")
    vae.eval()
    print(f"{args.vae}: factor {vae.downsample_factor}, latent channels {vae.config.latent_channels}")
    for split in ("train", "heldout") if args.data == "shapes" else ("emoji",):
        print(f"  {split:8s} PSNR {psnr(vae, split, args.n):.2f} dB over {args.n} images")


if __name__ == "__main__":
    main()
