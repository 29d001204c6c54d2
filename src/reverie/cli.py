"""The `reverie` command."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from .loading import BUNDLED, fast_model_path, model_path  # noqa: F401  (BUNDLED: re-exported for scripts and tests)
from .train.cli import add_train_parser, parse_args


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, sampler=args.sampler)
    print(f"wrote {args.out}")




DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _generate(args) -> None:
    import torch

    from .pipeline import Pipeline

    if args.from_image:
        return _regenerate(args)
    if args.prompt is None:
        raise ValueError("prompt: give a prompt, or --from IMAGE to regenerate an image")
    _check_out(args.out)
    files = {k: getattr(args, k) for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "config",
                                           "variant") if getattr(args, k) is not None}
    path = fast_model_path(args.model) if args.fast else model_path(args.model)
    pipe = Pipeline.from_pretrained(path, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, offload=args.offload,
                                    safety_checker=_safety_option(args), **files)
    _configure_safety(pipe, args)
    _configure_speed(pipe, args)
    prompt, negative = _apply_loras(pipe, args, args.prompt, args.negative)
    video = _is_video(pipe)
    out, fps = _video_out(args) if video else (Path(args.out), None)
    if not video:
        _check_png(args.out)
        for flag, value in (("--frames", args.frames), ("--fps", args.fps)):
            if value is not None:
                raise ValueError(f"{flag}: {pipe.family.name} makes images; only video models (Wan) take {flag}")
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.freeu:
        try:
            pipe.enable_freeu(*(float(v) for v in args.freeu.split(",")))
        except TypeError:
            raise ValueError(f"--freeu: four numbers S1,S2,B1,B2 (e.g. 0.9,0.2,1.5,1.6); got {args.freeu!r}") from None
    seeds = _seeds(args.seed, args.num_images)
    handoff = {"denoising_end": args.refiner_switch_at} if args.refiner else {}
    extras = dict(subseed=args.subseed, subseed_strength=args.subseed_strength) if args.subseed_strength else {}
    if args.tiling:
        extras["tiling"] = True
    call = pipe
    if args.hires_scale is not None:
        from functools import partial

        from .hires import hires_fix

        if args.refiner:
            raise ValueError("--hires-scale: not with --refiner")
        call = partial(hires_fix, pipe, hr_scale=args.hires_scale, hr_upscaler=args.hires_upscaler,
                       hr_second_pass_steps=args.hires_steps, denoising_strength=args.hires_strength)
    result = call(prompt, negative_prompt=negative, steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, scheduler=args.scheduler, width=args.width, height=args.height,
                  seed=seeds, num_images=args.num_images, clip_skip=args.clip_skip,
                  **_control_kwargs(args), **_edit_kwargs(args, pipe), **_family_kwargs(args), **handoff, **extras)
    if args.refiner:
        result = _refine(args, result, seeds)
    if video:
        return _save_videos(result, out, fps)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        _save(image, result, i, path)
        print(f"wrote {path} (seed {result.params['seeds'][i]})")


def _apply_loras(pipe, args, prompt, negative, recorded=(), embeddings=()):
    """--embedding files / folders and those an image recorded; --lora FILE[:TE[:UNET]] (repeatable), the LoRAs an
    image recorded (--from) and the prompt's <lora:name:te:unet> tags (files in --lora-dir), merged into the
    pipeline. Returns the prompt and negative prompt without their tags (A1111 removes them from both; the
    positive prompt's pick the LoRAs)."""
    from .lora import LoraFolder, LoraUse, parse_lora_option, prompt_loras, read_lora
    from .prompt_syntax import extract_networks

    from .embeddings import embedding_files

    for source in args.embedding or []:
        for file in embedding_files(source):
            if file.suffix != ".safetensors" and not args.allow_pickle and Path(source).is_dir():
                print(f"note: {file} skipped: a pickle (--allow-pickle opens it)", file=sys.stderr)
                continue
            pipe.load_embedding(file, allow_pickle=args.allow_pickle)
    for record in embeddings:
        if record["name"] not in pipe.__dict__.get("embeddings", {}):
            if not Path(record.get("path") or "").is_file():
                raise ValueError(f"--from: the image used embedding {record['name']!r} ({record.get('path')}), "
                                 f"which is not there; pass --embedding")
            pipe.load_embedding(record["path"], name=record["name"], allow_pickle=args.allow_pickle)
    uses = []
    for value in args.lora or []:
        path, text, unet = parse_lora_option(value)
        uses.append(LoraUse(read_lora(path), text, unet))
    for record in recorded:
        path = record.get("path")
        if not (path and Path(path).is_file()):
            if args.lora_dir is None:
                raise ValueError(f"--from: the image was made with LoRA {record['name']!r} ({path}), which is not "
                                 f"there; pass --lora-dir")
            uses.append(LoraUse(LoraFolder(args.lora_dir).get(record["name"]), record["text"], record["unet"]))
            continue
        uses.append(LoraUse(read_lora(path, name=record["name"]), record["text"], record["unet"]))
    many = isinstance(prompt, list)
    prompts, tagged = prompt_loras(prompt if many else [prompt], args.lora_dir)
    negatives = negative if isinstance(negative, list) else [negative]
    negatives = [extract_networks(n)[0] if isinstance(n, str) else n for n in negatives]
    if uses or tagged:
        pipe.set_loras(uses + tagged)
    return (prompts if many else prompts[0]), (negatives if isinstance(negative, list) else negatives[0])


def _refine(args, first, seeds):
    """The refiner's share (denoising_start = the switch point) from the first model's latents, same settings."""
    import torch

    from .pipeline import Pipeline

    refiner = Pipeline.from_pretrained(model_path(args.refiner), device=args.device,
                                       dtype=getattr(torch, DTYPES[args.dtype]), offload=args.offload,
                                       safety_checker=_safety_option(args))
    _configure_safety(refiner, args)
    p = first.params
    prompts = p["prompt"][::args.num_images]
    result = refiner(prompts, negative_prompt=args.negative, steps=p["steps"], guidance_scale=args.guidance,
                     sampler=p["sampler"], scheduler=p["schedule"], image=first.latents,
                     seed=seeds, num_images=args.num_images, denoising_start=args.refiner_switch_at, progress=True)
    # as A1111 and the server record it: the first model is the "Model", the refiner is named beside it
    result.params |= dict(model=p["model"], model_hash=p.get("model_hash"), refiner=refiner.name,
                          refiner_switch_at=args.refiner_switch_at)
    return result


def _family_kwargs(args) -> dict:
    """The flow families' options given on the command line (the pipeline refuses those a model lacks)."""
    out = {}
    if args.frames is not None:
        out["num_frames"] = args.frames
    if args.shift is not None:
        out["shift"] = args.shift
    if args.true_cfg is not None:
        out["true_cfg_scale"] = args.true_cfg
    if args.max_sequence_length is not None:
        out["max_sequence_length"] = args.max_sequence_length
    if args.prompt_syntax is not None:
        out["prompt_syntax"] = args.prompt_syntax
    if args.skip_layers:
        try:
            out["skip_guidance_layers"] = [int(i) for i in args.skip_layers.split(",")]
        except ValueError:
            raise ValueError(f"--skip-layers: comma-separated block indices, e.g. 7,8,9; got {args.skip_layers!r}") \
                from None
    return out


# --- video files (reverie.video_io) -------------------------------------------------------------------------

DEFAULT_FPS = 16  # Wan 2.1's (its examples export at 16 fps)


def _is_video(pipe) -> bool:
    return "num_frames" in pipe.family.options


def _check_out(out) -> None:
    """Before the model loads: --out is a .png image or a video path (reverie.video_io.video_format)."""
    from .video_io import video_format

    if Path(out).suffix.lower() == ".png":
        return
    try:
        video_format(out)
    except ValueError:
        raise ValueError(f"--out: images are written as PNG files with their parameters, videos as .mp4, .gif, "
                         f".webp, a folder of PNG frames or a frame_%04d.png pattern; got {out!r}") from None


def _video_out(args) -> tuple[Path, float]:
    """(path, fps) for a video model, checked before it runs: --out as given (.mp4, .gif, .webp, a folder or a
    %d .png pattern), except that a plain .png (the default out.png) becomes <stem>.mp4 where PyAV is installed,
    else <stem>.gif; --fps or DEFAULT_FPS."""
    from .video_io import PYAV_MISSING, check_fps, has_pyav, video_format

    out, fps = Path(args.out), DEFAULT_FPS if args.fps is None else args.fps
    if out.suffix.lower() == ".png" and "%" not in out.name:
        out = out.with_suffix(".mp4" if has_pyav() else ".gif")
        print(f"note: a video model: writing {out}" + ("" if has_pyav() else f" ({PYAV_MISSING})"), file=sys.stderr)
    try:
        kind = video_format(out)
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    try:
        check_fps(fps, kind)
    except ValueError as e:
        raise ValueError(f"--{e}") from None  # "--fps must be ..." / "--fps: a GIF ..."
    if kind == "mp4" and not has_pyav():
        raise ValueError(f"--out: {PYAV_MISSING}")
    return out, fps


def _save_videos(result, out: Path, fps: float) -> None:
    """Each video at out (one) or out-0, out-1, ... with its parameters (reverie.video_io.save_video)."""
    from .metadata import image_params
    from .video_io import save_video

    for i, frames in enumerate(result.frames):
        path = out if len(result.frames) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_video(frames, path, fps=fps, params=image_params(result.params, i, record_batch=True))
        print(f"wrote {path} ({len(frames)} frames at {fps:g} fps, seed {result.params['seeds'][i]})")


# --- image files with their parameters, safety options, regeneration (reverie.metadata, reverie.safety) -------


def _check_png(out) -> None:
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--out: images are written as PNG files with their parameters; got {out!r}")


def _seeds(seed, num_images: int):
    """One seed per image, counting up from `seed` (A1111's convention): each image's seed regenerates it."""
    import random

    if num_images < 2:
        return seed
    base = random.randint(0, 2**32 - num_images) if seed is None else seed
    return [base + i for i in range(num_images)]


def _save(image, result, index: int, path) -> None:
    from .metadata import image_params, save_png

    save_png(image, image_params(result.params, index, record_batch=True), path)


def _safety_option(args):
    """Pipeline.from_pretrained's safety_checker from --safety-checker (auto | none | FOLDER)."""
    return {"auto": "auto", "none": None}.get(args.safety_checker, args.safety_checker)


def _configure_safety(pipe, args) -> None:
    """Add --deny-list terms and the --nsfw-replacement to the pipeline's safety filter."""
    from .safety import SafetyFilter, read_deny_list

    deny = read_deny_list(args.deny_list) if args.deny_list else []
    checker = pipe.safety_checker.checker if pipe.safety_checker is not None else None
    if checker is not None or deny:
        pipe.safety_checker = SafetyFilter(checker, deny, replacement=args.nsfw_replacement)


def _add_speed_arguments(parser) -> None:
    parser.add_argument("--quantize", default=None, choices=["fp8", "int8-weight", "int8-dynamic"],
                        help="cheaper network weights: fp8 storage with upcast, int8 weights, or int8 weights and "
                             "activations (int8: the quant extra, torchao); see docs/speed.md")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (inductor): slower first call, faster steps after; the "
                             "server compiles during its warm-up")
    parser.add_argument("--deepcache", type=int, default=None, metavar="N",
                        help="DeepCache on a UNet: every N-th network call in full, the others through its "
                             "shallowest level (e.g. 3; 1: off)")
    parser.add_argument("--block-cache", type=float, default=None, metavar="T",
                        help="first-block caching on a diffusion transformer: skip the other blocks while the first "
                             "block's output changes by less than T (e.g. 0.1; 0: off)")


def _configure_speed(pipe, args) -> None:
    if getattr(args, "quantize", None) is not None:
        pipe.quantize(args.quantize)
    if getattr(args, "compile", False):
        pipe.compile()
    if getattr(args, "deepcache", None) is not None:
        pipe.enable_deepcache(args.deepcache)
    if getattr(args, "block_cache", None) is not None:
        pipe.enable_block_cache(args.block_cache)


def _add_safety_arguments(parser) -> None:
    parser.add_argument("--safety-checker", default="auto",
                        help="auto (on when the model folder ships one), none, or a checker folder: a "
                             "StableDiffusionSafetyChecker or a transformers image-classification model")
    parser.add_argument("--deny-list", default=None, help="text file of terms (one a line) whose prompts are flagged")
    parser.add_argument("--nsfw-replacement", default="black", choices=["black", "blur"],
                        help="what a flagged image is replaced by (default: black)")


def _load(args, model):
    import torch

    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_path(model), device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                    safety_checker=_safety_option(args))
    _configure_safety(pipe, args)
    _configure_speed(pipe, args)
    return pipe


def _regenerate(args) -> None:
    """generate --from IMAGE: the image's recorded request again (its whole batch, so the pixels match)."""
    from .metadata import generation_kwargs, model_hash, read_png_info, request_from_infotext

    _check_png(args.out)
    try:
        info = read_png_info(args.from_image)
    except ValueError as e:
        raise ValueError(f"--from: {args.from_image}: {e}") from None
    request = info["request"] or (request_from_infotext(info["parameters"]) if info["parameters"] else None)
    if request is None:
        raise ValueError(f"--from: {args.from_image} carries no generation parameters")
    kwargs, index, ignored = generation_kwargs(request)
    if ignored:
        print(f"note: not reproduced from the image: {', '.join(ignored)}", file=sys.stderr)
    model = args.model
    if model is None and request.get("model") is not None:
        try:
            model_path(request["model"])
            model = request["model"]
        except ValueError:
            raise ValueError(f"--model: the image was made with {request['model']!r}, which is neither a path nor "
                             f"a bundled model; pass --model") from None
    pipe = _load(args, model)
    if request.get("model_hash") and pipe.source is not None and model_hash(pipe.source) != request["model_hash"]:
        print(f"warning: model hash {model_hash(pipe.source)} differs from the image's {request['model_hash']}: "
              f"the image will differ", file=sys.stderr)
    kwargs["prompt"], kwargs["negative_prompt"] = _apply_loras(
        pipe, args, kwargs["prompt"], kwargs.get("negative_prompt"), request.get("loras") or (),
        request.get("embeddings") or ())
    result = pipe(**kwargs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _save(result.images[index], result, index, args.out)
    print(f"wrote {args.out} (seed {result.params['seeds'][index]})")


def _info(args) -> None:
    import json

    from .metadata import read_png_info

    info = read_png_info(args.image)
    print(info["info"] or "(no A1111 parameters)")
    print()
    print(json.dumps(info["request"], indent=2, sort_keys=True) if info["request"] else "(no reverie request)")
    for key, value in info["items"].items():
        print(f"\n{key}: {value}")


def _batch(args) -> None:
    from .batch import read_requests, run_batch

    defaults = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                    scheduler=args.scheduler, width=args.width, height=args.height, clip_skip=args.clip_skip)
    requests = read_requests(args.prompts, **defaults)  # checked before the model loads
    if args.ray is not None:
        from .batch import run_batch_ray

        model_path(args.model)  # a wrong --model fails here, not in every actor
        address = None if args.ray == "local" else args.ray
        summary = run_batch_ray(functools.partial(_load, args, args.model), requests, args.out,
                                batch_size=args.batch_size, base_seed=args.seed, address=address,
                                actors=args.ray_actors)
    else:
        summary = run_batch(_load(args, args.model), requests, args.out, batch_size=args.batch_size,
                            base_seed=args.seed)
    print(f"{summary['generated']} images generated, {summary['skipped']} already there, {summary['flagged']} "
          f"flagged; manifest: {summary['manifest']}")


def _cost(args) -> None:
    from . import cost
    from .samplers import resolve

    samplers = cost.parse_list(args.samplers, "--samplers") if args.samplers else None  # None: the model's kind
    for sampler in samplers or []:
        resolve(sampler)
    steps = cost.parse_list(args.steps, "--steps", int)
    path, pipe = model_path(args.model), None
    given = [name for name, value in (("--gpu", args.gpu), ("--eval-ms", args.eval_ms), ("--fixed-ms", args.fixed_ms))
             if value is not None]
    if args.calibration:
        calibration = cost.Calibration.load(args.calibration)
    elif given:
        if len(given) < 3:
            raise ValueError("--gpu, --eval-ms, --fixed-ms: figures for another machine need all three, measured "
                             "there (or --calibration FILE saved there with --save)")
        calibration = cost.Calibration(args.gpu, args.eval_ms / 1e3, args.fixed_ms / 1e3, args.batch_size,
                                       model=path.stem, how="given")
    else:
        pipe = _load(args, args.model)
        calibration = cost.calibrate(pipe, batch_size=args.batch_size, width=args.width, height=args.height,
                                     guidance_scale=args.guidance, repeats=args.repeats)
        if args.save:
            calibration.save(args.save)
    schedule = cost.schedule_of(path)
    rows = cost.table(calibration, schedule, samplers, steps, args.price_per_hour)
    print(cost.format_table(rows, calibration, args.price_per_hour))
    if pipe is not None and args.check:
        predicted, measured = cost.check(pipe, calibration, schedule, "heun", 10, args.guidance, args.width, args.height)
        evaluations = cost.count_evaluations("heun", 10, schedule)
        print(f"\ncheck, heun at 10 steps ({evaluations} evaluations): predicted {predicted:.3f} s, measured "
              f"{measured:.3f} s ({(measured / predicted - 1) * 100:+.1f}%)")
    if args.save and pipe is not None:
        print(f"saved the calibration to {args.save}")


def _eval(args) -> None:
    from .eval.adherence import evaluate_shapes, shapes_captions
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_path(args.model), device=args.device)
    _configure_speed(pipe, args)
    if args.lora:
        from .lora import LoraUse, parse_lora_option, read_lora

        pipe.set_loras([LoraUse(read_lora(path), te, unet) for path, te, unet in map(parse_lora_option, args.lora)])
    data = args.data or ("emoji" if args.model == "emoji" else None)
    if data == "stars":
        _eval_stars(args, pipe)
        return
    if data == "emoji":
        _eval_emoji(args, pipe)
        return
    if data == "moving_shapes":
        _eval_video(args, pipe)
        return
    if args.controlnet:
        _eval_control(args, pipe)
        return
    if args.prompt is not None:
        _eval_prompt(args, pipe)
        return
    if data is None and _is_video(pipe):  # a video model: adherence on moving-shapes captions
        _eval_video(args, pipe)
        return
    captions = shapes_captions(args.split, args.n, args.caption_seed)
    if args.sweep:
        _eval_sweep(args, pipe, captions)
        return
    prompts = None
    if args.paraphrase:
        from .eval.paraphrase import paraphrase

        prompts = [paraphrase(c, seed=args.caption_seed) for c in captions]
    if args.plot:
        from .eval.adherence import GRID_PROMPTS
        from .eval.plot import sample_grid

        sample_grid(pipe, GRID_PROMPTS, per_prompt=2, steps=args.steps, guidance_scale=args.guidance,
                    sampler=args.sampler, seed=args.seed, prompt_rows=False).save(args.plot)
        print(f"wrote {args.plot}: one column per prompt ({'; '.join(GRID_PROMPTS)}), seeds {args.seed}, "
              f"{args.seed + 1}")
    scores = evaluate_shapes(pipe, captions, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                             seed=args.seed, prompts=prompts)
    print(f"shapes adherence, {args.split} captions{', paraphrased' if prompts else ''}, {args.sampler}, "
          f"{args.steps} steps, guidance {args.guidance}:")
    for key, value in scores.items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")


def _eval_stars(args, pipe) -> None:
    """The star a LoRA teaches (reverie.data.stars): captions of a seed the LoRA run never used, read by
    score_star."""
    from .data.stars import StarsDataset, score_star
    from .eval.plot import image_grid

    data = StarsDataset(size=args.n, seed=1000 + args.caption_seed)
    captions = [data.caption(i) for i in range(args.n)]
    scores, images = [], []
    for start in range(0, len(captions), 16):
        batch = captions[start:start + 16]
        result = pipe(batch, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                      seed=[args.seed + start + i for i in range(len(batch))], progress=False)
        scores += [score_star(im, data.color(start + i)) for i, im in enumerate(result.images)]
        images += result.images[:max(0, 16 - len(images))]
    print(f"star adherence, {len(captions)} captions, {args.sampler}, {args.steps} steps, guidance "
          f"{args.guidance}:")
    for key in ("color", "shape", "fully_correct"):
        print(f"  {key:24s} {sum(s[key] for s in scores) / len(scores):.3f}")
    if args.plot:
        image_grid(images, 8).save(args.plot)
        print(f"wrote {args.plot}: the first {len(images)} images")


def _eval_prompt(args, pipe) -> None:
    """One caption at seeds --seed .. --seed + 9: which images the analyzer reads as fully correct."""
    from .eval.adherence import prompt_seeds
    from .eval.plot import image_grid

    scores, images = prompt_seeds(pipe, args.prompt, 10, steps=args.steps, guidance_scale=args.guidance,
                                  sampler=args.sampler, seed=args.seed)
    wrong = [args.seed + i for i, s in enumerate(scores) if not s["fully_correct"]]
    print(f"{args.prompt!r}, {args.sampler}, {args.steps} steps, guidance {args.guidance}: "
          f"{10 - len(wrong)} of seeds {args.seed}-{args.seed + 9} fully correct; wrong: {wrong or 'none'}")
    for i, s in enumerate(scores):
        failed = [k for k, v in s.items() if v is False and k != "fully_correct"]
        print(f"  seed {args.seed + i}: {'correct' if s['fully_correct'] else 'wrong (' + ', '.join(failed) + ')'}")
    if args.plot:
        image_grid(images, 10).save(args.plot)
        print(f"wrote {args.plot}: seeds {args.seed}-{args.seed + 9}, left to right")


def _eval_video(args, pipe) -> None:
    """Prompt adherence of a text-to-video model on moving-shapes captions, read by reverie.eval.video."""
    from .eval.video import GRID_CAPTIONS, evaluate_video, frame_grid, generate_clips, video_captions

    if not _is_video(pipe):
        raise ValueError(f"--data moving_shapes: scores video models; {pipe.family.name} makes images")
    for flag, value in (("--sweep", args.sweep), ("--prompt", args.prompt), ("--paraphrase", args.paraphrase),
                        ("--controlnet", args.controlnet)):
        if value:
            raise ValueError(f"{flag}: not available with --data moving_shapes")
    settings = dict(steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed,
                    frames=16 if args.frames is None else args.frames)
    scores = evaluate_video(pipe, video_captions(args.split, args.n, args.caption_seed), **settings)
    print(f"moving-shapes adherence, {args.split} captions, {settings['frames']} frames, {args.sampler}, "
          f"{args.steps} steps, guidance {args.guidance}:")
    for key, value in scores.items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")
    if args.plot:
        frame_grid(generate_clips(pipe, list(GRID_CAPTIONS), **settings), args.plot)
        print(f"wrote {args.plot}: one row per caption ({'; '.join(GRID_CAPTIONS)}), 8 frames each")


def _eval_emoji(args, pipe) -> None:
    from .eval.emoji import GRID_PROMPTS, evaluate_emoji
    from .eval.plot import sample_grid

    r = evaluate_emoji(pipe, n=args.n, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                       seed=args.seed)
    print(f"emoji model, {r['n']} names drawn from the data set, {args.sampler}, {args.steps} steps, guidance "
          f"{args.guidance}:")
    print(f"  FID (reverie's emoji features)        {r['fid']:.2f}   ({r['n']} training images: "
          f"{r['fid_train_subset']:.2f}, the floor at this n)")
    print(f"  nearest training image, pixel RMS   {r['nn_pixel_rms_generated']:.4f}   (training images to their "
          f"nearest other one: {r['nn_pixel_rms_train']:.4f})")
    print(f"  nearest training image, features    {r['nn_feature_generated']:.3f}   (training images: "
          f"{r['nn_feature_train']:.3f})")
    print(f"  own name's image nearest (pixels)   {r['own_top1']:.3f}   (among the 10 nearest: {r['own_top10']:.3f})")
    if args.plot:
        sample_grid(pipe, GRID_PROMPTS, per_prompt=6, steps=args.steps, guidance_scale=args.guidance,
                    sampler=args.sampler, seed=args.seed).save(args.plot)
        print(f"wrote {args.plot}: {', '.join(GRID_PROMPTS)}, one row each")


def _eval_sweep(args, pipe, captions) -> None:
    from .eval import adherence

    if args.sweep == "cfg":
        rows = adherence.cfg_sweep(pipe, captions, steps=args.steps, sampler=args.sampler, seed=args.seed)
        print(f"guidance trade-off, {args.split} captions, {args.sampler}, {args.steps} steps:")
        print("  guidance  one-object  two-object  diversity")
        for r in rows:
            print(f"  {r['guidance']:8g}  {r['one']:10.3f}  {r['two']:10.3f}  {r['diversity']:9.4f}")
        plot = adherence.plot_cfg_sweep
    else:
        rows = adherence.steps_sweep(pipe, captions, guidance_scale=args.guidance, seed=args.seed)
        print(f"adherence against steps, {args.split} captions, guidance {args.guidance}:")
        print("  sampler     steps  fully-correct  one-object  two-object  seconds")
        for r in rows:
            print(f"  {r['sampler']:10s}  {r['steps']:5d}  {r['fully_correct']:13.3f}  {r['one']:10.3f}  "
                  f"{r['two']:10.3f}  {r['seconds']:7.1f}")
        plot = adherence.plot_steps_sweep
    if args.plot:
        print(f"wrote {plot(rows, args.plot)}")


# --- ControlNet (reverie.control, reverie.eval.control) ------------------------------------------------------


def _add_control_arguments(parser, evaluating: bool = False) -> None:
    parser.add_argument("--controlnet", default=None, metavar="PATH",
                        help="a ControlNet folder (diffusers ControlNetModel layout)" +
                             ("; score how its images follow their controls" if evaluating else ""))
    if not evaluating:
        parser.add_argument("--control", default=None, metavar="IMAGE", help="the control image for --controlnet")
    parser.add_argument("--control-type", default=None,
                        help="none (the image is a control image already), canny or segmentation" + (
                            " (default: the ControlNet's recorded type, else segmentation)" if evaluating else
                            " (default: none)"))
    parser.add_argument("--control-scale", type=float, default=1.0, help="controlnet_conditioning_scale (default 1)")
    if not evaluating:
        parser.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps before it acts")
        parser.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps after which it stops")


def _control_kwargs(args) -> dict:
    """Pipeline keywords from generate's --control IMAGE --controlnet PATH and their options."""
    if args.control is None and args.controlnet is None:
        return {}
    if args.control is None or args.controlnet is None:
        raise ValueError("--control and --controlnet go together: a control image and the ControlNet that reads it")
    from .control import preprocess

    return dict(controlnet=args.controlnet, control_image=preprocess(args.control, args.control_type or "none"),
                controlnet_conditioning_scale=args.control_scale, control_guidance_start=args.control_start,
                control_guidance_end=args.control_end)


# --- img2img, inpainting, outpainting (reverie.edit) -------------------------------------------------------------


def _add_edit_arguments(parser) -> None:
    parser.add_argument("--image", default=None, metavar="IMAGE",
                        help="img2img / inpainting: the image to edit; Wan image-to-video: the first frame")
    parser.add_argument("--strength", type=float, default=None,
                        help="fraction of the steps run from the noised image: 0 keeps it, 1 ignores it "
                             "(default: 0.75, 1 with --mask or --outpaint)")
    parser.add_argument("--mask", default=None, metavar="IMAGE", help="inpainting mask for --image: white = repaint")
    parser.add_argument("--mask-blur", type=float, default=4, help="mask edge blur in pixels (default: 4)")
    parser.add_argument("--inpaint-only-masked", action="store_true",
                        help="inpaint a crop around the mask at the model's resolution, then paste it back")
    parser.add_argument("--inpaint-padding", type=int, default=32, help="pixels around the mask in that crop "
                                                                        "(default: 32)")
    parser.add_argument("--fill", default="original", help="masked area starts from: original, fill (colours from "
                                                           "around it), 'latent noise', 'latent nothing'")
    parser.add_argument("--outpaint", default=None, metavar="L,R,T,B",
                        help="extend --image by these many pixels left, right, top and bottom, and paint them")


def _edit_kwargs(args, pipe) -> dict:
    """Pipeline keywords from generate's --image, --mask, --outpaint and their options."""
    if args.image is None:
        for flag, value in (("--mask", args.mask), ("--outpaint", args.outpaint), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{flag} needs --image")
        return {}
    from .edit import outpaint

    image, mask = args.image, args.mask
    if args.outpaint is not None:
        if mask is not None:
            raise ValueError("--outpaint makes its own mask; do not pass --mask")
        try:
            left, right, top, bottom = (int(v) for v in args.outpaint.split(","))
        except ValueError:
            raise ValueError(f"--outpaint must be four integers LEFT,RIGHT,TOP,BOTTOM; got {args.outpaint!r}") from None
        image, mask = outpaint(image, left, right, top, bottom, multiple=pipe.downsample_factor, field="--outpaint")
    return dict(image=image, mask_image=mask, strength=args.strength, mask_blur=args.mask_blur,
                inpaint_only_masked=args.inpaint_only_masked, inpaint_padding=args.inpaint_padding, fill=args.fill)


def _eval_control(args, pipe) -> None:
    from .eval.control import evaluate_control
    from .formats.folder import read_json
    from .loading import controlnet_folder

    folder = controlnet_folder(args.controlnet)
    control_type = args.control_type or read_json(folder / "config.json").get("_control_type", "segmentation")
    scores = evaluate_control(pipe, folder, control_type=control_type, split=args.split, n=args.n,
                              scenes_seed=args.caption_seed, steps=args.steps, guidance_scale=args.guidance,
                              sampler=args.sampler, seed=args.seed, conditioning_scale=args.control_scale,
                              grid=args.plot)
    print(f"control adherence ({control_type}), {args.split} scenes, {args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance}, control scale {args.control_scale}:")
    for key, value in scores.items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")


def _samplers(args) -> None:
    from .samplers import SAMPLERS

    for name, fn in SAMPLERS.items():
        print(f"{name:16s} {(fn.__doc__ or '').splitlines()[0]}")


def _prompt(args) -> None:
    from .prompt_syntax import describe, parse

    print(describe(parse(args.prompt, args.steps)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reverie", description="Diffusion models built for real.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write a PNG of the forward and reverse diffusion process")
    demo.add_argument("--out", default="demo.png", help="output PNG path (default: demo.png)")
    demo.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--sampler", default="DPM++ 2M Karras", help="any name reverie.samplers.resolve accepts")
    demo.set_defaults(run=_demo)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (not with --from)")
    gen.add_argument("--from", dest="from_image", default=None, metavar="IMAGE",
                     help="regenerate the image from the parameters in its PNG (the same pixels, on the same "
                          "device and dtype); --model, --device, --dtype, --out apply, the other options do not")
    gen.add_argument("--model", help="a bundled model's name (shapes, the default, or emoji), a diffusers folder or a "
                                     "single-file .safetensors checkpoint")
    gen.add_argument("--fast", action="store_true", help="the model's few-step version: a bundled model's "
                     "latent consistency distillation (NAME-lcm; 4 steps of the lcm sampler)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:UNET]]",
                     help="a LoRA / LyCORIS .safetensors (kohya / A1111 or diffusers / PEFT) merged at strength W "
                          "(default 1), or W for the text encoders and UNET for the UNet / transformer; repeatable")
    gen.add_argument("--prompt-syntax", default=None, choices=["a1111", "no_norm", "comfy"],
                     help="read A1111's emphasis, (word:1.3), [word], escapes and BREAK (SD 1/2): a1111 (multiply, "
                          "restore the mean), no_norm (multiply only) or comfy (ComfyUI's interpolation)")
    gen.add_argument("--hires-scale", type=float, default=None, metavar="S",
                     help="A1111's hires fix: a second, img2img pass at S times the size (e.g. 2)")
    gen.add_argument("--hires-upscaler", default="Latent", help="Latent, Latent (antialiased), Latent (bicubic), "
                     "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), Lanczos or Nearest")
    gen.add_argument("--hires-steps", type=int, default=0, help="steps of the hires pass (0: as the first)")
    gen.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the hires pass")
    gen.add_argument("--subseed", type=int, default=None, help="A1111's variation seed")
    gen.add_argument("--subseed-strength", type=float, default=0.0,
                     help="how far the start noise moves towards the variation seed's (0-1)")
    gen.add_argument("--tiling", action="store_true", help="seamless, tileable images (circular padding)")
    gen.add_argument("--freeu", default=None, metavar="S1,S2,B1,B2",
                     help="FreeU on the UNet, e.g. 0.9,0.2,1.5,1.6 (SD 1.x) or 0.9,0.2,1.3,1.4 (SDXL)")
    gen.add_argument("--embedding", action="append", default=[], metavar="FILE_OR_DIR",
                     help="textual-inversion embeddings (A1111 / kohya / diffusers / SDXL files, or a folder of "
                          "them), used where a prompt or negative prompt names them (the file's stem); repeatable")
    gen.add_argument("--lora-dir", default=None, metavar="DIR",
                     help="where the prompt's <lora:name:weight> tags find their files (NAME.safetensors)")
    gen.add_argument("--steps", type=int, default=None, help="default: the model family's (SD 30, SD3/FLUX dev 28, "
                     "FLUX schnell 4, DiT 50)")
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's: SD 7.5, "
                     "SD3 7, FLUX dev 3.5 distilled, DiT 4)")
    gen.add_argument("--sampler", default=None, help="any name reverie.samplers.resolve accepts (default: SD "
                     "dpmpp_2m, otherwise the model's own scheduler)")
    gen.add_argument("--scheduler", default=None, help="schedule type: karras, exponential, normal, automatic; flow "
                     "models also simple, sgm_uniform, beta")
    gen.add_argument("--shift", type=float, default=None, help="flow models: the schedule's shift (ComfyUI's "
                     "ModelSamplingSD3 shift; default: the model's)")
    gen.add_argument("--true-cfg", type=float, default=None, help="FLUX: classifier-free guidance scale with "
                     "--negative (true_cfg_scale; distilled --guidance still applies)")
    gen.add_argument("--max-sequence-length", type=int, default=None, help="SD3/FLUX: T5 tokens (SD3 256, FLUX 512)")
    gen.add_argument("--skip-layers", default=None, metavar="7,8,9", help="SD3.5: skip-layer guidance blocks")
    gen.add_argument("--text-encoder", default=None, help="single files: CLIP-L (file or folder)")
    gen.add_argument("--text-encoder-2", default=None, help="single files: CLIP-G (SD3) or T5 (FLUX)")
    gen.add_argument("--text-encoder-3", default=None, help="single files: T5 (SD3)")
    gen.add_argument("--vae", default=None, help="a VAE file or folder to use instead of the model's")
    gen.add_argument("--config", default=None, help="single files: a diffusers folder of the same family for configs, "
                     "tokenizers and what the file lacks")
    gen.add_argument("--variant", default=None, help="diffusers folders: weights variant (fp16, bf16)")
    gen.add_argument("--refiner", default=None, metavar="MODEL", help="a second model (e.g. the SDXL refiner) that "
                     "finishes the last part of the schedule from the first one's latents (A1111's refiner)")
    gen.add_argument("--refiner-switch-at", type=float, default=0.8, help="with --refiner: the fraction of the "
                     "schedule after which it takes over (A1111's 'Refiner switch at'; default 0.8)")
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--clip-skip", type=int, default=None, help="CLIP layers to skip (A1111's 'Clip skip 2' = 1)")
    gen.add_argument("--out", default="out.png", help="a .png image; video models: clip.mp4, clip.gif, clip.webp, "
                     "a folder of PNG frames or clip/frame_%%04d.png (default: out.mp4 with PyAV, else out.gif)")
    gen.add_argument("--frames", type=int, default=None, help="video models: frames (Wan: 1 + 4k, default 81; "
                     "reverie's moving-shapes: up to 16, default 16)")
    gen.add_argument("--fps", type=float, default=None, help=f"video models: frames per second of the file "
                     f"(default: {DEFAULT_FPS}, Wan 2.1's)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    gen.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file checkpoints have none)")
    gen.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"])
    gen.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (can run code!)")
    gen.add_argument("--attention-slicing", action="store_true", help="less memory, a little slower")
    gen.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    gen.add_argument("--offload", action="store_true", help="keep models on the CPU until each is needed")
    _add_safety_arguments(gen)
    _add_speed_arguments(gen)
    _add_control_arguments(gen)
    _add_edit_arguments(gen)
    gen.set_defaults(run=_generate)

    add_train_parser(sub)

    ev = sub.add_parser("eval", help="score a shapes model's prompt adherence with the shapes analyzer, a video "
                                     "model's on moving shapes, or an emoji model's FID and nearest training images")
    ev.add_argument("--model", help="a bundled model's name (shapes, the default, or emoji) or a model folder")
    ev.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:UNET]]",
                    help="score with this LoRA merged (repeatable)")
    ev.add_argument("--data", choices=["shapes", "moving_shapes", "stars", "emoji"], default=None,
                    help="shapes: prompt adherence read by the shapes analyzer; moving_shapes: a video model's, read "
                         "by the clip analyzer; stars: the star shape a LoRA teaches (reverie.data.stars); "
                         "emoji: FID, nearest training images and (with --plot) a sample grid "
                         "(default: emoji for --model emoji, moving_shapes for a video model, else shapes)")
    ev.add_argument("--frames", type=int, default=None, help="moving_shapes: frames per clip (default: 16; Wan "
                                                             "models take 1 + 4k, e.g. 17)")
    ev.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ev.add_argument("--n", type=int, default=200, help="number of captions (default: 200)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=7.5)
    ev.add_argument("--sampler", default="dpmpp_2m")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--caption-seed", type=int, default=1)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--sweep", choices=["cfg", "steps"], default=None,
                    help="cfg: adherence and diversity at guidance 1, 2, 4, 7.5, 12, 20; "
                         "steps: adherence against steps for ddim, euler, dpmpp_2m, unipc")
    ev.add_argument("--plot", default=None, help="with --sweep: write the plot to this PNG; with --controlnet: a "
                                                 "grid of 8 controls above their images; otherwise a grid of "
                                                 "samples of common prompts")
    ev.add_argument("--prompt", default=None, help="score this one caption at seeds --seed .. --seed + 9 (with "
                                                   "--plot: a row of the ten images)")
    ev.add_argument("--paraphrase", action="store_true",
                    help="generate from paraphrases of the captions ('a crimson disk' for 'a red circle'), score "
                         "against the captions: how well the text encoder follows unseen wording")
    _add_control_arguments(ev, evaluating=True)
    _add_speed_arguments(ev)
    ev.set_defaults(run=_eval)

    samplers = sub.add_parser("samplers", help="list the samplers")
    samplers.set_defaults(run=_samplers)
    prompt = sub.add_parser("prompt", help="show how A1111's prompt syntax reads PROMPT: the schedule over the steps, "
                                           "the weighted pieces, the AND parts and the LoRA tags")
    prompt.add_argument("prompt")
    prompt.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    prompt.set_defaults(run=_prompt)
    _add_output_parsers(sub)
    _add_serve_parser(sub)
    _add_worker_parser(sub)
    return parser


# --- the generation server (reverie.server) ------------------------------------------------------------------


def _add_serve_parser(sub) -> None:
    """Command `serve`."""
    from .server.cli import add_arguments

    serve = sub.add_parser("serve", help="serve generation over HTTP: OpenAI images API, A1111 /sdapi/v1, async "
                                         "jobs with progress events, the playground at /")
    serve.add_argument("--model", help="a bundled model's name (shapes, the default, or emoji) or a model path")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    serve.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    _add_safety_arguments(serve)
    _add_speed_arguments(serve)
    add_arguments(serve)
    serve.set_defaults(run=_serve)


def _serve(args) -> None:
    from .server.cli import serve

    path = model_path(args.model)  # checked now: a wrong --model fails before the port opens
    serve(args, {path.stem: lambda: _load(args, args.model)})


def _add_worker_parser(sub) -> None:
    """Command `worker`."""
    from .server.cli import add_arguments

    worker = sub.add_parser("worker", help="run jobs from a shared PostgreSQL queue (reverie serve --store) without "
                                           "an HTTP API; /health and /metrics on --port")
    worker.add_argument("--model", action="append", default=None,
                        help="a model this worker holds (repeatable; the first is the default): a bundled model's "
                             "name (shapes, the default, or emoji) or a model path")
    worker.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    worker.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    _add_safety_arguments(worker)
    _add_speed_arguments(worker)
    add_arguments(worker, worker=True)
    worker.set_defaults(run=_worker)


def _worker(args) -> None:
    from .server.cli import serve

    models = {}
    for model in args.model or [None]:
        path = model_path(model)
        if path.stem in models:
            raise ValueError(f"--model: {model!r} is given twice (as {path.stem!r})")
        models[path.stem] = lambda model=model: _load(args, model)
    serve(args, models, role="worker")


def _add_output_parsers(sub) -> None:
    """Commands `info`, `batch` and `cost`."""
    info = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image")
    info.set_defaults(run=_info)

    batch = sub.add_parser("batch", help="generate every prompt of a .txt (one a line) or .jsonl (one request a line) "
                                         "file; rerun to finish an interrupted batch")
    batch.add_argument("prompts", help="PROMPTS.txt or PROMPTS.jsonl (fields: prompt, negative_prompt, seed, steps, "
                                       "guidance_scale, guidance_rescale, sampler, scheduler, width, height, "
                                       "clip_skip, n)")
    batch.add_argument("--out", default="batch", help="output folder (default: batch)")
    batch.add_argument("--model", help="a bundled model's name (shapes, the default, or emoji) or a model path")
    batch.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    batch.add_argument("--seed", type=int, default=0, help="base seed for requests without one: image k gets seed+k")
    batch.add_argument("--negative", default=None, help="default negative prompt")
    batch.add_argument("--steps", type=int, default=None, help="default: the model family's (SD: 30)")
    batch.add_argument("--guidance", type=float, default=None, help="default: the model family's (SD: 7.5)")
    batch.add_argument("--sampler", default=None, help="default: SD dpmpp_2m, otherwise the model's own scheduler")
    batch.add_argument("--scheduler", default=None)
    batch.add_argument("--width", type=int, default=None)
    batch.add_argument("--height", type=int, default=None)
    batch.add_argument("--clip-skip", type=int, default=None)
    batch.add_argument("--device", default="cpu")
    batch.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    batch.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="spread the batch over a Ray cluster's actors: ADDRESS auto or ray://HOST:10001, or none "
                            "for a local Ray instance ($RAY_ADDRESS if set); needs the ray extra")
    batch.add_argument("--ray-actors", type=int, default=None,
                       help="actors, each holding the pipeline (default: one per GPU, else one per two CPUs)")
    _add_safety_arguments(batch)
    _add_speed_arguments(batch)
    batch.set_defaults(run=_batch)

    cost = sub.add_parser("cost", help="measure this machine's throughput and print latency, images per hour and "
                                       "cost per 1,000 images per sampler and step count")
    cost.add_argument("--model", help="a bundled model's name (shapes, the default, or emoji) or a model path")
    cost.add_argument("--price-per-hour", type=float, default=None, help="price of the machine per hour")
    cost.add_argument("--samplers", default=None, help="comma-separated (default: every DDPM sampler)")
    cost.add_argument("--steps", default="5,10,20,30,50", help="comma-separated step counts")
    cost.add_argument("--batch-size", type=int, default=1, help="images per generation (default: 1)")
    cost.add_argument("--guidance", type=float, default=7.5, help="guidance scale measured with (default: 7.5)")
    cost.add_argument("--width", type=int, default=None)
    cost.add_argument("--height", type=int, default=None)
    cost.add_argument("--repeats", type=int, default=3, help="timed runs per calibration point (median)")
    cost.add_argument("--device", default="cpu")
    cost.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    cost.add_argument("--save", default=None, metavar="FILE", help="save the measured figures (JSON)")
    cost.add_argument("--calibration", default=None, metavar="FILE",
                      help="figures saved with --save on another machine, instead of measuring here")
    cost.add_argument("--gpu", default=None, metavar="NAME", help="another machine's name, with its --eval-ms, "
                                                                  "--fixed-ms (measured there) and --price-per-hour")
    cost.add_argument("--eval-ms", type=float, default=None, help="milliseconds per evaluation on --gpu")
    cost.add_argument("--fixed-ms", type=float, default=None, help="fixed milliseconds per generation on --gpu")
    cost.add_argument("--no-check", dest="check", action="store_false",
                      help="skip the end-to-end check of a prediction (heun, 10 steps)")
    _add_safety_arguments(cost)
    cost.set_defaults(run=_cost)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # routes --section.key=value overrides to `train`
    try:
        args.run(args)
    except ValueError as e:
        print(f"reverie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
