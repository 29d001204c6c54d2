"""The server's LoRA folder (`reverie serve --lora-dir`, a reverie.lora.LoraFolder): the prompt's
`<lora:name:te:unet>` tags read into a request's `loras`, checked against the model before the job is queued."""

from __future__ import annotations

from ..lora import LoraFolder, LoraUse, resolve
from ..prompt_syntax import extract_networks
from .job import FieldError


class LoraLibrary(LoraFolder):
    """The server's LoRA folder: an unknown name is a 422 naming the prompt."""

    def listing(self) -> list[dict]:
        """A1111's /sdapi/v1/loras entries: name, alias, path, metadata."""
        out = []
        for name in self.names():
            try:
                lora = self.get(name)
                alias, metadata = lora.metadata.get("ss_output_name", name), lora.metadata
            except (FieldError, ValueError):
                alias, metadata = name, {}
            out.append(dict(name=name, alias=alias, path=str(self._files[name]), metadata=metadata))
        return out

    def get(self, name: str):
        try:
            return super().get(name)
        except ValueError as e:
            raise FieldError("prompt", str(e)) from None

    def read_prompt(self, pipe, prompt, negative, loras) -> tuple:
        """(prompt and negative prompt without their extra-network tags, loras as [[name, te, unet], ...]): the
        positive prompt's LoRA tags after the request's own `loras`, each found and checked against `pipe`."""
        tags = []
        if isinstance(prompt, str):
            prompt, tags, _ = extract_networks(prompt)
        if isinstance(negative, str):
            negative = extract_networks(negative)[0]
        wanted = [list(item) for item in loras or []] + [[t.name, t.te_weight, t.unet_weight] for t in tags]
        for item in wanted:
            if not (len(item) == 3 and isinstance(item[0], str) and
                    all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item[1:])):
                raise FieldError("loras", f"each item is [name, text strength, unet strength]; got {item!r}")
        if any(t.dyn is not None for t in tags):
            raise FieldError("prompt", "<lora:...:dyn=N> (rank truncation) is not supported")
        try:
            resolve(pipe, self.uses(wanted))
        except FieldError:
            raise
        except ValueError as e:
            raise FieldError("prompt" if tags else "loras", str(e)) from None
        return prompt, negative, [[n, float(te), float(unet)] for n, te, unet in wanted]

    def uses(self, loras) -> list[LoraUse]:
        return [LoraUse(self.get(name), te, unet) for name, te, unet in loras or []]
