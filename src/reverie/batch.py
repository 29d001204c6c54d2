"""Batch generation from a prompts file: one image per seed, compatible requests sharing forward passes,
deterministic file names, resumable after a crash.

    PROMPTS.txt     one prompt per line (blank lines and lines starting with # are skipped)
    PROMPTS.jsonl   one request per line: {"prompt": ..., "negative_prompt", "seed", "steps", "guidance_scale",
                    "guidance_rescale", "sampler", "scheduler", "width", "height", "clip_skip", "n"}

Images are numbered in file order; a request with n images and seed s gives seeds s, s+1, ... (A1111's
convention), one without a seed gets base_seed + its image number. Image k is written as
`{k:05d}-{seed}.png` (with reverie.metadata's chunks, atomically), so a rerun skips what exists and writes
only what is missing; manifest.jsonl lists every image when the batch completes.

`run_batch_ray` spreads the same chunks over the actors of a Ray cluster (each loads the pipeline once; one per
GPU where the cluster has GPUs); the driver writes each chunk's images as it arrives, so the output folder is
the driver's alone and an interrupted run resumes like any other. Same chunks, same seeds: the same images.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .metadata import image_params, read_png_info, save_png

MAX_SEED = 2**32 - 1
MANIFEST = "manifest.jsonl"
FIELDS = {  # field -> (allowed types, may be None)
    "prompt": ((str,), False), "negative_prompt": ((str,), True), "seed": ((int,), True), "steps": ((int,), True),
    "guidance_scale": ((int, float), True), "guidance_rescale": ((int, float), False), "sampler": ((str,), True),
    "scheduler": ((str,), True), "width": ((int,), True), "height": ((int,), True), "clip_skip": ((int,), True),
    "n": ((int,), False),
}
# steps, guidance_scale and sampler None: the model family's defaults (SD: 30, 7.5, dpmpp_2m; see reverie.families)
DEFAULTS = {"negative_prompt": None, "seed": None, "steps": None, "guidance_scale": None, "guidance_rescale": 0.0,
            "sampler": None, "scheduler": None, "width": None, "height": None, "clip_skip": None, "n": 1}
# what must agree for images to share a forward pass
SHARED = ("width", "height", "steps", "sampler", "scheduler", "guidance_scale", "guidance_rescale", "clip_skip")
_OUTPUT = re.compile(r"^\d{5,}-\d+\.png$")


def _check(request: dict, where: str) -> dict:
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    for key, value in request.items():
        types, nullable = FIELDS[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or \
                (isinstance(value, float) and not math.isfinite(value)):
            kind = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise ValueError(f"{where}: field {key!r} must be {kind}; got {value!r}")
    if not isinstance(request.get("prompt"), str):
        raise ValueError(f"{where}: field 'prompt' is required (a string)")
    if request["n"] < 1:
        raise ValueError(f"{where}: field 'n' must be >= 1; got {request['n']}")
    if request["seed"] is not None and not 0 <= request["seed"] <= MAX_SEED - request["n"] + 1:
        raise ValueError(f"{where}: field 'seed' must be in [0, {MAX_SEED - request['n'] + 1}]; got {request['seed']}")
    return request


def read_requests(path, **defaults) -> list[dict]:
    """The requests of a .txt or .jsonl prompts file, each with every field (defaults fill what a line omits)."""
    path = Path(path)
    base = _check({**DEFAULTS, "prompt": "", **defaults}, "defaults")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompts file must end in .txt or .jsonl; got {path.name!r}")
    if not path.is_file():
        raise ValueError(f"prompts file: {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (path.suffix == ".txt" and line.lstrip().startswith("#")):
            continue
        where = f"{path.name} line {number}"
        if path.suffix == ".txt":
            requests.append({**base, "prompt": line.strip()})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        if "prompt" not in obj:
            raise ValueError(f"{where}: field 'prompt' is required (a string)")
        requests.append(_check({**base, **obj}, where))
    if not requests:
        raise ValueError(f"prompts file: {path} has no prompts")
    return requests


@dataclass(frozen=True)
class Job:
    """One image of the batch."""

    index: int  # position in the batch, in file order
    seed: int
    request: dict = field(compare=False)  # the request it comes from (n and seed aside)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-{self.seed}.png"

    @property
    def key(self) -> tuple:
        return tuple(self.request[k] for k in SHARED)


def plan(requests: list[dict], base_seed: int = 0) -> list[Job]:
    """Every image of the requests, numbered, with its seed."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not 0 <= base_seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}]; got {base_seed!r}")
    jobs = []
    for request in requests:
        rest = {k: v for k, v in request.items() if k not in ("n", "seed")}
        for k in range(request["n"]):
            index = len(jobs)
            seed = request["seed"] + k if request["seed"] is not None else (base_seed + index) % (MAX_SEED + 1)
            jobs.append(Job(index, seed, rest))
    return jobs


def chunks(jobs: list[Job], batch_size: int, *, negative_given: bool = False) -> list[list[Job]]:
    """Compatible jobs (same SHARED fields) in groups of at most batch_size, in order of first appearance.
    negative_given=True also keeps jobs with and without a negative prompt apart (for models where no negative
    is not "": Family.zeroes_absent_negative)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        key = job.key + ((job.request["negative_prompt"] is not None,) if negative_given else ())
        groups.setdefault(key, []).append(job)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _generate(pipe, chunk: list[Job]):
    r = chunk[0].request
    negatives = [j.request["negative_prompt"] for j in chunk]
    if all(n is None for n in negatives):
        negatives = None  # the model's own default (SDXL: zeros)
    else:  # "" is CFG's default negative (chunks keeps None apart where the model makes it differ)
        negatives = [n or "" for n in negatives]
    return pipe([j.request["prompt"] for j in chunk], negative_prompt=negatives,
                steps=r["steps"], guidance_scale=r["guidance_scale"], guidance_rescale=r["guidance_rescale"],
                sampler=r["sampler"], scheduler=r["scheduler"], width=r["width"], height=r["height"],
                clip_skip=r["clip_skip"], seed=[j.seed for j in chunk], progress=False)


def _existing(out: Path, job: Job) -> dict | None:
    """The recorded request of an image already written for this job, checked to be this job's."""
    path = out / job.name
    if not path.is_file():
        return None
    request = read_png_info(path)["request"] or {}
    if request.get("prompt") != job.request["prompt"] or request.get("seed") != job.seed:
        raise ValueError(f"out: {path} was made for another request (prompt {request.get('prompt')!r}); the prompts "
                         f"file changed since: write to a new output folder")
    return request


def _remove_stale_temps(out: Path) -> None:
    """Temp files a killed run left behind (reverie's atomic writes name them .NAME.XXXXXXXX.tmp)."""
    for tmp in out.glob(".*.tmp"):
        name = tmp.name[1:].rsplit(".", 2)[0]
        if _OUTPUT.match(name) or name == MANIFEST:
            tmp.unlink(missing_ok=True)


def _images(pipe, chunk: list[Job]) -> list[tuple]:
    """(image, its recorded parameters) for each job of a chunk, from one pipeline call."""
    result = _generate(pipe, chunk)
    return [(result.images[i], image_params(result.params, i, record_batch=True)) for i in range(len(chunk))]


def run_batch(pipe, requests: list[dict], out, *, batch_size: int = 4, base_seed: int = 0,
              progress: bool = True) -> dict:
    """Generate every image of `requests` (see read_requests) into folder `out`, skipping those already there.
    Returns {"total", "skipped", "generated", "flagged", "manifest"}."""
    def generate(todo):
        for chunk in chunks(todo, batch_size, negative_given=pipe.family.zeroes_absent_negative(pipe)):
            yield chunk, _images(pipe, chunk)

    return _run(requests, out, base_seed, progress, generate)


class _Generator:
    """A Ray actor's state: the pipeline, loaded once."""

    def __init__(self, load, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.pipe = load()

    def negative_given(self) -> bool:
        return self.pipe.family.zeroes_absent_negative(self.pipe)

    def run(self, chunk: list[Job]) -> tuple[list[Job], list[tuple]]:
        return chunk, _images(self.pipe, chunk)


def run_batch_ray(load, requests: list[dict], out, *, batch_size: int = 4, base_seed: int = 0, progress: bool = True,
                  address: str | None = None, actors: int | None = None) -> dict:
    """run_batch on a Ray cluster. load: a picklable callable returning the pipeline, called once in each actor
    (reverie must be installed on every node). address: the cluster's ("auto", "ray://host:10001"); None starts a
    local Ray instance (or joins $RAY_ADDRESS). actors: how many (default: one per GPU where the cluster has GPUs,
    otherwise one per two CPUs); on CPUs each actor gets an equal share of the cluster's CPUs as torch threads."""
    try:
        import ray
    except ImportError:
        raise ValueError("ray: reverie batch --ray needs Ray (pip install -e '.[ray]')") from None
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise ValueError(f"actors must be an integer >= 1; got {actors!r}")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        count = actors or (gpus if gpus else max(1, cpus // 2))
        if gpus:
            options = dict(num_gpus=1)
            threads = None
        else:
            threads = max(1, cpus // count)
            options = dict(num_cpus=threads)
        cls = ray.remote(**options)(_Generator)
        pool = [cls.remote(load, threads) for _ in range(count)]

        def generate(todo):
            from ray.util import ActorPool

            negative_given = ray.get(pool[0].negative_given.remote())
            work = chunks(todo, batch_size, negative_given=negative_given)
            yield from ActorPool(pool).map_unordered(lambda actor, chunk: actor.run.remote(chunk), work)

        return _run(requests, out, base_seed, progress, generate)
    finally:
        if started:
            ray.shutdown()


def _run(requests: list[dict], out, base_seed: int, progress: bool, generate) -> dict:
    """Plan the batch, skip the images already in `out`, write what generate(todo) yields — (chunk, [(image,
    params)]) — as it comes, then the manifest."""
    from tqdm.auto import tqdm

    from .formats.safetensors_io import _atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    jobs = plan(requests, base_seed)
    records = {job.index: r for job in jobs if (r := _existing(out, job)) is not None}
    todo = [job for job in jobs if job.index not in records]
    with tqdm(total=len(jobs), initial=len(records), unit="image", desc="batch", disable=not progress) as bar:
        for chunk, images in generate(todo) if todo else ():
            for job, (image, params) in zip(chunk, images):
                save_png(image, params, out / job.name)
                records[job.index] = params
                bar.update(1)
    lines = [json.dumps({"index": job.index, "file": job.name,
                         **{k: v for k, v in records[job.index].items() if k != "batch"}}, sort_keys=True)
             for job in jobs]
    manifest = _atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return {"total": len(jobs), "skipped": len(jobs) - len(todo), "generated": len(todo),
            "flagged": sum(bool(r.get("nsfw")) for r in records.values()), "manifest": manifest}
