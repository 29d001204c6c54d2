"""LoRA and LyCORIS adapters: kohya / A1111 files, diffusers / PEFT files, LoHa, LoKr, DoRA — merged into a
pipeline's weights and restored exactly.

    lora = read_lora("style.safetensors")                  # parse and check the file (no model needed)
    pipe.set_loras([(lora, 0.8)])                          # merge: W += 0.8 * dW in every patched module
    pipe.set_loras([LoraUse(lora, text=1.0, unet=0.5)])    # ComfyUI's strength_clip / strength_model
    pipe.set_loras([])                                     # every patched weight back, bit for bit

Merging (not an extra branch at forward time) is what A1111, ComfyUI and diffusers' fuse_lora do: after the merge
a step costs what the base model's step costs, and any family's network works unchanged. The price is that a
batch shares one set of LoRAs, so the server batches requests by their LoRAs (reverie.server) rather than mixing
them in one forward pass. Restoring copies back the weights saved before the first merge (no subtraction, so
no rounding is left behind), and a new set is merged onto those saved weights, never onto an earlier merge.

A file's keys are matched against the model's own module names, never by parsing underscores: for each patched
component a table maps every name a tool writes for one of its modules to that module —
kohya's `lora_unet_<path with _>`, `lora_te_` / `lora_te1_` / `lora_te2_` / `lora_te3_`, the SGM (LDM) names of
SDXL's kohya files (`lora_unet_input_blocks_4_1_...`), and diffusers / PEFT's `unet.<path>`,
`text_encoder.<path>`, `transformer.<path>`. A key that names no module, a shape that does not fit, or an
unsupported factor is a ValueError naming the key, raised before any weight changes.

Updates dW per module (Hu et al. 2021; LyCORIS, Yeh et al. 2023; DoRA, Liu et al. 2024), with r the rank:
- LoRA: up @ down x alpha / r (alpha = r when the file has none); conv: the same on flattened kernels; with a
  `lora_mid` (LoCon's CP form) up . mid . down contracted over the two ranks.
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) x alpha / r, r = w1_b's rows.
- LoKr: kron(w1, w2), each given whole or as a @ b; x alpha / r only when one is decomposed (r = its b's rows).
- full: `diff` (and `diff_b` for the bias) added as is.
- DoRA, kohya's `dora_scale` (ComfyUI's rule): W' = m (W + dW) / ||W + dW||, the norm per output row when m has
  one entry per output, else per input column; strength s interpolates, W + s (W' - W). PEFT's
  `lora_magnitude_vector`: W' = m (W + s dW) / ||W + s dW|| per output row, as PEFT merges it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

# key suffix -> (factor name, adapter kind or None when the factor goes with any kind)
_FACTORS = {
    ".lora_down.weight": ("down", "lora"), ".lora_up.weight": ("up", "lora"), ".lora_mid.weight": ("mid", "lora"),
    ".lora_A.weight": ("down", "lora"), ".lora_B.weight": ("up", "lora"),
    ".lora.down.weight": ("down", "lora"), ".lora.up.weight": ("up", "lora"),
    ".lora_linear_layer.down.weight": ("down", "lora"), ".lora_linear_layer.up.weight": ("up", "lora"),
    ".hada_w1_a": ("w1_a", "loha"), ".hada_w1_b": ("w1_b", "loha"), ".hada_w2_a": ("w2_a", "loha"),
    ".hada_w2_b": ("w2_b", "loha"), ".hada_t1": ("t1", "loha"), ".hada_t2": ("t2", "loha"),
    ".lokr_w1": ("w1", "lokr"), ".lokr_w1_a": ("w1_a", "lokr"), ".lokr_w1_b": ("w1_b", "lokr"),
    ".lokr_w2": ("w2", "lokr"), ".lokr_w2_a": ("w2_a", "lokr"), ".lokr_w2_b": ("w2_b", "lokr"),
    ".lokr_t2": ("t2", "lokr"),
    ".diff": ("diff", "full"), ".diff_b": ("diff_b", "full"),
    ".alpha": ("alpha", None), ".dora_scale": ("dora_scale", None),
    ".lora_magnitude_vector": ("magnitude", None), ".lora_magnitude_vector.weight": ("magnitude", None),
}
_SUFFIXES = sorted(_FACTORS, key=len, reverse=True)  # longest first: ".lora_A.weight" before ".weight"-less ones
_UNSUPPORTED = {"t1": "LoHa's Tucker factors (hada_t1/hada_t2)", "t2": "Tucker factors (hada_t2/lokr_t2)"}
# old diffusers attention-processor LoRA names -> the module they patch
_PROCESSOR_NAMES = {".processor.to_q_lora": ".to_q", ".processor.to_k_lora": ".to_k",
                    ".processor.to_v_lora": ".to_v", ".processor.to_out_lora": ".to_out.0"}

# pipeline component -> (kohya prefixes, diffusers/PEFT prefix)
_COMPONENT_NAMES = {
    "unet": (("lora_unet",), "unet"),
    "transformer": (("lora_unet", "lora_transformer"), "transformer"),
    "text_encoder": (("lora_te", "lora_te1"), "text_encoder"),
    "text_encoder_2": (("lora_te2",), "text_encoder_2"),
    "text_encoder_3": (("lora_te3",), "text_encoder_3"),
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass
class Adapter:
    """One module's factors from a file: kind "lora", "loha", "lokr" or "full", the tensors by factor name."""

    kind: str
    factors: dict[str, Tensor]
    key: str  # the file's stem for this module, for messages

    @property
    def scale(self) -> float:
        """alpha / r where the file gives an alpha and the kind has a rank; else 1."""
        alpha = self.factors.get("alpha")
        f = self.factors
        rank = {"lora": f.get("down"), "loha": f.get("w1_b"), "lokr": f.get("w1_b", f.get("w2_b"))}.get(self.kind)
        if alpha is None or rank is None:
            return 1.0
        return float(alpha) / rank.shape[0]

    def delta(self, weight: Tensor) -> Tensor:
        """dW (float32, shaped like `weight`), the file's alpha / r included, no user strength."""
        f = {k: v.float() for k, v in self.factors.items() if k not in ("alpha", "dora_scale", "magnitude")}
        if self.kind == "lora":
            up, down = f["up"].flatten(1), f["down"].flatten(1)
            if "mid" in f:  # CP: up (out, r) . mid (r, r, k, k) . down (r, in)
                d = torch.einsum("oa,abkl,bi->oikl", up, f["mid"], down)
            else:
                d = up @ down
        elif self.kind == "loha":
            d = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])
        elif self.kind == "lokr":
            w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
            if "w2" in f:
                w2 = f["w2"]
            else:
                w2 = (f["w2_a"] @ f["w2_b"].flatten(1)).reshape(f["w2_a"].shape[0], *f["w2_b"].shape[1:])
            if w2.ndim == 4:  # conv: w1 (a, b) -> (a, b, 1, 1) so that kron gives (a * c, b * d, k, k)
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)
        else:
            d = f["diff"]
        if d.numel() != weight.numel():
            raise ValueError(f"LoRA key {self.key}: its update has shape {tuple(d.shape)} ({d.numel()} values) but "
                             f"the module's weight is {tuple(weight.shape)}: a LoRA for another model?")
        return d.reshape(weight.shape) * self.scale


@dataclasses.dataclass
class LoRA:
    """A parsed LoRA file: adapters by the file's module stem, the file's metadata, and a name (the file's stem or
    its ss_output_name)."""

    adapters: dict[str, Adapter]
    name: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    path: Path | None = None


@dataclasses.dataclass(frozen=True)
class LoraUse:
    """A LoRA with its strengths: `text` for the text encoders (ComfyUI's strength_clip, A1111's te), `unet` for
    the denoising network (strength_model, A1111's unet; any family's UNet or transformer)."""

    lora: LoRA
    text: float = 1.0
    unet: float = 1.0


BUNDLED_LORAS = Path(__file__).parent / "bundled" / "loras"  # LoRAs trained by reverie, shipped with the package


def lora_file(source) -> Path:
    """A LoRA file's path: the path itself, else a bundled LoRA's name ("shapes-star")."""
    path = Path(source)
    bundled = BUNDLED_LORAS / f"{source}.safetensors"
    return bundled if not path.exists() and bundled.is_file() else path


def read_lora(source, *, name: str | None = None, allow_pickle: bool = False) -> LoRA:
    """A LoRA from a .safetensors file (a .pt / .ckpt only with allow_pickle=True), a bundled LoRA's name, or a
    state dict. Every key must be a known factor of some module; the factors of one module must make one kind."""
    metadata: dict[str, str] = {}
    path = None
    if isinstance(source, dict):
        state = source
    else:
        path = lora_file(source)
        if not path.is_file():
            bundled = sorted(p.stem for p in BUNDLED_LORAS.glob("*.safetensors"))
            raise ValueError(f"LoRA: no file at {path} (bundled LoRAs: {', '.join(bundled) or 'none'})")
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
        elif allow_pickle:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"LoRA {path}: only .safetensors opens without allow_pickle=True (a {path.suffix} file "
                             f"is a pickle, which can run code)")
    groups: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not isinstance(value, Tensor):
            raise ValueError(f"LoRA key {key!r}: not a LoRA / LyCORIS factor (known endings: "
                             f"{', '.join(sorted(_FACTORS))})")
        stem = key[:-len(suffix)]
        for old, new in _PROCESSOR_NAMES.items():
            if stem.endswith(old):
                stem = stem[:-len(old)] + new
        factor, kind = _FACTORS[suffix]
        groups.setdefault(stem, {})[factor] = value
        kinds.setdefault(stem, set()).update([kind] if kind else [])
    adapters = {stem: _adapter(stem, factors, kinds[stem]) for stem, factors in groups.items()}
    if not adapters:
        raise ValueError(f"LoRA {path or 'state dict'}: no adapters in it")
    _apply_peft_alphas(adapters, metadata)
    label = name or metadata.get("ss_output_name") or (path.stem if path else "lora")
    return LoRA(adapters, label, metadata, path)


def _adapter(stem: str, factors: dict[str, Tensor], kinds: set[str]) -> Adapter:
    if len(kinds) != 1:
        raise ValueError(f"LoRA key {stem}: its factors {sorted(factors)} do not make one adapter "
                         f"({'several kinds: ' + ', '.join(sorted(kinds)) if kinds else 'no up/down pair'})")
    kind = kinds.pop()
    for factor, what in _UNSUPPORTED.items():
        if factor in factors:
            raise ValueError(f"LoRA key {stem}: {what} are not supported")
    need = {"lora": [("up",), ("down",)], "loha": [("w1_a",), ("w1_b",), ("w2_a",), ("w2_b",)],
            "lokr": [("w1", "w1_a"), ("w2", "w2_a")], "full": [("diff",)]}[kind]
    for options in need:
        if not any(o in factors for o in options):
            raise ValueError(f"LoRA key {stem}: a {kind} adapter needs {' or '.join(options)}; it has "
                             f"{sorted(factors)}")
    if kind == "lora" and factors["up"].shape[1] != factors["down"].shape[0]:
        raise ValueError(f"LoRA key {stem}: rank mismatch, up is {tuple(factors['up'].shape)} and down "
                         f"{tuple(factors['down'].shape)}")
    return Adapter(kind, factors, stem)


def _apply_peft_alphas(adapters: dict[str, Adapter], metadata: dict[str, str]) -> None:
    """diffusers' `lora_adapter_metadata` (a LoraConfig per component prefix: lora_alpha, alpha_pattern) gives the
    alphas a PEFT file does not store as keys; without it alpha = r (scale 1), as diffusers and PEFT read it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    configs = json.loads(raw)
    if any("." in key for key in configs):  # diffusers' save_lora_weights: "unet.lora_alpha", "unet.r", ...
        grouped: dict[str, dict] = {}
        for key, value in configs.items():
            prefix, _, name = key.rpartition(".")
            grouped.setdefault(prefix, {})[name] = value
        configs = grouped
    elif "lora_alpha" in configs or "r" in configs:  # one config for the whole file
        configs = {"": configs}
    for prefix, config in configs.items():
        if not isinstance(config, dict):
            continue
        for stem, adapter in adapters.items():
            if adapter.kind != "lora" or "alpha" in adapter.factors or not stem.startswith(prefix):
                continue
            module = stem[len(prefix):].lstrip(".")
            alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items()
                          if module == k or module.endswith("." + k)), config.get("lora_alpha"))
            if alpha is not None:
                adapter.factors["alpha"] = torch.tensor(float(alpha))


# ---------------------------------------------------------------- the model's names


def _inner(component) -> nn.Module:
    """The module whose names the files use: the transformers model inside reverie's text encoder wrappers
    (TextEncoder, T5Encoder), else the component itself."""
    inner = getattr(component, "text_model", None)
    return inner if type(component).__module__.startswith("reverie.") and isinstance(inner, nn.Module) else component


def module_names(pipe) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may use for one of the pipeline's weight-holding modules -> (component, path)."""
    table: dict[str, tuple[str, str]] = {}
    for component, (kohya, peft) in _COMPONENT_NAMES.items():
        module = pipe.components.get(component)
        if not isinstance(module, nn.Module):
            continue
        paths = [p for p, m in _inner(module).named_modules()
                 if p and isinstance(getattr(m, "weight", None), Tensor) and m.weight.ndim >= 2]
        aliases = _sgm_aliases(module, paths) if component == "unet" else {}
        if component in TEXT_COMPONENTS:  # transformers 5's CLIPTextModel has no text_model level; files do
            aliases = {p: f"text_model.{p}" for p in paths if not p.startswith("text_model.")}
        for path in paths:
            for name in (path, aliases.get(path)):
                if name is None:
                    continue
                for prefix in kohya:
                    table[f"{prefix}_{name.replace('.', '_')}"] = (component, path)
                table[f"{peft}.{name}"] = (component, path)
    return table


def _sgm_aliases(unet, paths: list[str]) -> dict[str, str]:
    """diffusers path -> SGM/LDM path (input_blocks.4.1.transformer_blocks.0.attn1.to_q) for a UNet whose layout
    the LDM key map knows (SD 1/2, SDXL); {} for others."""
    from .formats.single_file import unet_module_map

    try:
        mapping = unet_module_map(unet.config.to_dict())
    except (ValueError, KeyError, AttributeError):
        return {}
    prefixes = sorted(mapping, key=len, reverse=True)
    out = {}
    for path in paths:
        hit = next((p for p in prefixes if path == p or path.startswith(p + ".")), None)
        if hit is not None:
            out[path] = mapping[hit] + path[len(hit):]
    return out


# ---------------------------------------------------------------- merging


@dataclasses.dataclass
class _Patch:
    adapter: Adapter
    strength: float
    module: nn.Module


def resolve(pipe, uses: Iterable[LoraUse]) -> list[_Patch]:
    """Each adapter of each LoRA matched to its module and checked against its weight's shape; nothing changes.
    A key that names no module of this pipeline is a ValueError naming it."""
    uses = list(uses)
    if not uses:
        return []
    if pipe._lora_names is None:  # the modules never change: the table is built once per pipeline
        pipe._lora_names = module_names(pipe)
    table = pipe._lora_names
    patches = []
    for use in uses:
        unknown = [stem for stem in use.lora.adapters if stem not in table]
        if unknown:
            sample = ", ".join(sorted(unknown)[:3])
            parts = sorted({component for component, _ in table.values()})
            raise ValueError(f"LoRA {use.lora.name!r}: {len(unknown)} of its {len(use.lora.adapters)} keys name no "
                             f"module of this {pipe.family.name} model ({sample}{', ...' if len(unknown) > 3 else ''})"
                             f"; this model's parts: {', '.join(parts)}. A LoRA for another architecture?")
        for stem, adapter in use.lora.adapters.items():
            component, path = table[stem]
            module = _inner(pipe.components[component]).get_submodule(path)
            if module.weight.dtype.itemsize == 1:
                raise ValueError(f"LoRA {use.lora.name!r}: {component}.{path} holds 8-bit weights; merge LoRAs into "
                                 f"a float16 / bfloat16 / float32 model")
            strength = use.text if component in TEXT_COMPONENTS else use.unet
            adapter.delta(module.weight)  # the shape check, before any weight changes
            if "diff_b" in adapter.factors and (module.bias is None or
                                                module.bias.shape != adapter.factors["diff_b"].shape):
                raise ValueError(f"LoRA key {stem}: diff_b {tuple(adapter.factors['diff_b'].shape)} does not fit the "
                                 f"module's bias")
            patches.append(_Patch(adapter, strength, module))
    return patches


class LoraState:
    """The weights a pipeline's merged LoRAs replaced (saved once, before the first merge) and the active set."""

    def __init__(self):
        self.saved: dict[int, tuple[nn.Module, Tensor, Tensor | None]] = {}
        self.active: list[LoraUse] = []

    def restore(self) -> None:
        with torch.no_grad():
            for module, weight, bias in self.saved.values():
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
        self.saved.clear()
        self.active = []

    def merge(self, pipe, uses: list[LoraUse]) -> None:
        patches = resolve(pipe, uses)  # may raise: the model is untouched until every patch is known good
        self.restore()
        with torch.no_grad():
            for p in patches:
                m = p.module
                if id(m) not in self.saved:
                    self.saved[id(m)] = (m, m.weight.detach().clone(),
                                         None if m.bias is None else m.bias.detach().clone())
                if p.strength == 0:
                    continue
                m.weight.copy_(_merged(p, m.weight.float()).to(m.weight.dtype))
                if "diff_b" in p.adapter.factors:
                    m.bias.add_((p.strength * p.adapter.factors["diff_b"].float()).to(m.bias.dtype))
        self.active = list(uses)


def _merged(p: _Patch, w: Tensor) -> Tensor:
    a, s = p.adapter, p.strength
    d = a.delta(w)
    if "magnitude" in a.factors:  # PEFT DoRA: the strength scales dW inside the norm
        v = w + s * d
        norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        return a.factors["magnitude"].float().reshape(-1, *[1] * (w.ndim - 1)) * v / norm
    if "dora_scale" in a.factors:  # kohya / LyCORIS DoRA (ComfyUI's weight_decompose)
        m = a.factors["dora_scale"].float()
        v = w + d
        if m.numel() == w.shape[0] and m.shape[0] == w.shape[0]:  # (out, 1, ...): per output row
            norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
            m = m.reshape(-1, *[1] * (w.ndim - 1))
        elif m.numel() == w.shape[1]:  # (1, in, ...), LyCORIS' default: per input column
            norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)).transpose(0, 1)
            m = m.reshape(1, -1, *[1] * (w.ndim - 2))
        else:
            raise ValueError(f"LoRA key {a.key}: dora_scale has {m.numel()} values; the weight {tuple(w.shape)} "
                             f"takes one per output or per input")
        return w + s * (m * v / norm - w)
    return w + s * d


def set_loras(pipe, loras) -> None:
    """Merge `loras` into the pipeline, replacing the set merged before (an empty list restores the weights
    exactly). Each item: a LoraUse, a LoRA or path (strength 1), or (LoRA or path, strength) /
    (LoRA or path, text strength, unet strength)."""
    if pipe._lora_state is None:
        pipe._lora_state = LoraState()
    pipe._lora_state.merge(pipe, [as_use(item) for item in loras])


def as_use(item) -> LoraUse:
    if isinstance(item, LoraUse):
        return item
    if isinstance(item, (tuple, list)):
        if not 2 <= len(item) <= 3:
            raise ValueError(f"loras: an item is (lora, strength) or (lora, text, unet); got {len(item)} values")
        lora = item[0] if isinstance(item[0], LoRA) else read_lora(item[0])
        text, unet = (item[1], item[1]) if len(item) == 2 else (item[1], item[2])
        return LoraUse(lora, float(text), float(unet))
    return LoraUse(item if isinstance(item, LoRA) else read_lora(item))


def parse_lora_option(value: str) -> tuple[str, float, float]:
    """`--lora FILE[:W]` or `FILE:TE:UNET` -> (file, text strength, unet strength); W defaults to 1."""
    parts, numbers = value.split(":"), []
    while len(parts) > 1 and len(numbers) < 2 and _is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    text = numbers[0] if numbers else 1.0
    return ":".join(parts), text, numbers[1] if len(numbers) > 1 else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- files by name, prompt tags, hashes

LORA_SUFFIXES = (".safetensors",)


class LoraFolder:
    """LoRA files under a folder (A1111's --lora-dir; subfolders too), by name: the file's stem, else its
    metadata alias (ss_output_name), as A1111 finds them. Each file is parsed once (again when it changes);
    `refresh` scans the folder again."""

    def __init__(self, folder=None):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"lora_dir: {self.folder} is not a folder")
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self._parsed: dict[tuple, LoRA] = {}  # (path, mtime_ns, size) -> LoRA
        self.refresh()

    def refresh(self) -> None:
        files = {}
        if self.folder is not None:
            for path in sorted(p for p in self.folder.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file()):
                files.setdefault(path.stem, path)
        with self._lock:
            self._files = files

    def names(self) -> list[str]:
        return sorted(self._files)

    def get(self, name: str) -> LoRA:
        path = self._files.get(name)
        if path is None:
            path = next((p for p in self._files.values() if self._load(p).metadata.get("ss_output_name") == name),
                        None)
        if path is None:
            has = ", ".join(self.names()[:20]) or "none"
            where = f"in {self.folder} (it has: {has})" if self.folder is not None else "(no LoRA folder: --lora-dir)"
            raise ValueError(f"<lora:{name}>: no LoRA of that name {where}")
        return self._load(path, name)

    def _load(self, path: Path, name: str | None = None) -> LoRA:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            lora = self._parsed.get(key)
        if lora is None:
            lora = read_lora(path, name=name or path.stem)
            with self._lock:
                self._parsed[key] = lora
        return lora


def prompt_loras(prompts, lora_dir) -> tuple[list[str], list[LoraUse]]:
    """A1111's `<lora:name:te:unet>` tags: every prompt without its tags, and the LoRAs of the first prompt's
    tags (A1111 takes a batch's networks from its first prompt) found in lora_dir (a folder or a LoraFolder)."""
    from .prompt_syntax import extract_networks

    texts, uses = [], []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            texts.append(prompt)
            continue
        text, tags, _ = extract_networks(prompt)
        texts.append(text)
        if i == 0 and tags:
            if lora_dir is None:
                raise ValueError(f"prompt: {', '.join(f'<lora:{t.name}>' for t in tags)} needs a LoRA folder "
                                 f"(--lora-dir, or the server's --lora-dir)")
            if any(t.dyn is not None for t in tags):
                raise ValueError("prompt: <lora:...:dyn=N> (rank truncation) is not supported")
            folder = lora_dir if isinstance(lora_dir, LoraFolder) else LoraFolder(lora_dir)
            uses += [LoraUse(folder.get(t.name), t.te_weight, t.unet_weight) for t in tags]
    return texts, uses


def lora_hash(path) -> str:
    """A1111's short LoRA hash (infotext "Lora hashes"): the first 12 hex digits of the SHA-256 of a
    .safetensors file's tensor bytes (the header left out: kohya's / AddNet's model hash)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_record(use: LoraUse) -> dict:
    """A merged LoRA as a generation's params record it."""
    path = use.lora.path
    return {"name": use.lora.name, "path": str(path) if path else None,
            "hash": lora_hash(path) if path and path.suffix == ".safetensors" else None,
            "text": use.text, "unet": use.unet}
