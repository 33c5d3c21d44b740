"""The web app of ``capkit demo``: the demo page, ``POST /caption`` and ``GET /health`` on one FastAPI server.

The page is a client of ``/caption`` like any other (it asks for the attention maps and draws them), so what the
browser test sees is what API users get.

    POST /caption?beam_size=3&length_penalty=0&max_len=20&no_repeat_ngram_size=3&suppress_unk=true&n_best=3
                 &attention=true
        body: the image file (any Content-Type but multipart), or multipart/form-data with the field ``image``
        200: {"caption", "score", "words", "n_best": [{"caption", "score"}], "decoding", "image_size",
              "attention": {"grid": [H, W], "region": [x0, y0, x1, y1], "maps": (T + 1) x H x W}}  (when asked)
        4xx/503: {"error": "one line: what is wrong and what to do"}
"""
from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from capkit.data.images import open_image
from capkit.errors import CorruptImageError
from capkit.pretrained.model import CaptionResult, TrainedCaptioner
from capkit.serve.batcher import CaptionBatcher, ServerBusyError
from capkit.serve.settings import ServeSettings

__all__ = ["create_app", "RequestError"]

log = logging.getLogger(__name__)

CAPTION_PARAMETERS = {"beam_size", "max_len", "length_penalty", "no_repeat_ngram_size", "suppress_unk", "n_best",
                      "attention"}
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and part headers around an upload of the limit's size


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(model: TrainedCaptioner, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The app serving ``model``: the page at ``/``, ``POST /caption``, ``GET /health``."""
    batcher = CaptionBatcher(model, max_batch=settings.max_batch, max_wait=settings.max_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="capkit", summary="Image captioning with visual attention", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.settings = settings
    page = resources.files("capkit.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{err.detail}: {request.method} {request.url.path}"}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "architecture": model.architecture,
                "decoding": model.decoding, "max_beam": settings.max_beam,
                "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait * 1000},
                "stats": asdict(batcher.stats)}

    @app.post("/caption")
    async def caption(
        request: Request,
        beam_size: int | None = Query(None, ge=1, le=settings.max_beam, description="default: the model's"),
        max_len: int | None = Query(None, ge=1, le=settings.max_len, description="default: the model's"),
        length_penalty: float | None = Query(None, ge=-10, le=10, description="default: the model's"),
        no_repeat_ngram_size: int | None = Query(None, ge=0, le=settings.max_len,
                                                 description="n > 0: no caption repeats one of its n-grams; "
                                                             "default: the model's"),
        suppress_unk: bool | None = Query(None, description="never write <unk> (the text would drop it); "
                                                            "default: the model's"),
        n_best: int = Query(1, ge=1, le=settings.max_beam, description="captions to return, best first"),
        attention: bool = Query(False, description="return each word's attention map"),
    ) -> dict[str, Any]:
        unknown = sorted(set(request.query_params) - CAPTION_PARAMETERS)
        if unknown:  # a misspelt setting would otherwise be ignored, and the caption made with the default
            raise RequestError(422, f"unknown parameter {unknown[0]!r}; the parameters are "
                                    f"{', '.join(sorted(CAPTION_PARAMETERS))}")
        decoding = model.decoding_with(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                       no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
        if n_best > decoding["beam_size"]:
            raise RequestError(422, f"n_best={n_best} is more than the beam size {decoding['beam_size']}: a beam "
                                    f"search keeps that many captions; raise beam_size")
        data, name = await read_upload(request, settings.max_upload_bytes)
        picture, inputs = await run_in_threadpool(prepare, model, data, name, settings.max_pixels)
        try:
            result = await asyncio.wait_for(batcher.caption(picture, inputs, {**decoding, "n_best": n_best}),
                                            settings.timeout)
        except ServerBusyError as err:
            raise RequestError(503, f"the server is busy: {err}") from err
        except asyncio.TimeoutError as err:
            raise RequestError(503, f"no caption within the server's limit of {settings.timeout:g} s (it is "
                                    f"busy); try again shortly") from err
        return to_json(result, decoding, n_best=n_best, attention=attention)

    return app


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and name: the request body, or the multipart field ``image`` (or ``file``).
    A body over ``limit`` bytes is refused from its Content-Length, before it is read, or as it streams in."""
    length = request.headers.get("content-length")
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    if length is not None and length.isdigit() and int(length) > limit + (MULTIPART_OVERHEAD if multipart else 0):
        raise RequestError(413, f"the upload is {int(length):,} bytes, over this server's limit of {limit:,}; send "
                                f"a smaller image")
    if multipart:
        if length is None:  # a chunked form would be spooled whole before its size is known
            raise RequestError(411, "a multipart upload needs a Content-Length header")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except (MultiPartException, StarletteHTTPException) as err:  # too many parts; a malformed body
            detail = err.message if isinstance(err, MultiPartException) else err.detail
            raise RequestError(400, f"the multipart form cannot be read ({detail}); send one file in the field "
                                    f"'image'") from err
        upload = form.get("image", form.get("file"))
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "the form has no file field 'image': send the image as "
                                    "multipart/form-data field 'image', or as the request body")
        data, name = await upload.read(limit + 1), upload.filename or "the upload"
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the upload is over this server's limit of {limit:,} bytes; send a smaller "
                                        f"image")
            chunks.append(chunk)
        data, name = b"".join(chunks), "the upload"
    if len(data) > limit:
        raise RequestError(413, f"{name} is over this server's limit of {limit:,} bytes; send a smaller image")
    if not data:
        raise RequestError(400, f"{name} is empty (0 bytes): send an image file")
    return data, name


def prepare(model: TrainedCaptioner, data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, torch.Tensor]:
    """The uploaded picture (RGB) and its (3, H, W) model input; a file that is no image, a damaged one or one of
    too many pixels (a decompression bomb) is a ``RequestError``."""
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as header:  # reads the header only: the pixel count comes before any decoding
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RequestError(415, f"{name} is not an image this server can read: send a JPEG, PNG, WebP, BMP, GIF or "
                                f"TIFF file") from err
    if width * height > max_pixels:
        raise RequestError(413, f"{name} has {width} x {height} pixels, over this server's limit of "
                                f"{max_pixels:,}; send a smaller image")
    buffer.seek(0)
    try:
        picture = open_image(buffer, max_pixels=max_pixels)
    except CorruptImageError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise RequestError(400, f"{name} is damaged or cut short ({cause}); send the whole file") from err
    return picture, model.transform(picture)


def to_json(result: CaptionResult, decoding: dict[str, Any], *, n_best: int, attention: bool) -> dict[str, Any]:
    """The response of ``POST /caption``."""
    body: dict[str, Any] = {
        "caption": result.caption,
        "score": result.score,
        "words": result.words,
        "n_best": [{"caption": c, "score": s} for c, s in result.n_best] if n_best > 1 else
                  [{"caption": result.caption, "score": result.score}],
        "decoding": decoding,
        "image_size": list(result.image.size),
    }
    if attention:
        body["attention"] = {
            "grid": list(result.grid),
            "region": [round(v, 2) for v in result.region],
            "maps": result.attention.float().round(decimals=5).tolist(),  # (T + 1, H, W)
        }
    return body
