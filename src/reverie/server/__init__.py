"""The generation server: an Engine (models, bounded queue, batcher) behind three HTTP dialects.

    engine = Engine({"shapes": Pipeline.from_pretrained(path)}, "outputs").start()
    app = create_app(engine, api_key=None)        # FastAPI; run it with uvicorn (or `reverie serve`)
"""

import importlib

# name -> submodule, imported on first use: `reverie generate`, `reverie train` and `reverie eval` build their
# argument parser from reverie.server.cli and must not need the HTTP stack (FastAPI, pydantic) to run
_EXPORTS = {"create_app": "app", "Engine": "engine", "FieldError": "job", "Job": "job", "Rejected": "job",
            "Request": "job", "Limits": "schemas"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
