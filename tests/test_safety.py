"""Safety: the SD concept checker against diffusers' StableDiffusionSafetyChecker, an image-classification
checker against transformers, the deny-list and replacements, and no flagged image on any output path
(result images and latents, previews through the callback, written files and their metadata)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reverie import Pipeline, metadata
from reverie.cli import main, model_path
from reverie.safety import (
    ClassifierChecker,
    ConceptChecker,
    SafetyFilter,
    load_checker,
    preprocess,
    read_deny_list,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def detail(image) -> float:
    """Spatial standard deviation, per channel, averaged."""
    return float(np.asarray(image, dtype=float).std(axis=(0, 1)).mean())


def random_images(n, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):  # noise over a random colour: varied embeddings
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 40 + 10 * i, (size[1], size[0], 3)), 0, 255).astype("uint8")
        images.append(Image.fromarray(arr))
    return images


# --- the concept checker against diffusers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_checker(tmp_path_factory):
    """A tiny random StableDiffusionSafetyChecker and CLIP feature extractor, saved as diffusers saves them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=30, patch_size=10), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    extractor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    folder = tmp_path_factory.mktemp("checker")
    checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
    extractor.save_pretrained(folder / "feature_extractor")
    return checker, extractor, folder


def cosines(checker, extractor, images):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        pixels = extractor(images, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return (cosine_distance(embeds, checker.concept_embeds), cosine_distance(embeds, checker.special_care_embeds))


def diffusers_flags(checker, extractor, images):
    pixels = extractor(images, return_tensors="pt").pixel_values
    _, flags = checker(clip_input=pixels, images=[np.asarray(im, dtype=np.float32) for im in images])
    return flags


def set_thresholds(checker, concept, special):
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.as_tensor(concept))
        checker.special_care_embeds_weights.copy_(torch.as_tensor(special))


def test_preprocess_matches_transformers_clip_processor(sd_checker):
    _, extractor, _ = sd_checker
    images = random_images(3, size=(48, 40)) + random_images(2, size=(30, 64), seed=1)
    for image in images:
        ours = preprocess([image], extractor.to_dict())
        theirs = extractor(image, return_tensors="pt").pixel_values
        assert ours.shape == theirs.shape == (1, 3, 30, 30)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_concept_checker_matches_diffusers(sd_checker):
    checker, extractor, folder = sd_checker
    ours = ConceptChecker.from_pretrained(folder / "safety_checker")  # reads the sibling feature_extractor/
    images = random_images(12)
    cos_concept, cos_special = cosines(checker, extractor, images)
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(12):  # a few thresholds drawn within the data, the rest above it: mixed flags
        concept = (cos_concept.max(0).values + 0.05).tolist()
        for j in rng.choice(len(concept), 3, replace=False):
            concept[j] = float(np.quantile(cos_concept[:, j], rng.uniform(0.5, 0.95))) + 1e-4
        special = (cos_special.max(0).values + 0.05).tolist()
        j = rng.integers(len(special))
        special[j] = float(np.quantile(cos_special[:, j], rng.uniform(0.3, 0.9))) + 1e-4
        set_thresholds(checker, concept, special)
        ours.concept_thresholds, ours.special_thresholds = torch.tensor(concept), torch.tensor(special)
        expected = diffusers_flags(checker, extractor, images)
        assert ours(images) == expected
        seen.add(tuple(expected))
    assert any(any(f) and not all(f) for f in seen)  # the comparisons include mixed batches


def test_special_care_makes_concepts_stricter(sd_checker):
    checker, extractor, folder = sd_checker
    ours = ConceptChecker.from_pretrained(folder / "safety_checker")
    images = random_images(4)
    cos_concept, cos_special = cosines(checker, extractor, images)
    concept = [1.0] * cos_concept.shape[1]
    concept[0] = float(cos_concept[0, 0]) + 0.005  # image 0 misses concept 0 by 0.005 < the 0.01 adjustment
    for special_fires in (False, True):
        special = [1.0] * cos_special.shape[1]
        if special_fires:
            special[0] = float(cos_special[0, 0]) - 0.05
        set_thresholds(checker, concept, special)
        ours.concept_thresholds, ours.special_thresholds = torch.tensor(concept), torch.tensor(special)
        assert ours(images)[0] is special_fires
        assert diffusers_flags(checker, extractor, images)[0] is special_fires


# --- an image classifier against transformers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=37, num_labels=2,
                                    id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    model = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder, safe_serialization=True)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_classifier_checker_matches_transformers(classifier_folder):
    model = transformers.ViTForImageClassification.from_pretrained(classifier_folder).eval()
    processor = transformers.ViTImageProcessorPil.from_pretrained(classifier_folder)
    images = random_images(8)
    with torch.no_grad():
        expected = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    checker = load_checker(classifier_folder)
    assert isinstance(checker, ClassifierChecker)
    torch.testing.assert_close(checker.probabilities(images), expected, atol=1e-5, rtol=0)
    # a threshold in the widest gap between two of the probabilities: no image lies near it, so float rounding
    # cannot decide a flag, and some images fall on each side
    p = expected[:, 1].sort().values
    gap = int((p[1:] - p[:-1]).argmax())
    assert p[gap + 1] - p[gap] > 1e-3
    checker.threshold = float(p[gap] + p[gap + 1]) / 2
    assert checker(images) == (expected[:, 1] >= checker.threshold).tolist()
    assert 0 < sum(checker(images)) < len(images)
    with pytest.raises(ValueError, match="labels"):
        ClassifierChecker.from_pretrained(classifier_folder, labels=["porn"])


# --- the filter -----------------------------------------------------------------------------------------------


def test_deny_list_and_replacements(tmp_path):
    (tmp_path / "deny.txt").write_text("# comment\nnude\n\nGore Scene\n")
    deny = read_deny_list(tmp_path / "deny.txt")
    assert deny == ["nude", "Gore Scene"]
    f = SafetyFilter(deny=deny)
    assert f.denied("a NUDE figure") == "NUDE" and f.denied("a gore  scene") is None and f.denied("gore scene, red")
    assert f.denied("denuded hills") is None  # whole words only
    images = random_images(3, size=(32, 32))
    out, flags = f(images, ["a nude figure", "a red circle", "gore scene"])
    assert flags == [True, False, True]
    assert np.asarray(out[0]).max() == 0 and out[1] is images[1]
    blurred, _ = SafetyFilter(deny=deny, replacement="blur")(images, ["nude", "x", "x"])
    assert blurred[0].size == images[0].size and detail(blurred[0]) < detail(images[0]) / 4
    with pytest.raises(ValueError, match="replacement"):
        SafetyFilter(replacement="pixelate")
    with pytest.raises(ValueError, match="deny"):
        SafetyFilter(deny="nude")
    with pytest.raises(ValueError, match="deny_list"):
        read_deny_list(tmp_path / "missing.txt")


# --- no flagged image on any output path ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.from_pretrained(model_path("shapes"))


PROMPTS = ["a red circle above a blue square", "a green triangle"]


def decode(pipe, latents):
    with torch.inference_mode():
        return pipe.vae.decode(latents / pipe.vae.scaling_factor + pipe.vae.shift_factor)


def run(pipe, safety, callback=None):
    pipe.safety_checker = safety
    try:
        return pipe(PROMPTS, steps=4, seed=[1, 2], progress=False, callback=callback)
    finally:
        pipe.safety_checker = None


def test_reverie_models_ship_no_checker(shapes):
    assert shapes.safety_checker is None
    assert shapes(PROMPTS[0], steps=2, seed=0, progress=False).nsfw == [False]


def test_flagged_images_never_leave(shapes, tmp_path):
    raw_steps, steps = [], []
    plain = run(shapes, None, callback=lambda s: raw_steps.append((s.x.clone(), s.denoised.clone())))
    result = run(shapes, SafetyFilter(deny=["circle"]), callback=steps.append)
    assert result.nsfw == result.params["nsfw"] == [True, False]
    assert np.asarray(result.images[0]).max() == 0  # black
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(plain.images[1]))  # the other one untouched
    assert result.latents[0].abs().max() == 0 and torch.equal(result.latents[1], plain.latents[1])
    # previews: what a callback can decode is empty for the flagged image, unchanged for the other
    assert len(steps) == 4
    for step, (x, denoised) in zip(steps, raw_steps):
        assert step.denoised[0].abs().max() == 0 and step.x[0].abs().max() == 0
        assert torch.equal(step.denoised[1], denoised[1]) and torch.equal(step.x[1], x[1])
        previews = step.images(lambda z: [Image.fromarray(a) for a in
                                          ((decode(shapes, z) / 2 + 0.5).clamp(0, 1) * 255).byte()
                                          .permute(0, 2, 3, 1).numpy()])
        assert np.asarray(previews[0]).max() == 0 and np.asarray(previews[1]).max() > 0
    # written file: black pixels, metadata says flagged
    path = metadata.save_png(result.images[0], metadata.image_params(result.params, 0), tmp_path / "0.png")
    info = metadata.read_png_info(path)
    assert np.asarray(Image.open(path)).max() == 0
    assert info["request"]["nsfw"] is True and "NSFW: flagged" in info["info"]


def test_checker_flags_by_content(shapes):
    seen = []

    def reddish(images):  # a content checker: flags images with more red than blue
        seen.append(len(images))
        return [np.asarray(im, dtype=float)[..., 0].mean() > np.asarray(im, dtype=float)[..., 2].mean()
                for im in images]

    plain = run(shapes, None)
    expected = reddish(plain.images)
    result = run(shapes, SafetyFilter(reddish, replacement="blur"))
    assert result.nsfw == expected
    for image, before, flagged in zip(result.images, plain.images, expected):
        same = np.array_equal(np.asarray(image), np.asarray(before))
        assert same is (not flagged)
    assert any(expected) and not all(expected)
    assert seen == [2, 2]  # previews are checked only when a callback looks: here, only the final images were


def test_cli_writes_flagged_images_black(tmp_path):
    (tmp_path / "deny.txt").write_text("circle\n")
    out = tmp_path / "img.png"
    assert main(["generate", PROMPTS[0], "--steps", "3", "--seed", "4", "--out", str(out),
                 "--deny-list", str(tmp_path / "deny.txt")]) == 0
    assert np.asarray(Image.open(out)).max() == 0
    assert metadata.read_png_info(out)["request"]["nsfw"] is True


def test_folder_that_ships_a_checker_turns_it_on(sd_checker, tmp_path):
    _, _, folder = sd_checker
    model = tmp_path / "model"
    shutil.copytree(model_path("shapes"), model)
    for part in ("safety_checker", "feature_extractor"):
        shutil.copytree(folder / part, model / part)
    index = json.loads((model / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (model / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(model)
    assert isinstance(pipe.safety_checker.checker, ConceptChecker)
    pipe.safety_checker.checker.concept_thresholds = torch.full((17,), -2.0)  # every image is flagged
    result = pipe(PROMPTS[0], steps=2, seed=0, progress=False)
    assert result.nsfw == [True] and np.asarray(result.images[0]).max() == 0
    assert Pipeline.from_pretrained(model, safety_checker=None).safety_checker is None
    # saving keeps the checker: the saved folder turns it on again, with the same weights and preprocessing
    pipe.save_pretrained(tmp_path / "saved")
    again = Pipeline.from_pretrained(tmp_path / "saved").safety_checker.checker
    assert isinstance(again, ConceptChecker) and again.preprocess_config == pipe.safety_checker.checker.preprocess_config
    assert torch.equal(again.concept_embeds, pipe.safety_checker.checker.concept_embeds)
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["requires_safety_checker"] is True
    with pytest.raises(ValueError, match="safety_checker"):
        Pipeline.from_pretrained(model, safety_checker=tmp_path / "missing")
