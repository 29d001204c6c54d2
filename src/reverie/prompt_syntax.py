"""AUTOMATIC1111's prompt syntax: extra-network tags, AND, prompt editing and alternation, emphasis, and the weighted,
chunked CLIP encoding that goes with it.

A1111 reads a prompt in this order (stable-diffusion-webui: modules/extra_networks.py, modules/prompt_parser.py,
modules/sd_hijack_clip.py, modules/sd_emphasis.py):

1. `<kind:arg:arg...>` extra-network tags are cut out of the text (`extract_networks`); `<lora:name:te[:unet[:dyn]]>`
   (or `te=`, `unet=`, `dyn=`) picks LoRAs, the UNet strength defaulting to the text-encoder one.
2. `\\bAND\\b` splits the prompt into sub-prompts for composable diffusion (Liu et al. 2022, "Compositional Visual
   Generation with Composable Diffusion Models"), each ending in an optional `:weight` (`split_and`). The sampler
   then guides with uncond + sum_i w_i cfg (cond_i - uncond).
3. Each sub-prompt is a schedule over the sampling steps (`schedule`): `[from:to:when]` switches text after step
   `when` (`[to:when]` adds, `[from::when]` removes), `[a|b|c]` alternates every step. A `when` with a "." is a
   fraction of the steps, otherwise a step number (A1111's `use_old_scheduling` instead reads < 1 as a fraction).
   A prompt this grammar cannot read (a stray "|", a lone backslash) is used literally, schedule syntax and all.
4. Each scheduled text is split into weighted pieces (`weighted_pieces`): `(x)` x1.1, `[x]` /1.1, `(x:w)` x w,
   nested multipliers multiply, unclosed brackets run to the end of the text, `\\( \\) \\[ \\] \\\\` are literal,
   and the uppercase word BREAK becomes `BREAK_PIECE`.
5. The pieces are tokenized one by one and packed into 75-token chunks (`prompt_chunks`): a full chunk moves the
   tokens after a comma seen in its last `comma_backtrack` (A1111's comma_padding_backtrack, 20) tokens into the
   next chunk, BREAK pads the chunk with EOS, and each chunk becomes [BOS] + 75 + [EOS] (SD2/OpenCLIP: pad id after
   the first EOS).
6. Each chunk is encoded on its own and weighted (`weighted_conditioning`): A1111's "Original" emphasis multiplies
   every token state by its weight and rescales so the chunk batch keeps its mean; ComfyUI's
   (comfy/sd1_clip.py `encode_token_weights`) moves weighted tokens away from the empty prompt's states,
   z_empty + w (z - z_empty), without a rescale.

The schedule grammar is A1111's lark grammar, read here by a small recursive-descent parser that resolves its
ambiguities as A1111 does: a bracket group that can be an edit, an alternation or an emphasis is one; one that
cannot is literal text at the top level and a parse failure inside another group. (Where the lark grammar is truly
ambiguous, a stray bracket after a group as in `(a)[x:y:3][`, A1111's Earley parser picks a parse that changes with
Python's hash seed, i.e. from one webui process to the next; reverie always takes the group.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (x) and [x]
BREAK_PIECE = ("BREAK", -1.0)  # A1111 marks BREAK with weight -1 (a BREAK inside (...) gets multiplied and is text)
MODES = ("a1111", "no_norm", "comfy")  # "Original" emphasis, "No norm" emphasis, ComfyUI's interpolation


# ------------------------------------------------------------------------------------------- extra networks and AND


@dataclass(frozen=True)
class LoraTag:
    """`<lora:name:te[:unet[:dyn]]>`: A1111's extra_networks_lora.py reads te (default 1.0), unet (default te) and
    dyn (rank truncation, default None) positionally or as te=, unet=, dyn=."""
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    dyn: int | None = None


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # extra_networks.py re_extra_net
_LORA_KINDS = ("lora", "lyco")  # the Lora extension registers "lyco" as an alias


def extract_networks(prompt: str) -> tuple[str, list[LoraTag], list[tuple[str, list[str]]]]:
    """Prompt -> (text without any `<kind:args>` tag, LoRA tags, the other tags as (kind, args split on ":")).
    A1111 removes every such tag, known kind or not."""
    loras, others = [], []

    def cut(match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind in _LORA_KINDS:
            loras.append(_lora_tag(match.group(0), args))
        else:
            others.append((kind, args))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), loras, others


def _lora_tag(tag: str, args: list[str]) -> LoraTag:
    positional = [a for a in args if len(a.split("=", 2)) != 2]
    named = dict(a.split("=", 1) for a in args if len(a.split("=", 2)) == 2)
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
        dyn = None if dyn is None else int(dyn)
    except ValueError:
        raise ValueError(f"prompt: LoRA tag {tag!r}: te and unet must be numbers and dyn an integer "
                         f"(<lora:name:te:unet:dyn> or te=, unet=, dyn=)") from None
    if not positional or not positional[0]:
        raise ValueError(f"prompt: LoRA tag {tag!r} names no LoRA (write <lora:name:weight>)")
    return LoraTag(positional[0], te, unet, dyn)


_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion sub-prompts [(text, weight)]: split on the word AND; a trailing `:number` is the weight
    (default 1.0) and trailing whitespace is dropped (prompt_parser.py get_multicond_prompt_list)."""
    parts = []
    for text in _AND.split(prompt):
        weight = _AND_WEIGHT.search(text)
        if weight is not None:
            parts.append((text[:weight.start()], float(weight.group(1))))
        else:
            parts.append((re.sub(r"\s*$", "", text), 1.0))
    return parts


# ------------------------------------------------------------------------------------- prompt editing, alternation


@dataclass(frozen=True)
class _Edit:
    """[before:after:when]; before is () for [after:when]."""
    before: tuple
    after: tuple
    when: str  # the number as written: "." in it decides fraction or step


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples, one per "|"-separated option


class _NoParse(Exception):
    """The schedule grammar cannot read this text."""


# the grammar's SIGNED_NUMBER (lark common.lark), optionally surrounded by whitespace, then the closing "]"
_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text with no syntax; "\x" escapes one character (not a newline)


def _sequence(s: str, i: int) -> tuple[list, int]:
    """A run of text, escapes and bracket groups from s[i]; stops before "]", ")", ":", "|" or the end."""
    nodes = []
    while i < len(s):
        if s[i] in "[(":
            group, i = _group(s, i)
            nodes += group
        elif (plain := _PLAIN.match(s, i)) is not None:
            nodes.append(plain.group(0))
            i = plain.end()
        elif s[i] == "\\":  # a lone backslash, or one before a newline
            raise _NoParse
        else:
            break
    return nodes, i


def _group(s: str, i: int) -> tuple[list, int]:
    """The bracket group at s[i]: (x), (x:y), [x], [to:when], [from:to:when] or [a|b|...]."""
    opening = s[i]
    first, i = _sequence(s, i + 1)
    here = s[i] if i < len(s) else ""
    if opening == "(":
        if here == ")":
            return ["(", *first, ")"], i + 1
        if here == ":":
            second, i = _sequence(s, i + 1)
            if i < len(s) and s[i] == ")":
                return ["(", *first, ":", *second, ")"], i + 1
        raise _NoParse
    if here == "]":
        return ["[", *first, "]"], i + 1
    if here == "|":
        options = [tuple(first)]
        while i < len(s) and s[i] == "|":
            option, i = _sequence(s, i + 1)
            options.append(tuple(option))
        if i < len(s) and s[i] == "]":
            return [_Alternate(tuple(options))], i + 1
        raise _NoParse
    if here == ":":
        if (when := _WHEN.match(s, i + 1)) is not None:
            return [_Edit((), tuple(first), when.group(1))], when.end()
        second, i = _sequence(s, i + 1)
        if i < len(s) and s[i] == ":" and (when := _WHEN.match(s, i + 1)) is not None:
            return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
    raise _NoParse


def _parse_schedule(s: str) -> list | None:
    """The top level: text and groups, where a bracket or ":" that starts no group is literal text. None when the
    grammar cannot read s (A1111 then uses the prompt as it is)."""
    nodes, i = [], 0
    while i < len(s):
        if s[i] in "[(":
            try:
                group, i = _group(s, i)
                nodes += group
            except _NoParse:  # no group starts here: the bracket is text
                nodes.append(s[i])
                i += 1
        elif s[i] in "]):":
            nodes.append(s[i])
            i += 1
        elif (plain := _PLAIN.match(s, i)) is not None:
            nodes.append(plain.group(0))
            i = plain.end()
        else:  # "|" outside a group, a lone backslash
            return None
    return nodes


def _steps_of(nodes, whens: list[str], alternates: list[bool]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            whens.append(node.when)
            _steps_of(node.before, whens, alternates)
            _steps_of(node.after, whens, alternates)
        elif isinstance(node, _Alternate):
            alternates.append(True)
            for option in node.options:
                _steps_of(option, whens, alternates)


def _text_at(nodes, step: int, when_step) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Edit):
            out.append(_text_at(node.before if step <= when_step(node.when) else node.after, step, when_step))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, when_step))
        else:
            out.append(node)
    return "".join(out)


def schedule(prompt: str, steps: int, *, hires_steps: int | None = None,
             use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """One (sub-)prompt -> [(until_step, text)]: text is used for sampling steps up to until_step (1-based), as
    A1111's get_learned_conditioning_prompt_schedules.

    `when` rule: with a "." it is a fraction of the steps (int(when * steps)), otherwise a step; both are capped at
    steps, and a value below 1 adds no boundary (the edit then never shows its `before`, or always, by sign).
    With hires_steps (A1111's hires pass) fractions are offset by 1.0 and steps by the first pass's `steps`, over
    hires_steps steps. use_old_scheduling: when < 1 is a fraction, otherwise a step, and no hires offset.
    Alternation adds every step.
    """
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if hires_steps is None or use_old_scheduling:
        total, step_offset, fraction_offset = steps, 0, 0.0
    else:
        total, step_offset, fraction_offset = hires_steps, steps, 1.0
    nodes = _parse_schedule(prompt)
    if nodes is None:
        return [(total, prompt)]

    def when_step(when: str) -> int:
        v = float(when)
        if use_old_scheduling:
            v = v * total if v < 1 else v
        else:
            v = (v - fraction_offset) * total if "." in when else v - step_offset
        if not math.isfinite(v):
            raise ValueError(f"prompt: the step {when!r} of a [from:to:when] edit is not a finite number")
        return min(total, int(v))

    whens, alternates = [], []
    _steps_of(nodes, whens, alternates)
    boundaries = {total, *(w for w in map(when_step, whens) if w >= 1)}
    if alternates:
        boundaries.update(range(1, total + 1))
    return [(t, _text_at(nodes, t, when_step)) for t in sorted(boundaries)]


# ------------------------------------------------------------------------------------------------------- emphasis


_ATTENTION = re.compile(r"""
    \\[()\[\]\\]?           # an escape; a backslash before anything else is dropped
  | [(\[]                   # open
  | :\s*([+-]?[.\d]+)\s*\)  # close with a weight
  | [)\]]                   # close
  | [^\\()\[\]:]+           # text
  | :                       # a colon that closes nothing is text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def weighted_pieces(text: str) -> list[tuple[str, float]]:
    """A scheduled text -> [(piece, weight)] as A1111's parse_prompt_attention: (x) x1.1, [x] /1.1, (x:w) x w, nested
    multipliers multiply (in the order the brackets close; unclosed "(" then unclosed "[" apply to the rest of the
    text), escapes literal, BREAK -> BREAK_PIECE, adjacent pieces of equal weight merged, "" -> [("", 1.0)]."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    rounds, squares = [], []  # where each open bracket's range starts

    def scale(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                multiplier = float(weight)
            except ValueError:
                raise ValueError(f"prompt: the weight {weight!r} in {token!r} is not a number (write (text:1.2))") \
                    from None
            scale(rounds.pop(), multiplier)
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    pieces.append(list(BREAK_PIECE))
                pieces.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# ------------------------------------------------------------------------------------------------ the whole prompt


@dataclass(frozen=True)
class Scheduled:
    until_step: int
    text: str
    pieces: tuple  # ((piece, weight), ...) of weighted_pieces(text)


@dataclass(frozen=True)
class SubPrompt:
    text: str
    weight: float  # its AND weight
    schedule: tuple  # (Scheduled, ...)


@dataclass(frozen=True)
class ParsedPrompt:
    parts: tuple  # (SubPrompt, ...): one per AND part
    loras: tuple  # (LoraTag, ...)
    networks: tuple  # ((kind, args), ...): other extra-network tags A1111 removed (hypernet, ...)


def parse(prompt: str, steps: int = 20, *, hires_steps: int | None = None,
          use_old_scheduling: bool = False) -> ParsedPrompt:
    """A1111's full reading of one prompt: tags out, AND parts, each part's schedule over `steps`, each scheduled
    text's weighted pieces."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text, loras, networks = extract_networks(prompt)
    parts = []
    for part, weight in split_and(text):
        timeline = schedule(part, steps, hires_steps=hires_steps, use_old_scheduling=use_old_scheduling)
        parts.append(SubPrompt(part, weight, tuple(Scheduled(t, s, tuple(weighted_pieces(s))) for t, s in timeline)))
    return ParsedPrompt(tuple(parts), tuple(loras), tuple((k, tuple(a)) for k, a in networks))


def describe(parsed: ParsedPrompt) -> str:
    """The parse as text (`reverie prompt`): LoRA and other tags, then per AND part its weight and, per scheduled
    text, the steps it covers, the text and its weighted pieces."""
    lines = [f"LoRA {t.name!r}: te {t.te_weight:g}, unet {t.unet_weight:g}" + (f", dyn {t.dyn}" if t.dyn else "")
             for t in parsed.loras]
    lines += [f"<{kind}:{':'.join(args)}> (removed; reverie does not read {kind} tags)"
              for kind, args in parsed.networks]
    for n, part in enumerate(parsed.parts, 1):
        lines.append(f"AND part {n}, weight {part.weight:g}: {part.text!r}")
        start = 1
        for entry in part.schedule:
            lines.append(f"  steps {start}-{entry.until_step}: {entry.text!r}")
            lines.append(f"    {list(entry.pieces)}")
            start = entry.until_step + 1
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ chunking and weighted encoding


def _chunk_tokens(tokenizer, text: str, width: int, comma_backtrack: int) -> list[tuple[list[int], list[float]]]:
    """One text -> [(tokens, weights)] of `width` tokens each (before BOS/EOS), A1111's tokenize_line: BREAK pads
    the chunk with EOS; when a chunk is full and a comma came within its last comma_backtrack tokens, the tokens
    after the comma start the next chunk."""
    pieces = weighted_pieces(text)
    ids = tokenizer([p for p, _ in pieces], add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.get_vocab().get(",</w>")
    eos = tokenizer.eos_token_id
    chunks, tokens, weights, last_comma = [], [], [], -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        pad = width - len(tokens)
        chunks.append((tokens + [eos] * pad, weights + [1.0] * pad))
        tokens, weights, last_comma = [], [], -1

    for piece_ids, (piece, weight) in zip(ids, pieces):
        if (piece, weight) == BREAK_PIECE:
            close()
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(tokens)
            elif comma_backtrack and len(tokens) == width and last_comma != -1 \
                    and len(tokens) - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == width:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def prompt_chunks(tokenizer, texts: str | list[str], *, comma_backtrack: int = 20, max_length: int = 77,
                  chunks: int | None = None) -> tuple[Tensor, Tensor]:
    """Texts -> (ids (B, k, max_length), weights (B, k, max_length) float32): each chunk [BOS] + max_length - 2
    tokens + [EOS] with weight 1.0 on BOS, EOS and padding; shorter texts get empty chunks ([BOS] + EOS...) up to the
    batch's k (or `chunks` if larger). Where the pad id differs from EOS (SD2's and SDXL's OpenCLIP) every position
    after a chunk's first EOS is the pad id, as A1111's process_tokens."""
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a str or a non-empty list of str, got {texts!r:.80}")
    for name, value, low in (("comma_backtrack", comma_backtrack, 0), ("max_length", max_length, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be None or an int >= 1, got {chunks!r}")
    width = max_length - 2
    per_text = [_chunk_tokens(tokenizer, t, width, comma_backtrack) for t in texts]
    k = max(chunks or 1, *(len(c) for c in per_text))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    empty = ([eos] * width, [1.0] * width)
    ids = torch.tensor([[[bos, *t, eos] for t, _ in c + [empty] * (k - len(c))] for c in per_text])  # (B, k, L)
    weights = torch.tensor([[[1.0, *w, 1.0] for _, w in c + [empty] * (k - len(c))] for c in per_text])
    if pad is not None and pad != eos:
        after_eos = ((ids == eos).cumsum(-1) - (ids == eos).long()) > 0  # strictly after the first EOS
        ids = ids.masked_fill(after_eos, pad)
    return ids, weights.float()


def _encode(text_model, ids: Tensor, clip_skip: int | None, hidden_layer: int | None) -> Tensor:
    """(N, L) ids -> (N, L, D) states: last_hidden_state; hidden_states[-(clip_skip + 1)] through the final
    LayerNorm (diffusers' clip_skip = A1111's "Clip skip" - 1); or hidden_states[hidden_layer] raw (SDXL: -2)."""
    ids = ids.to(text_model.device)
    if clip_skip is None and hidden_layer is None:
        return text_model(ids).last_hidden_state
    states = text_model(ids, output_hidden_states=True).hidden_states
    if hidden_layer is not None:
        return states[hidden_layer]
    return getattr(text_model, "text_model", text_model).final_layer_norm(states[-(clip_skip + 1)])


def apply_weights(z: Tensor, weights: Tensor, mode: str = "a1111", z_empty: Tensor | None = None) -> Tensor:
    """One chunk batch z (B, L, D) with per-token weights (B, L) -> weighted states.

    a1111 (sd_emphasis.py EmphasisOriginal): z' = z w, then z' (mean(z) / mean(z')), means over every element of
    the batch. no_norm (EmphasisOriginalNoNorm): z w. comfy (sd1_clip.py encode_token_weights): every token whose
    weight is not 1 becomes z_empty + w (z - z_empty), z_empty (L, D) the empty prompt's chunk; no rescale.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    w = weights.to(z.device, torch.float32)[..., None]  # (B, L, 1)
    z32 = z.float()
    if mode == "comfy":
        if z_empty is None:
            raise ValueError("z_empty: comfy weighting needs the empty prompt's states (L, D)")
        e = z_empty.float().to(z.device)  # (L, D)
        out = torch.where(w != 1.0, (z32 - e) * w + e, z32)
    else:
        out = z32 * w
        if mode == "a1111":
            out = out * (z32.mean() / out.mean())
    return out.to(z.dtype)


def weighted_conditioning(text_model, tokenizer, text: str | list[str], *, mode: str = "a1111",
                          comma_backtrack: int = 20, clip_skip: int | None = None, hidden_layer: int | None = None,
                          chunks: int | None = None) -> Tensor:
    """Scheduled texts (no AND, no tags: one `Scheduled.text` each) -> (B, 77 k, D) weighted CLIP states.

    text_model is a transformers CLIPTextModel / CLIPTextModelWithProjection and tokenizer its CLIP tokenizer.
    The texts are chunked by `prompt_chunks`, chunk i of every text is encoded as one batch, weighted by
    `apply_weights` and the chunks are concatenated on the token axis (A1111's torch.hstack(zs)). A1111 passes
    one prompt's scheduled texts together, so its mean restore spans them: pass the same list to get its numbers.
    clip_skip (diffusers' convention, None = the last layer) or hidden_layer (an index into hidden_states without
    the final LayerNorm) picks the layer. Wrap in torch.no_grad() for inference.
    """
    if clip_skip is not None and hidden_layer is not None:
        raise ValueError("clip_skip and hidden_layer: give at most one")
    layers = text_model.config.num_hidden_layers
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                  or not 0 <= clip_skip < layers):
        raise ValueError(f"clip_skip must be None or an int in [0, {layers - 1}], got {clip_skip!r}")
    if hidden_layer is not None and (isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int)
                                     or not -layers - 1 <= hidden_layer <= layers):
        raise ValueError(f"hidden_layer must be None or an int in [{-layers - 1}, {layers}], got {hidden_layer!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    max_length = min(int(tokenizer.model_max_length), text_model.config.max_position_embeddings)
    ids, weights = prompt_chunks(tokenizer, text, comma_backtrack=comma_backtrack, max_length=max_length,
                                 chunks=chunks)  # (B, k, L) each
    z_empty = None
    if mode == "comfy":
        empty_ids, _ = prompt_chunks(tokenizer, "", comma_backtrack=0, max_length=max_length)  # (1, 1, L)
        z_empty = _encode(text_model, empty_ids[:, 0], clip_skip, hidden_layer)[0]  # (L, D)
    states = [apply_weights(_encode(text_model, ids[:, i], clip_skip, hidden_layer), weights[:, i], mode, z_empty)
              for i in range(ids.shape[1])]  # k x (B, L, D)
    return torch.cat(states, dim=1)  # (B, k L, D)
