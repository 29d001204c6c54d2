"""`reverie serve` and `reverie worker`: the engine and the HTTP app under uvicorn, with JSON logs and a graceful
shutdown.

`reverie serve` is one process with the HTTP front end and the engine, its jobs in SQLite (the default) or on a
shared PostgreSQL queue (--store postgresql://...; reverie.server.shared), where `--no-engine` makes it a front end
only and `reverie worker` runs an engine without the API (its /health and /metrics on --port).

It binds to 127.0.0.1 by default. Bound to any other address it refuses to start without an API key
(--api-key or $REVERIE_API_KEY), which clients send as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import ipaddress
import logging
import os

API_KEY_ENV = "REVERIE_API_KEY"


def add_arguments(parser, *, worker: bool = False) -> None:
    """The server's options (the model options live with the `serve` and `worker` commands in reverie.cli)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine "
                                                            "only); any other needs an API key")
    parser.add_argument("--port", type=int, default=7870 if worker else 7860,
                        help="the worker's /health and /metrics" if worker else None)
    parser.add_argument("--api-key", default=None, help=f"key clients send as a bearer token (default: ${API_KEY_ENV})")
    parser.add_argument("--out", default="outputs/server",
                        help="result-file cache" if worker else "job store (SQLite) and result images; with --store: "
                                                                 "a cache of result files")
    parser.add_argument("--store", default=None, required=worker, metavar="postgresql://USER@HOST:PORT/DB",
                        help="a shared PostgreSQL job queue for several front ends and workers" +
                             ("" if worker else " (default: SQLite in --out, this process alone)"))
    if not worker:
        parser.add_argument("--no-engine", action="store_true",
                            help="with --store: an HTTP front end only; `reverie worker`s run the jobs")
    parser.add_argument("--worker-id", default=None, help="this process's name on the shared queue (default: "
                                                          "host-pid-random)")
    parser.add_argument("--lease", type=float, default=30.0,
                        help="seconds a claimed job stays this worker's without renewal (default: 30)")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between looks at the shared queue")
    parser.add_argument("--controlnet", action="append", default=[], metavar="NAME=FOLDER",
                        help="a ControlNet requests can pick by control_type (repeatable; default: the model's "
                             "bundled ones, e.g. shapes-segmentation as segmentation)")
    parser.add_argument("--lora-dir", default=None, metavar="DIR",
                        help="LoRA files requests name with <lora:name:weight> in their prompt (listed at "
                             "/sdapi/v1/loras)")
    parser.add_argument("--max-queue", type=int, default=64, help="queued jobs before 429 (default: 64)")
    parser.add_argument("--max-batch", type=int, default=8, help="images per forward pass; 1 turns batching off")
    parser.add_argument("--batch-window", type=float, default=0.1,
                        help="seconds the oldest job may wait for the last batch's clients to come back (default: 0.1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of a job, queue wait included")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds running work gets to finish at shutdown")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if api_key:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"--host {host}: binding to an address other than 127.0.0.1 needs an API key "
                         f"(--api-key or ${API_KEY_ENV}); clients then send it as 'Authorization: Bearer <key>'")


def serve(args, models: dict, *, role: str = "serve") -> None:
    """Run the server until SIGINT / SIGTERM. models: name -> load() returning the Pipeline (the first is the
    default); the engine calls them in its thread, so the port answers (live, not ready) while they load.
    role: "serve" or "worker" (reverie.server.shared.ROLES; `--no-engine` makes a serve a "frontend")."""
    import uvicorn

    from .app import create_app
    from .engine import Engine
    from .logs import configure_logging

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key)
    name = next(iter(models))
    controlnets = {}
    if not args.controlnet:  # the model's bundled ControlNets ("shapes-segmentation" for "shapes"), by control type
        from ..loading import bundled_controlnets

        controlnets = {c.removeprefix(f"{name}-"): c for c in bundled_controlnets() if c.startswith(f"{name}-")}
    for item in args.controlnet:
        key, sep, folder = item.partition("=")
        if not sep or not key or not folder:
            raise ValueError(f"--controlnet must be NAME=FOLDER; got {item!r}")
        controlnets[key] = folder
    configure_logging(args.log_level)
    options = dict(controlnets=controlnets, max_queue=args.max_queue, max_batch=args.max_batch,
                   batch_window_s=args.batch_window, timeout_s=args.timeout, lora_dir=args.lora_dir)
    if getattr(args, "no_engine", False) and args.store is None:
        raise ValueError("--no-engine needs --store postgresql://...: a front end alone has nobody to run its jobs")
    if args.store is None:
        engine = Engine(models, args.out, **options).start()
    else:
        from .shared import SharedEngine

        if getattr(args, "no_engine", False):
            role, models, options["default_model"] = "frontend", {}, name
        engine = SharedEngine(models, args.store, role=role, out_dir=args.out, worker_id=args.worker_id,
                              lease_s=args.lease, poll_s=args.poll, **options).start()
    app = create_app(engine, api_key=api_key, api=role != "worker")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=True,
                            timeout_graceful_shutdown=args.grace)
    server = _server(config, engine, args.grace)
    logging.getLogger("reverie.server").info("serving", extra={"host": args.host, "port": args.port, "role": role,
                                                               "models": list(models) or [name],
                                                               "store": "sqlite" if args.store is None else "postgresql",
                                                               "auth": api_key is not None})
    try:
        server.run()
    finally:
        engine.close(grace_s=args.grace)


def _server(config, engine, grace_s: float):
    """uvicorn's server, telling the engine to stop accepting the moment a signal arrives (readiness goes false,
    new jobs get 503); once open requests have drained, the running batch finishes (up to grace_s) and queued
    jobs stay in the store for the next start. Then uvicorn re-raises the signal, as it always does."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_accepting()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            await asyncio.to_thread(engine.close, grace_s)

    return Server(config)
