"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a class-conditional transformer on
VAE latents, trained on a discrete DDPM schedule with learned sigma. The prompt is a class: an ImageNet id or a
label name from the folder's id2label; classifier-free guidance pairs it with the null class."""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family


class DiT(Family):
    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    prompt_kind = "class"
    negative_prompt = False
    no_negative_reason = "its unconditional side is the null class; give class labels as the prompt"
    defaults = dict(steps=50, guidance_scale=4.0, sampler=None)  # diffusers' DiTPipeline; the folder's scheduler

    def load_folder(self, path: Path, *, variant=None, allow_pickle=False, vae=None, **_):
        from ..formats import read_model_index
        from ..formats.folder import read_json
        from ..loading import load_network
        from ..models.dit import DiT as Network
        from ..models.vae import AutoencoderKL

        components = dict(transformer=load_network(Network, path / "transformer", variant=variant,
                                                   allow_pickle=allow_pickle),
                          vae=load_network(AutoencoderKL, path / "vae", variant=variant, allow_pickle=allow_pickle))
        if vae is not None:
            from ..single_files import replace_vae

            components = replace_vae(components, vae, allow_pickle=allow_pickle, variant=variant)
        components["labels"] = labels_from_id2label(read_model_index(path).get("id2label") or {})
        return components, read_json(path / "scheduler" / "scheduler_config.json")

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..formats import write_model_index
        from ..formats.folder import write_json
        from ..loading import save_network

        save_network(pipe.transformer, path / "transformer", dtype=dtype)
        save_network(pipe.vae, path / "vae", dtype=dtype)
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        write_json(path / "scheduler" / "scheduler_config.json", pipe.scheduler_config)
        id2label = {}
        for label, i in pipe.labels.items():
            id2label[str(i)] = f"{id2label[str(i)]}, {label}" if str(i) in id2label else label
        write_model_index(path, {"transformer": ("diffusers", "DiTTransformer2DModel"),
                                 "vae": ("diffusers", "AutoencoderKL"),
                                 "scheduler": ("diffusers", pipe.scheduler_config.get("_class_name", "DDIMScheduler"))},
                          class_name="DiTPipeline", extra={"id2label": id2label} if id2label else None)

    def prompts(self, pipe, prompt) -> list[int]:
        """Class ids (ints) or label names (pipe.labels, from the folder's id2label), one or a list."""
        items = prompt if isinstance(prompt, (list, tuple)) else [prompt]
        if not items:
            raise ValueError("prompt: give a class id or label name, or a non-empty list of them")
        n = pipe.transformer.num_classes
        ids = []
        for item in items:
            if isinstance(item, str) and item.strip().lstrip("-").isdigit():
                item = int(item)
            if isinstance(item, str):
                if item.strip() not in pipe.labels:
                    close = sorted(k for k in pipe.labels if item.strip().lower() in k.lower())[:10]
                    raise ValueError(f"prompt: {item!r} is not one of this model's class labels"
                                     + (f" (did you mean {', '.join(map(repr, close))}?)" if close else
                                        f" ({len(pipe.labels)} labels; ids 0-{n - 1} work too)"))
                item = pipe.labels[item.strip()]
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < n:
                raise ValueError(f"prompt: class ids must be integers in [0, {n - 1}]; got {item!r}")
            ids.append(item)
        return ids

    def check_clip_skip(self, clip_skip):
        raise ValueError("clip_skip: a DiT model has no text encoder")

    def encode(self, pipe, prompts, negatives, options):
        labels = torch.tensor(prompts, dtype=torch.long, device=pipe.device)
        null = torch.full_like(labels, pipe.transformer.num_classes)  # the null class (diffusers: 1000)
        return {"class_labels": labels}, ({"class_labels": null} if options["use_cfg"] else None)

    def network_call(self, pipe, network, shape, options):
        channels = shape[1]

        def call(x, t, class_labels):  # learned sigma: the variance half is not used for sampling (as diffusers)
            return network(x.to(pipe.dtype), t, class_labels)[:, :channels].float()

        return call

    def describe(self, pipe, options, sigmas=None, mu=None) -> dict:
        return {"family": self.name}


def labels_from_id2label(id2label: dict) -> dict[str, int]:
    """diffusers' DiTPipeline.labels: each comma-separated name of id2label -> its class id."""
    labels = {}
    for key, names in id2label.items():
        for name in str(names).split(","):
            labels[name.strip()] = int(key)
    return dict(sorted(labels.items()))
