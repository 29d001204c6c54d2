"""The generation server: an Engine (models, bounded queue, batcher) behind three HTTP dialects.

    engine = Engine({"shapes": Pipeline.from_pretrained(path)}, "outputs").start()
    app = create_app(engine, api_key=None)        # FastAPI; run it with uvicorn (or `reverie serve`)
"""

from .app import create_app
from .engine import Engine
from .job import FieldError, Job, Rejected, Request
from .schemas import Limits

__all__ = ["Engine", "FieldError", "Job", "Limits", "Rejected", "Request", "create_app"]
