"""Serving a trained model: the demo page and the HTTP endpoint of ``capkit demo``.

``capkit.serve.app.create_app(model, ServeSettings(...))`` builds the FastAPI app; ``capkit.serve.batcher``
batches concurrent requests into one beam search; ``capkit.serve.server`` binds and runs it. Those need the
``serve`` extra (FastAPI, uvicorn); this package's own import does not.
"""
from capkit.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
