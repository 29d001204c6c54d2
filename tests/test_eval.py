"""`reverie eval`'s adherence scoring: perfect on the data set's own images, zero on blank ones."""

from types import SimpleNamespace

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
