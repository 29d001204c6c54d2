"""The server's LoRA folder (`reverie serve --lora-dir`): the files by name, parsed once, and the prompt's
`<lora:name:te:unet>` tags read into a request's `loras`, checked against the model before the job is queued."""

from __future__ import annotations

import threading
from pathlib import Path

from ..lora import LORA_SUFFIXES, LoraUse, read_lora, resolve
from ..prompt_syntax import extract_networks
from .job import FieldError


class LoraLibrary:
    """LoRA files under a folder, by name (the file's stem, and its ss_output_name alias as A1111 lists it)."""

    def __init__(self, folder=None):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"--lora-dir: {self.folder} is not a folder")
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self._parsed: dict[tuple, object] = {}  # (path, mtime_ns, size) -> LoRA
        self.refresh()

    def refresh(self) -> None:
        """Scan the folder again (A1111's refresh-loras)."""
        files = {}
        if self.folder is not None:
            for path in sorted(p for p in self.folder.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file()):
                files.setdefault(path.stem, path)
        with self._lock:
            self._files = files

    def listing(self) -> list[dict]:
        """A1111's /sdapi/v1/loras entries: name, alias, path, metadata."""
        out = []
        for name, path in sorted(self._files.items()):
            try:
                lora = self.get(name)
                alias, metadata = lora.metadata.get("ss_output_name", name), lora.metadata
            except ValueError:
                alias, metadata = name, {}
            out.append(dict(name=name, alias=alias, path=str(path), metadata=metadata))
        return out

    def get(self, name: str):
        path = self._files.get(name)
        if path is None:
            for other, p in self._files.items():  # the metadata alias
                if self._load(p).metadata.get("ss_output_name") == name:
                    path = p
                    break
        if path is None:
            raise FieldError("prompt", f"<lora:{name}>: not one of this server's LoRAs "
                                       f"({', '.join(sorted(self._files)) or 'none: start it with --lora-dir'})")
        return self._load(path, name)

    def _load(self, path: Path, name: str | None = None):
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            lora = self._parsed.get(key)
        if lora is None:
            lora = read_lora(path, name=name or path.stem)
            with self._lock:
                self._parsed[key] = lora
        return lora

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
