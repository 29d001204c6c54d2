"""Sample quality of an emoji model: FID in the feature space of a network trained here, and nearest
training images (is the model copying?).

The feature network. Inception features cannot be downloaded here, so reverie trains its own: a small CNN
that classifies every emoji of the data set into its Unicode subgroup (emoji-test.txt's "# subgroup:" lines,
about 100 classes: "face-smiling", "animal-mammal", "food-fruit", "transport-air", ...) from randomly shifted,
scaled and flipped renderings. Its 256-d penultimate activations are the features. It is trained
deterministically by `train_feature_net()` (about 3 minutes on one CPU core) and shipped as
`reverie/bundled/features/emoji.safetensors`, so every FID reported with it is comparable.

    python -m reverie.eval.emoji train-features        # re-train the shipped feature network
    reverie eval --model emoji                         # FID, nearest neighbours and a sample grid

FID = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)) between Gaussian fits of generated and training
features (Heusel et al. 2017); lower is better; with a few hundred samples it is biased upwards, so compare
numbers computed with the same n only.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.emoji import NAMES_PATH, EmojiDataset
from ..formats import load_safetensors, save_safetensors

FEATURES_PATH = Path(__file__).resolve().parent.parent / "bundled" / "features" / "emoji.safetensors"
FEATURE_DIM = 256


def emoji_subgroups(path=NAMES_PATH) -> dict[str, str]:
    """CLDR name -> Unicode subgroup ("red apple" -> "food-fruit") for every fully-qualified emoji."""
    subgroups, current = {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            current = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and current is not None:
            subgroups[line.split("#", 1)[1].split(None, 2)[2].strip()] = current
    return subgroups


class FeatureNet(nn.Module):
    """64x64 RGB in [-1, 1] -> 256-d features (global average of the last conv block) -> subgroup logits."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random scale (0.8-1.1), shift (+-8 px) and horizontal flip, on a white background."""
    b = x.shape[0]
    scale = 0.8 + 0.3 * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.5
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # outside: white (0 + 1 - 1)


def train_feature_net(steps: int = 1500, batch_size: int = 64, seed: int = 0, log_every: int = 100):
    """Train the feature network on the emoji data set (deterministic for a seed). Returns (net, classes)."""
    data = EmojiDataset(resolution=64)
    subgroup_of = emoji_subgroups()
    classes = sorted({subgroup_of[c] for c in data.captions})
    labels = torch.tensor([classes.index(subgroup_of[c]) for c in data.captions])
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    torch.manual_seed(seed)
    net = FeatureNet(len(classes))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = F.cross_entropy(net(_augment(images[idx], g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean().item()
    print(f"feature net: {len(classes)} subgroups, accuracy on the unaugmented images {accuracy:.3f}")
    return net, classes


def save_feature_net(net: FeatureNet, classes: list[str], path=FEATURES_PATH) -> None:
    weights = {k: v.half() for k, v in net.state_dict().items()}
    save_safetensors(weights, path, metadata={"classes": "\n".join(classes)})


def load_feature_net(path=FEATURES_PATH) -> FeatureNet:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        classes = f.metadata()["classes"].split("\n")
    net = FeatureNet(len(classes))
    net.load_state_dict({k: v.float() for k, v in load_safetensors(path).items()})
    net.classes = classes  # subgroup names, in the order of the logits
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features(net: FeatureNet, images: Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, 3, 64, 64) in [-1, 1] -> (N, 256) float64 features."""
    return torch.cat([net.features(images[i:i + batch_size].float())
                      for i in range(0, len(images), batch_size)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between the Gaussian fits of two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def nearest_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance from each query row to its nearest reference row (skipping itself when the two sets
    are the same)."""
    d2 = (queries ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None] - 2 * queries @ references.T
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.clip(d2.min(1), 0, None))


def own_ranks(queries: np.ndarray, references: np.ndarray, own: list[int]) -> np.ndarray:
    """For each query row, how many reference rows are nearer to it than reference own[i] (0: its own image is
    the nearest): whether a sample of a name looks like that name's emoji rather than some other."""
    d2 = (queries ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None] - 2 * queries @ references.T
    mine = d2[np.arange(len(own)), own]
    return (d2 < mine[:, None]).sum(1)


def evaluate_emoji(pipe, *, n: int = 300, steps: int = 20, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                   seed: int = 0, batch_size: int = 16, net: FeatureNet | None = None) -> dict:
    """Generate one image for each of n captions drawn from the data set (seeded), and report FID against the
    whole training set, the generated images' nearest-training-image distances (pixels on 0..1, RMS, and
    features) and, for scale, the training images' distances to their nearest other training image; and how
    often a sample's own name's image is the nearest training image in pixels (own_top1) or among the 10
    nearest (own_top10): the names are unique, so this says whether the samples are recognisable as what was
    asked for."""
    net = net or load_feature_net()
    data = EmojiDataset(resolution=64)
    real = torch.stack([data[i]["image"] for i in range(len(data))])
    picks = np.random.default_rng(seed).choice(len(data), n, replace=False)
    captions = [data.captions[i] for i in picks]
    fake = []
    for start in range(0, n, batch_size):
        batch = captions[start:start + batch_size]
        result = pipe(batch, steps=steps, guidance_scale=guidance_scale, sampler=sampler, width=64, height=64,
                      seed=[seed + start + i for i in range(len(batch))], progress=False)
        fake += [torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in result.images]
    fake = torch.stack(fake)
    f_real, f_fake = features(net, real), features(net, fake)
    px_real, px_fake = ((real + 1) / 2).flatten(1).double().numpy(), ((fake + 1) / 2).flatten(1).double().numpy()
    rms = np.sqrt(px_real.shape[1])
    ranks = own_ranks(px_fake, px_real, list(picks))
    # the real-vs-real reference: FID of n training images against all of them (the floor at this n)
    subset = np.random.default_rng(seed + 1).choice(len(real), n, replace=False)
    return {
        "n": n, "fid": frechet_distance(f_fake, f_real), "fid_train_subset": frechet_distance(f_real[subset], f_real),
        "nn_pixel_rms_generated": float(np.median(nearest_distances(px_fake, px_real)) / rms),
        "nn_pixel_rms_train": float(np.median(nearest_distances(px_real, px_real, exclude_self=True)) / rms),
        "nn_feature_generated": float(np.median(nearest_distances(f_fake, f_real))),
        "nn_feature_train": float(np.median(nearest_distances(f_real, f_real, exclude_self=True))),
        "own_top1": float(np.mean(ranks == 0)), "own_top10": float(np.mean(ranks < 10)),
        "captions": captions, "images": fake,
    }


GRID_PROMPTS = ("red apple", "dog face", "rocket", "pizza", "grinning face", "thumbs up: medium skin tone")


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the emoji feature network used for FID")
    parser.add_argument("command", choices=["train-features"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=str(FEATURES_PATH))
    args = parser.parse_args(argv)
    net, classes = train_feature_net(args.steps)
    save_feature_net(net, classes, args.out)
    print(f"wrote {args.out}; class sizes: {Counter(emoji_subgroups().values()).most_common(3)} ...")


if __name__ == "__main__":
    _main()
