"""`reverie eval`'s adherence scoring: perfect on the data set's own images, zero on blank ones."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from PIL import Image

from reverie.data.shapes import ShapesDataset
from reverie.eval.adherence import evaluate_shapes


class ReplayPipe:
    """Stands in for a Pipeline: returns the data set's own image for each caption (or a blank one)."""

    def __init__(self, dataset, blank=False):
        self.images = {c: dataset.image(i) for i, c in enumerate(dataset.captions)}
        self.blank, self.calls = blank, []

    def __call__(self, prompts, **kwargs):
        self.calls.append(kwargs)
        images = [Image.new("RGB", (64, 64), "white") if self.blank else self.images[p] for p in prompts]
        return SimpleNamespace(images=images)


def test_adherence_is_perfect_on_real_images_and_zero_on_blank_ones():
    data = ShapesDataset(size=40, split="heldout", seed=3)
    pipe = ReplayPipe(data)
    scores = evaluate_shapes(pipe, list(data.captions), steps=5, batch_size=16)
    assert scores["one/fully_correct"] == scores["two/fully_correct"] == 1.0
    assert scores["n_one"] + scores["n_two"] == 40 and scores["n_one"] > 0 and scores["n_two"] > 0
    assert pipe.calls[0]["seed"] == list(range(16)) and pipe.calls[0]["steps"] == 5
    blank = evaluate_shapes(ReplayPipe(data, blank=True), list(data.captions))
    assert blank["one/fully_correct"] == blank["two/fully_correct"] == 0.0


def test_one_prompt_over_ten_seeds(tmp_path, capsys, monkeypatch):
    """reverie eval --prompt: ten seeds of one caption, each scored; the wrong ones named; a row of the images."""
    from reverie import cli, pipeline
    from reverie.eval.adherence import prompt_seeds

    data = ShapesDataset(size=12, split="train", seed=0)
    caption = data.captions[0]

    class Alternating(ReplayPipe):  # the caption's own image at even seeds, a blank one at odd seeds
        def __call__(self, prompts, **kwargs):
            self.calls.append(kwargs)
            images = [self.images[p] if s % 2 == 0 else Image.new("RGB", (64, 64), "white")
                      for p, s in zip(prompts, kwargs["seed"])]
            return SimpleNamespace(images=images)

    pipe = Alternating(data)
    scores, images = prompt_seeds(pipe, caption, 10, steps=3, seed=0)
    assert [s["fully_correct"] for s in scores] == [i % 2 == 0 for i in range(10)] and len(images) == 10
    assert pipe.calls[0]["seed"] == list(range(10))
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: Alternating(data)))
    grid = tmp_path / "first.png"
    cli.main(["eval", "--prompt", caption, "--steps", "3", "--plot", str(grid)])
    out = capsys.readouterr().out
    assert "5 of seeds 0-9 fully correct; wrong: [1, 3, 5, 7, 9]" in out and "seed 1: wrong (count" in out
    assert Image.open(grid).size == (640, 64)


def test_paraphrases_keep_no_word_of_the_grammar_and_are_scored_against_the_caption():
    from reverie.data.shapes import COLORS, POSITION_PHRASES, RELATIONS, SHAPES, SIZES
    from reverie.eval.paraphrase import paraphrase

    data = ShapesDataset(size=60, split="heldout", seed=3)
    captions = list(data.captions)
    prompts = [paraphrase(c) for c in captions]
    assert prompts == [paraphrase(c) for c in captions]  # deterministic
    grammar = {*COLORS, *SHAPES, *SIZES, *RELATIONS, *POSITION_PHRASES.values()}
    for caption, prompt in zip(captions, prompts):
        assert not any(re.search(rf"\b{re.escape(phrase)}\b", prompt) for phrase in grammar), (caption, prompt)
    assert paraphrase("a red circle", seed=0) in {"a crimson disk", "a crimson round dot", "a scarlet disk",
                                                  "a scarlet round dot"}
    with pytest.raises(ValueError, match="caption"):
        paraphrase("a purple hexagon")

    # the paraphrase is what the model sees; the score is against the original caption
    pipe = ReplayPipe(data)
    pipe.images |= {p: pipe.images[c] for c, p in zip(captions, prompts)}
    scores = evaluate_shapes(pipe, captions, prompts=prompts)
    assert scores["one/fully_correct"] == scores["two/fully_correct"] == 1.0
    with pytest.raises(ValueError, match="prompts"):
        evaluate_shapes(pipe, captions, prompts=prompts[:3])


# --------------------------------------------------------------------------------- sweeps, plots, FID

def test_cfg_and_steps_sweeps_report_every_setting_and_plot_them(tmp_path):
    from reverie.eval import adherence

    data = ShapesDataset(size=6, split="heldout", seed=3)
    pipe = ReplayPipe(data)
    rows = adherence.cfg_sweep(pipe, list(data.captions), scales=(1, 7.5), diversity_captions=2, steps=3)
    assert [r["guidance"] for r in rows] == [1, 7.5]
    assert all(r["one"] == 1.0 for r in rows if r["one"] == r["one"])  # real images: all correct
    assert all(r["diversity"] == 0.0 for r in rows)  # the replay pipe draws the same image for every seed
    path = adherence.plot_cfg_sweep(rows, tmp_path / "cfg.png")
    assert Image.open(path).size == (840, 324)
    rows = adherence.steps_sweep(pipe, list(data.captions), samplers=("ddim", "euler"), steps=(2, 4))
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 2), ("ddim", 4), ("euler", 2), ("euler", 4)]
    assert all(r["fully_correct"] == 1.0 and r["seconds"] >= 0 for r in rows)
    assert Image.open(adherence.plot_steps_sweep(rows, tmp_path / "steps.png")).size == (420, 324)


def test_diversity_is_the_pairwise_rms_pixel_distance():
    from reverie.eval.adherence import diversity

    class TwoTone:  # even seeds black, odd seeds white: every pair of 2 differs by 1 everywhere
        def __call__(self, prompts, seed, **kwargs):
            return SimpleNamespace(images=[Image.new("RGB", (64, 64), "white" if s % 2 else "black") for s in seed])

    assert diversity(TwoTone(), ["a red circle"], seeds=2) == 1.0
    assert abs(diversity(TwoTone(), ["a red circle"], seeds=4) - 4 / 6) < 1e-9  # 4 of the 6 pairs differ


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    import numpy as np

    from reverie.eval.emoji import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200_000, 3))
    scale = np.array([2.0, 1.0, 0.5])
    b = rng.normal(size=(200_000, 3)) * scale + 1
    # mu diff 3 x 1; cov I vs diag(scale^2): tr(I + S - 2 S^(1/2)) = sum (1 - s)^2
    expected = 3 + ((1 - scale) ** 2).sum()
    assert abs(frechet_distance(a, b) - expected) < 0.05
    assert abs(frechet_distance(a, a)) < 1e-6


def test_nearest_distances_match_brute_force():
    import numpy as np

    from reverie.eval.emoji import nearest_distances

    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    brute = np.array([min(np.linalg.norm(x - y) for y in r) for x in q])
    assert np.allclose(nearest_distances(q, r), brute)
    self_brute = np.array([min(np.linalg.norm(x - y) for j, y in enumerate(r) if j != i) for i, x in enumerate(r)])
    assert np.allclose(nearest_distances(r, r, exclude_self=True), self_brute)


def test_emoji_subgroups_name_every_emoji_the_data_set_draws():
    from reverie.data.emoji import EmojiDataset
    from reverie.eval.emoji import emoji_subgroups

    groups = emoji_subgroups()
    assert groups["red apple"] == "food-fruit" and groups["rocket"] == "transport-air"
    assert all(c in groups for c in EmojiDataset(resolution=64).captions)


def test_the_shipped_emoji_feature_net_knows_the_subgroups():
    """The FID feature network (reverie/bundled/features) classifies the emoji it was trained on by subgroup."""
    import torch

    from reverie.data.emoji import EmojiDataset
    from reverie.eval.emoji import emoji_subgroups, features, load_feature_net

    net = load_feature_net()
    classes = net.classes
    data = EmojiDataset(resolution=64)
    picks = list(range(0, len(data), 12))  # ~300 emoji across all groups
    images = torch.stack([data[i]["image"] for i in picks])
    with torch.no_grad():
        predicted = net(images).argmax(1).tolist()
    groups = emoji_subgroups()
    accuracy = sum(classes[p] == groups[data.captions[i]] for p, i in zip(predicted, picks)) / len(picks)
    assert accuracy > 0.75, accuracy  # 99 classes: chance is about 0.13 (the largest class)
    assert features(net, images[:4]).shape == (4, 256)


def test_emoji_evaluation_catches_a_model_that_copies_its_training_images():
    """A 'model' that returns the training image of each caption: nearest-training distances are 0, far below
    the training set's own nearest-neighbour spacing, and its FID is the real-vs-real floor's order."""
    from reverie.data.emoji import EmojiDataset
    from reverie.eval.emoji import evaluate_emoji

    data = EmojiDataset(resolution=64)
    index = {c: i for i, c in enumerate(data.captions)}

    class Copier:
        def __call__(self, prompts, **kwargs):
            return SimpleNamespace(images=[data.render(data.emoji[index[p]]) for p in prompts])

    report = evaluate_emoji(Copier(), n=64)
    assert report["nn_pixel_rms_generated"] < 1e-6 and report["nn_feature_generated"] < 1e-4
    assert report["nn_pixel_rms_train"] > 0.02 and report["nn_feature_train"] > 0.1
    assert report["fid"] < 2 * report["fid_train_subset"] + 1
    assert report["own_top1"] == 1.0


def test_own_ranks_count_the_references_nearer_than_the_own_one():
    from reverie.eval.emoji import own_ranks

    refs = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert own_ranks(np.array([[0.1], [2.9], [1.6]]), refs, [0, 0, 1]).tolist() == [0, 3, 1]


def test_reverie_eval_scores_the_bundled_emoji_model_and_draws_its_grid(tmp_path, capsys):
    from reverie.cli import main

    grid = tmp_path / "emoji.png"
    main(["eval", "--model", "emoji", "--n", "8", "--steps", "2", "--plot", str(grid)])
    out = capsys.readouterr().out
    assert re.search(r"FID \(reverie's emoji features\)\s+\d+\.\d+", out)
    assert re.search(r"own name's image nearest \(pixels\)\s+[01]\.\d+", out)
    assert Image.open(grid).size == (6 * 64, 6 * 64)  # six common names, six seeds each


def test_the_bundled_emoji_model_draws_the_emoji_it_is_asked_for():
    """Each common name's sample is nearer (in pixels) to that name's own emoji than to all but a handful of
    the 3,655 training images: the samples are recognisable as what was asked for."""
    from reverie.data.emoji import EmojiDataset
    from reverie.eval.emoji import own_ranks
    from reverie.loading import model_path
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_path("emoji"))
    data = EmojiDataset(resolution=64)
    names = ["red apple", "dog face", "rocket", "pizza"]
    images = pipe(names, steps=20, guidance_scale=7.5, width=64, height=64, seed=[0, 1, 2, 3],
                  progress=False).images
    real = np.stack([(data[i]["image"].numpy().ravel() + 1) / 2 for i in range(len(data))]).astype(np.float64)
    fake = np.stack([np.asarray(im, dtype=np.float64).transpose(2, 0, 1).ravel() / 255 for im in images])
    ranks = own_ranks(fake, real, [data.captions.index(n) for n in names])
    assert (ranks < 10).all(), dict(zip(names, ranks.tolist()))


def test_sample_grid_puts_each_prompt_in_its_row_or_column():
    from reverie.eval.plot import sample_grid

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    def pipe(prompts, seed, **kwargs):  # colour from the prompt, brightness from the seed
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), tuple(c // (1 + s) for c in colours[p]))
                                       for p, s in zip(prompts, seed)])

    rows = sample_grid(pipe, ["red", "blue"], per_prompt=3)
    columns = sample_grid(pipe, ["red", "blue"], per_prompt=3, prompt_rows=False)
    assert rows.size == (24, 16) and columns.size == (16, 24)
    assert rows.getpixel((8 * 2, 0)) == (85, 0, 0) and rows.getpixel((0, 8)) == (0, 0, 255)
    assert columns.getpixel((0, 8 * 2)) == (85, 0, 0) and columns.getpixel((8, 0)) == (0, 0, 255)
