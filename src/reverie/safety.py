"""Output safety: image checkers, a prompt deny-list, and the filter that replaces what they flag.

A checker is any callable `checker(images: list[PIL.Image]) -> list[bool]` (True = flagged). Two come with
reverie, both reading local folders only:

- ConceptChecker: Stable Diffusion's concept-embedding checker (the diffusers StableDiffusionSafetyChecker
  folder layout: a CLIP vision tower, a projection, 17 concept and 3 "special care" embeddings with one cosine
  threshold each). An image is flagged when its projected CLIP embedding is closer to any concept than that
  concept's threshold; a special-care hit lowers every concept threshold by 0.01 (diffusers' `adjustment`).
- ClassifierChecker: any transformers image-classification folder (an NSFW detector, say); an image is
  flagged when the probability of a flagged label reaches a threshold.

SafetyFilter puts a checker and a prompt deny-list together: it flags images, replaces flagged ones (black,
or blurred), and guards the sampler callback so that previews pass the same check before they leave the
process. Pipeline.safety_checker holds one (or None).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (transformers' defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PREPROCESS = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
                   "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
REPLACEMENTS = ("black", "blur")
NSFW_LABELS = ("nsfw", "porn", "hentai", "sexy", "explicit", "unsafe")  # labels flagged by default, when present


# --- preprocessing --------------------------------------------------------------------------------------------


def _size(value, name: str) -> tuple[int, int] | int:
    """A preprocessor size: {"height", "width"} -> (h, w); {"shortest_edge"} or an int -> int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"{name} must be an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}}; got {value!r}")


def preprocess(images: list[Image.Image], config: dict | None = None) -> Tensor:
    """PIL images -> (B, 3, H, W) float32 pixels, following a preprocessor_config.json the way transformers'
    CLIP and ViT image processors do: resize (shortest edge, or to a fixed size) with PIL on uint8, center
    crop, rescale to [0, 1], normalize. config=None is CLIP's (SD's feature_extractor)."""
    config = CLIP_PREPROCESS if config is None else config
    out = []
    for image in images:
        image = image.convert("RGB")
        if config.get("do_resize", True):
            size = _size(config.get("size"), "size")
            if isinstance(size, int):  # shortest edge to `size`, the other in proportion (rounded down)
                w, h = image.size
                short, long = min(w, h), max(w, h)
                new_long = int(size * long / short)
                size = (new_long, size) if w <= h else (size, new_long)
            image = image.resize((size[1], size[0]), resample=int(config.get("resample", Image.BILINEAR)))
        arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
        if config.get("do_center_crop", False):
            crop = _size(config.get("crop_size"), "crop_size")
            arr = _center_crop(arr, *((crop, crop) if isinstance(crop, int) else crop))
        if config.get("do_rescale", True):
            arr = arr * np.float32(config.get("rescale_factor", 1 / 255))
        if config.get("do_normalize", True):
            mean = np.asarray(config.get("image_mean", CLIP_MEAN), dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(config.get("image_std", CLIP_STD), dtype=np.float32).reshape(-1, 1, 1)
            arr = (arr - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
    return torch.stack(out)


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (C, H, W) to (C, height, width) about the centre, zero-padding where the image is smaller."""
    _, h, w = arr.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return arr[:, top:top + height, left:left + width]
    out = np.zeros((arr.shape[0], max(h, height), max(w, width)), dtype=arr.dtype)
    pt, pl = math.ceil((out.shape[1] - h) / 2), math.ceil((out.shape[2] - w) / 2)
    out[:, pt:pt + h, pl:pl + w] = arr
    return _center_crop(out, height, width)


# --- checkers -------------------------------------------------------------------------------------------------


class ConceptChecker(nn.Module):
    """Stable Diffusion's safety checker: cosine similarity of the image's projected CLIP embedding with
    concept embeddings, against one threshold per concept (diffusers' StableDiffusionSafetyChecker.forward)."""

    def __init__(self, vision_model: nn.Module, projection: nn.Linear, concept_embeds: Tensor,
                 concept_thresholds: Tensor, special_embeds: Tensor, special_thresholds: Tensor,
                 preprocess_config: dict | None = None):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, projection  # transformers CLIPVisionModel
        # plain float32 tensors, not buffers: .to(dtype) casts the tower only, the thresholds keep their precision
        self.concept_embeds, self.concept_thresholds = concept_embeds.float(), concept_thresholds.float()  # (C, P), (C,)
        self.special_embeds, self.special_thresholds = special_embeds.float(), special_thresholds.float()  # (S, P), (S,)
        self.preprocess_config = preprocess_config
        self.source: tuple[Path, Path | None] | None = None  # (safety_checker/, feature_extractor/) it was read from

    @classmethod
    def from_pretrained(cls, folder, feature_extractor=None) -> ConceptChecker:
        """Open a safety_checker folder (config.json: a CLIPConfig; model.safetensors). feature_extractor: the
        folder with preprocessor_config.json (default: the sibling feature_extractor/, else CLIP's settings)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from .formats import load_state_dict_strict, load_weights, read_config
        from .formats.folder import read_json

        folder = Path(folder)
        config = read_config(folder)
        if "vision_config" not in config or "projection_dim" not in config:
            raise ValueError(f"safety_checker: {folder}/config.json is not a StableDiffusionSafetyChecker config "
                             f"(a CLIPConfig with vision_config and projection_dim)")
        vision_config = CLIPVisionConfig(**config["vision_config"])
        state = load_weights(folder)  # safetensors only
        # files written with transformers 4 nest the vision tower once more (vision_model.vision_model.*)
        tower = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
        vision_model = CLIPVisionModel(vision_config)
        own = vision_model.state_dict()
        nested = next(iter(own)).startswith("vision_model.")
        tower = {("vision_model." + k.removeprefix("vision_model.") if nested else k.removeprefix("vision_model.")): v
                 for k, v in tower.items()}
        tower = {k: own[k] for k in own if k.endswith("position_ids")} | \
                {k: v for k, v in tower.items() if not k.endswith("position_ids") or k in own}
        load_state_dict_strict(vision_model, tower, name="safety_checker.vision_model")
        projection = nn.Linear(vision_config.hidden_size, config["projection_dim"], bias=False)
        load_state_dict_strict(projection, {"weight": state["visual_projection.weight"]},
                               name="safety_checker.visual_projection")
        fe = Path(feature_extractor) if feature_extractor is not None else folder.parent / "feature_extractor"
        pre = read_json(fe / "preprocessor_config.json") if (fe / "preprocessor_config.json").is_file() else None
        f32 = {k: state[k].float() for k in ("concept_embeds", "concept_embeds_weights", "special_care_embeds",
                                              "special_care_embeds_weights")}
        checker = cls(vision_model.eval(), projection, f32["concept_embeds"], f32["concept_embeds_weights"],
                      f32["special_care_embeds"], f32["special_care_embeds_weights"], pre).requires_grad_(False)
        checker.source = folder, fe if pre is not None else None  # what save_pretrained copies
        return checker

    @torch.inference_mode()
    def scores(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(concept_scores (B, C), special_scores (B, S)) from preprocessed pixels: cosine minus threshold,
        rounded to 3 decimals as diffusers rounds; a score > 0 is a hit."""
        param = next(self.visual_projection.parameters())
        pooled = self.vision_model(pixels.to(param.device, param.dtype))[1]  # pooler_output, (B, hidden)
        embeds = nn.functional.normalize(self.visual_projection(pooled).float()).cpu()  # (B, P)
        cos_special = embeds @ nn.functional.normalize(self.special_embeds).T  # (B, S)
        cos_concept = embeds @ nn.functional.normalize(self.concept_embeds).T  # (B, C)
        special = torch.round(cos_special - self.special_thresholds, decimals=3)
        adjustment = (special > 0).any(dim=1, keepdim=True) * 0.01  # a special-care hit makes every concept stricter
        return torch.round(cos_concept - self.concept_thresholds + adjustment, decimals=3), special

    def forward(self, images: list[Image.Image]) -> list[bool]:
        concept, _ = self.scores(preprocess(images, self.preprocess_config))
        return (concept > 0).any(dim=1).tolist()


class ClassifierChecker(nn.Module):
    """A transformers image-classification model as a checker: flag when P(any flagged label) >= threshold."""

    def __init__(self, model: nn.Module, preprocess_config: dict, labels=None, threshold: float = 0.5):
        super().__init__()
        self.model, self.preprocess_config = model.eval().requires_grad_(False), preprocess_config
        names = {i: str(name) for i, name in model.config.id2label.items()}
        wanted = [s.lower() for s in (labels or NSFW_LABELS)]
        self.flagged = sorted(int(i) for i, name in names.items() if name.lower() in wanted)
        if not self.flagged:
            raise ValueError(f"labels: none of {sorted(wanted)} is a label of this classifier; its labels are "
                             f"{sorted(names.values())}")
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ValueError(f"threshold must be a number in (0, 1]; got {threshold!r}")
        self.threshold = float(threshold)

    @classmethod
    def from_pretrained(cls, folder, labels=None, threshold: float = 0.5) -> ClassifierChecker:
        from transformers import AutoModelForImageClassification

        from .formats.folder import read_json

        folder = Path(folder)
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        pre = folder / "preprocessor_config.json"
        if not pre.is_file():
            raise ValueError(f"safety_checker: {folder} has no preprocessor_config.json")
        return cls(model, read_json(pre), labels, threshold)

    @torch.inference_mode()
    def probabilities(self, images: list[Image.Image]) -> Tensor:
        """(B, num_labels) label probabilities: softmax, or sigmoid for multi-label models."""
        param = next(self.model.parameters())
        logits = self.model(pixel_values=preprocess(images, self.preprocess_config).to(param.device, param.dtype)).logits
        multi = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        return logits.float().sigmoid() if multi else logits.float().softmax(-1)

    def forward(self, images: list[Image.Image]) -> list[bool]:
        probs = self.probabilities(images)[:, self.flagged]  # (B, flagged labels)
        return (probs >= self.threshold).any(dim=1).tolist()


def load_checker(folder, **options):
    """A checker from a local folder: a StableDiffusionSafetyChecker folder, a pipeline folder that ships one
    (safety_checker/), or a transformers image-classification folder (options: labels, threshold)."""
    from .formats.folder import read_json

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        folder = folder / "safety_checker"
    if not (folder / "config.json").is_file():
        raise ValueError(f"safety_checker: {folder} is not a model folder (no config.json)")
    config = read_json(folder / "config.json")
    if "StableDiffusionSafetyChecker" in config.get("architectures", []) or "vision_config" in config:
        return ConceptChecker.from_pretrained(folder)
    if any(a.endswith("ForImageClassification") for a in config.get("architectures", [])):
        return ClassifierChecker.from_pretrained(folder, **options)
    raise ValueError(f"safety_checker: {folder} is neither a StableDiffusionSafetyChecker nor an "
                     f"image-classification model (architectures: {config.get('architectures')})")


# --- the filter -----------------------------------------------------------------------------------------------


def read_deny_list(path) -> list[str]:
    """Terms from a text file, one per line; blank lines and lines starting with # are skipped."""
    if not Path(path).is_file():
        raise ValueError(f"deny_list: {path} is not a file")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class SafetyFilter:
    """Flags images (a prompt deny-list, then an image checker) and replaces flagged ones.

    checker: a callable images -> list[bool], or None (deny-list only). deny: terms matched case-insensitively
    as whole words in the prompt (negative prompts are not checked: they name what not to draw).
    replacement: "black" (as diffusers) or "blur" (Gaussian, radius blur_radius, default a tenth of the size)."""

    def __init__(self, checker=None, deny=(), replacement: str = "black", blur_radius: float | None = None):
        if checker is not None and not callable(checker):
            raise ValueError(f"checker must be callable (images -> list of bools); got {type(checker).__name__}")
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {', '.join(map(repr, REPLACEMENTS))}; got {replacement!r}")
        if isinstance(deny, str) or not all(isinstance(t, str) and t.strip() for t in deny):
            raise ValueError("deny must be a list of non-empty strings")
        if blur_radius is not None and not (isinstance(blur_radius, (int, float)) and blur_radius > 0):
            raise ValueError(f"blur_radius must be a number > 0; got {blur_radius!r}")
        self.checker, self.replacement, self.blur_radius = checker, replacement, blur_radius
        self.deny = [t.strip() for t in deny]
        self._deny_re = re.compile("|".join(rf"(?<!\w){re.escape(t)}(?!\w)" for t in self.deny), re.IGNORECASE) \
            if self.deny else None

    def denied(self, prompt: str) -> str | None:
        """The first deny-list term in the prompt, or None."""
        match = self._deny_re.search(prompt) if self._deny_re else None
        return match.group(0) if match else None

    def flags(self, images: list[Image.Image], prompts: list[str] | None = None) -> list[bool]:
        """One flag per image: its prompt has a denied term, or the checker flags it."""
        prompts = prompts or [""] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"prompts: one per image ({len(images)}); got {len(prompts)}")
        flags = [self.denied(p) is not None for p in prompts]
        if self.checker is not None:
            checked = list(self.checker(images))
            if len(checked) != len(images):
                raise ValueError(f"checker returned {len(checked)} flags for {len(images)} images")
            flags = [f or bool(c) for f, c in zip(flags, checked)]
        return flags

    def replace(self, image: Image.Image) -> Image.Image:
        if self.replacement == "black":
            return Image.new(image.mode, image.size)
        radius = self.blur_radius or max(image.size) / 10
        return image.filter(ImageFilter.GaussianBlur(radius))

    def __call__(self, images: list[Image.Image], prompts: list[str] | None = None):
        """(images with flagged ones replaced, flags)."""
        flags = self.flags(images, prompts)
        return [self.replace(im) if f else im for im, f in zip(images, flags)], flags

    def guard(self, callback, decode, prompts: list[str]):
        """Wrap a sampler callback: it receives CheckedStep objects, whose x and denoised are zero for images
        the filter flags (checked on denoised, decoded with `decode(latents) -> PIL images`)."""

        def guarded(step):
            callback(CheckedStep(step, lambda latents: self.flags(decode(latents), prompts), self))

        return guarded


class CheckedStep:
    """A sampler step (reverie.samplers.StepInfo) seen through a safety filter.

    i, sigma, sigma_next pass through. x and denoised are checked on first use: the denoised batch is decoded
    and checked once per step, and flagged images come back as zero latents, so a preview decoded from
    them shows nothing of the image. images() gives the decoded, checked previews directly."""

    def __init__(self, step, flags_of, safety: SafetyFilter):
        self._step, self._flags_of, self._safety, self._flags = step, flags_of, safety, None

    def __getattr__(self, name):
        return getattr(self._step, name)

    @property
    def flags(self) -> list[bool]:
        if self._flags is None:
            self._flags = self._flags_of(self._step.denoised)
        return self._flags

    def _masked(self, latents: Tensor) -> Tensor:
        keep = torch.tensor([not f for f in self.flags], device=latents.device)
        return latents * keep.reshape(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)

    @property
    def x(self) -> Tensor:
        return self._masked(self._step.x)

    @property
    def denoised(self) -> Tensor:
        return self._masked(self._step.denoised)

    def images(self, decode) -> list[Image.Image]:
        """The denoised batch decoded with decode(latents) -> PIL images, flagged ones replaced."""
        images = decode(self._step.denoised)
        return [self._safety.replace(im) if f else im for im, f in zip(images, self.flags)]


def from_option(option, folder: Path | None, *, device="cpu", dtype=torch.float32) -> SafetyFilter | None:
    """The filter for Pipeline.from_pretrained(safety_checker=option): "auto" loads the checker a pipeline folder
    ships (model_index.json names safety_checker; reverie's own models ship none), None or False disables, a
    path loads a checker folder, a SafetyFilter is used as is and any other callable becomes its checker."""
    if option is None or option is False:
        return None
    if isinstance(option, SafetyFilter):
        return option
    if isinstance(option, str) and option == "auto":
        from .loading import load_safety_checker

        checker = load_safety_checker(folder) if folder is not None and Path(folder).is_dir() else None
    elif isinstance(option, (str, Path)):
        if not Path(option).exists():
            raise ValueError(f"safety_checker must be 'auto', None, a checker or a folder; {option!r} does not exist")
        checker = load_checker(option)
    elif callable(option):
        checker = option
    else:
        raise ValueError(f"safety_checker must be 'auto', None, a checker or a folder; got {type(option).__name__}")
    if checker is None:
        return None
    if isinstance(checker, nn.Module):
        checker.to(device, dtype)
    return SafetyFilter(checker)
