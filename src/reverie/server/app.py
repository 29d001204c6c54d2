"""The HTTP application: `create_app(engine)` puts the API dialects (OpenAI images and videos, A1111, reverie's
jobs), probes and metrics in front of an Engine.

Handlers only validate input and talk to the engine. Every error is JSON `{"detail": ...}` naming the field:
422 for bad input (over a limit included), 429 + Retry-After when the queue is full, 503 while models load or
the server shuts down, 401 without the API key (when one is set; the health probes and the playground page
stay open).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import a1111, jobs, openai, videos
from .engine import Engine
from .job import FieldError, Rejected
from .metrics import CONTENT_TYPE
from .schemas import Limits

log = logging.getLogger("reverie.server")
OPEN_PATHS = ("/health/live", "/health/ready", "/")  # no key needed (probes, the playground page)
OPEN_PREFIXES = ("/playground/static/",)


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits = Limits(), api: bool = True) -> FastAPI:
    """A FastAPI app serving `engine` (started and closed by the caller). api_key: clients must send
    `Authorization: Bearer <api_key>`. api=False: the probes and metrics alone (a shared queue's worker)."""
    app = FastAPI(title="reverie", version=__version__,
                  description="Image and video generation: OpenAI images and videos APIs, A1111 /sdapi/v1, and "
                              "reverie's async jobs.")
    app.state.engine = engine  # the playground's schedule views read the served models
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=engine.metrics)

    @app.exception_handler(FieldError)
    async def field_error(request, e: FieldError):
        engine.metrics.inc("rejections_total", reason="invalid")
        return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]}, 422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        engine.metrics.inc("rejections_total", reason="invalid")
        detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]  # the input is not echoed back: it may be megabytes of base64
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(Rejected)
    async def rejected(request, e: Rejected):
        return JSONResponse({"detail": e.reason}, e.status, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"detail": e.detail}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        engine.metrics.inc("errors_total", kind=type(e).__name__)
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse({"detail": "internal server error"}, 500)

    @app.get("/health/live", tags=["operations"])
    def live() -> dict:
        """Answers while the server's event loop runs."""
        return {"status": "live"}

    @app.get("/health/ready", tags=["operations"], responses={503: {"description": "not ready"}})
    def ready():
        """200 once the models are loaded and warmed up and jobs are accepted; 503 before and during shutdown."""
        if engine.ready:
            return {"status": "ready", "models": engine.model_names(), "queue_depth": engine.queue_depth()}
        detail = f"model loading failed: {engine.load_error}" if engine.load_error else "not ready"
        return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus metrics: queue depth, batch sizes, step latency, images, errors, rejections."""
        return PlainTextResponse(engine.metrics.render(), media_type=CONTENT_TYPE)

    if not api:
        return app
    for dialect in (openai, a1111, jobs, videos):
        app.include_router(dialect.router(engine, limits))
    try:
        from .playground import router as playground
    except ImportError:
        playground = None
    if playground is not None:
        app.include_router(playground)
    return app


class _Guard:
    """ASGI middleware: the API key, the request size limit (422 naming the body), and a response counter."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            path = scope["path"]
            if self.api_key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) \
                    and not self._authorized(headers.get("authorization", "")):
                self.metrics.inc("rejections_total", reason="unauthorized")
                return await _send_json(counted, 401, {"detail": "authorization: this server needs an API key, sent "
                                                                 "as 'Authorization: Bearer <key>'"},
                                        [(b"www-authenticate", b"Bearer")])
            too_large = {"detail": [{"loc": ["body"], "msg": f"the request body must be at most {self.max_body} "
                                                             f"bytes", "type": "too_large"}]}
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                self.metrics.inc("rejections_total", reason="too_large")
                return await _send_json(counted, 422, too_large)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, more = b"", True
                while more:  # read it all here, so a body without Content-Length is bounded too
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        self.metrics.inc("rejections_total", reason="too_large")
                        return await _send_json(counted, 422, too_large)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted)
        finally:
            self.metrics.inc("http_requests_total", code=str(status))

    def _authorized(self, header: str) -> bool:
        return hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode())


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then waits on the client (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, content: dict, headers: list | None = None) -> None:
    response = JSONResponse(content, status)
    await send({"type": "http.response.start", "status": status,
                "headers": response.raw_headers + (headers or [])})
    await send({"type": "http.response.body", "body": response.body})
