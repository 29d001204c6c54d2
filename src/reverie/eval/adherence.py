"""Prompt adherence of a shapes model: generate from captions, read the images back with the analyzer.

    reverie eval --model runs/shapes_unet/model --split heldout --n 200 --guidance 7.5 --steps 20
    reverie eval --sweep cfg --plot docs/cfg.png      # adherence and diversity at guidance 1, 2, 4, 7.5, 12, 20
    reverie eval --sweep steps --plot docs/steps.png  # adherence against steps for ddim, euler, dpmpp_2m, unipc
    reverie eval --prompt "a red circle above a blue square" --plot first.png    # one caption, seeds 0-9
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from ..data.shapes import ShapesDataset, parse_caption
from .plot import Panel, save_panels
from .shapes import score

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


GRID_PROMPTS = ("a red circle", "a blue square on the left", "a large green triangle in the center",
                "a yellow circle above a blue square", "a small red square at the top",
                "a green circle to the left of a yellow triangle", "a blue triangle", "a yellow square")


def shapes_captions(split: str = "heldout", n: int = 200, seed: int = 1) -> list[str]:
    """n captions of the data set's split (held-out combinations by default), one- and two-object."""
    return list(ShapesDataset(size=n, split=split, seed=seed).captions)


def evaluate_shapes(pipe, captions: list[str], *, steps: int = 20, guidance_scale: float = 7.5,
                    sampler: str = "dpmpp_2m", seed: int = 0, batch_size: int = 16,
                    prompts: list[str] | None = None) -> dict:
    """Fraction of images correct per attribute and fully correct, for one- and two-object captions.

    Attributes a caption does not state are not scored. Image i uses seed + i. prompts: what to generate
    from, when not the captions themselves (paraphrases of them, reverie.eval.paraphrase); images are still
    scored against the captions."""
    if prompts is not None and len(prompts) != len(captions):
        raise ValueError(f"prompts: give one per caption ({len(captions)}), got {len(prompts)}")
    hits, totals = defaultdict(int), defaultdict(int)
    for start in range(0, len(captions), batch_size):
        batch = captions[start:start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        result = pipe(batch if prompts is None else prompts[start:start + batch_size], steps=steps,
                      guidance_scale=guidance_scale, sampler=sampler, width=64, height=64, seed=seeds, progress=False)
        for caption, image in zip(batch, result.images):
            scores = score(image, caption)
            group = "two" if len(parse_caption(caption).objects) == 2 else "one"
            for key in (*ATTRIBUTES, "fully_correct"):
                if scores.get(key) is not None:
                    hits[group, key] += bool(scores[key])
                    totals[group, key] += 1
    return {f"{group}/{key}": hits[group, key] / totals[group, key] for group, key in sorted(totals)} | {
        "n_one": totals["one", "fully_correct"], "n_two": totals["two", "fully_correct"]}


def prompt_seeds(pipe, prompt: str, seeds: int = 10, *, steps: int = 20, guidance_scale: float = 7.5,
                 sampler: str = "dpmpp_2m", seed: int = 0) -> tuple[list[dict], list]:
    """One caption at seeds seed .. seed + seeds - 1 (as evaluate_shapes numbers them): each image's analyzer
    scores, and the images."""
    result = pipe([prompt] * seeds, steps=steps, guidance_scale=guidance_scale, sampler=sampler, width=64, height=64,
                  seed=list(range(seed, seed + seeds)), progress=False)
    return [score(image, prompt) for image in result.images], result.images


def diversity(pipe, captions: list[str], *, seeds: int = 4, steps: int = 20, guidance_scale: float = 7.5,
              sampler: str = "dpmpp_2m", seed: int = 0) -> float:
    """How different the images of one caption are across seeds: the root-mean-square pixel difference (on
    0..1) between every pair of `seeds` images of a caption, averaged over pairs and captions. 0 means every
    seed draws the same image."""
    distances = []
    for i, caption in enumerate(captions):
        result = pipe([caption] * seeds, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                      width=64, height=64, seed=[seed + seeds * i + k for k in range(seeds)], progress=False)
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255) for im in result.images])
        pairs = torch.combinations(torch.arange(seeds))
        distances += (x[pairs[:, 0]] - x[pairs[:, 1]]).pow(2).flatten(1).mean(1).sqrt().tolist()
    return float(np.mean(distances))


CFG_SCALES = (1, 2, 4, 7.5, 12, 20)


def cfg_sweep(pipe, captions: list[str], scales=CFG_SCALES, *, diversity_captions: int = 8, steps: int = 20,
              sampler: str = "dpmpp_2m", seed: int = 0) -> list[dict]:
    """The classifier-free-guidance trade-off: adherence (fully correct, one- and two-object captions) and
    diversity (over the first `diversity_captions` captions) at each guidance scale."""
    rows = []
    for scale in scales:
        scores = evaluate_shapes(pipe, captions, steps=steps, guidance_scale=scale, sampler=sampler, seed=seed)
        spread = diversity(pipe, captions[:diversity_captions], steps=steps, guidance_scale=scale, sampler=sampler,
                           seed=seed)
        rows.append({"guidance": scale, "one": scores.get("one/fully_correct", float("nan")),
                     "two": scores.get("two/fully_correct", float("nan")), "diversity": spread})
    return rows


SWEEP_SAMPLERS = ("ddim", "euler", "dpmpp_2m", "unipc")
SWEEP_STEPS = (5, 10, 20, 30, 50)


def steps_sweep(pipe, captions: list[str], samplers=SWEEP_SAMPLERS, steps=SWEEP_STEPS, *,
                guidance_scale: float = 7.5, seed: int = 0) -> list[dict]:
    """Adherence (fully correct over all captions) against the number of steps, per sampler, with the seconds
    each setting took on this machine."""
    rows = []
    for sampler in samplers:
        for n in steps:
            start = time.perf_counter()
            scores = evaluate_shapes(pipe, captions, steps=n, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
            total = scores["n_one"] + scores["n_two"]
            correct = (scores.get("one/fully_correct", 0) * scores["n_one"]
                       + scores.get("two/fully_correct", 0) * scores["n_two"])
            rows.append({"sampler": sampler, "steps": n, "fully_correct": correct / total,
                         "one": scores.get("one/fully_correct", float("nan")),
                         "two": scores.get("two/fully_correct", float("nan")),
                         "seconds": time.perf_counter() - start})
    return rows


def plot_cfg_sweep(rows: list[dict], path, title: str = "shapes: classifier-free guidance trade-off"):
    scales = [r["guidance"] for r in rows]
    adherence = Panel("guidance scale", "fully correct", {
        "one object": (scales, [r["one"] for r in rows]), "two objects": (scales, [r["two"] for r in rows])},
        log_x=True, ylim=(0, 1))
    spread = Panel("guidance scale", "diversity (pairwise RMS pixel distance)",
                   {"diversity": (scales, [r["diversity"] for r in rows])}, log_x=True)
    return save_panels([adherence, spread], path, title)


def plot_steps_sweep(rows: list[dict], path, title: str = "shapes: adherence against steps"):
    series = {}
    for r in rows:
        xs, ys = series.setdefault(r["sampler"], ([], []))
        xs.append(r["steps"])
        ys.append(r["fully_correct"])
    return save_panels([Panel("steps", "fully correct (all captions)", series, log_x=True, ylim=(0, 1))], path, title)
