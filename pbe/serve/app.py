"""The HTTP API of ``pbe serve`` (FastAPI): the page, health, the options schema and ``POST /api/paint``.

``POST /api/paint`` refuses what it can before anything queues, cheapest first: a missing or wrong token (401), a
declared size over the limit (413), a full queue (503 with Retry-After, before the uploads are read), then, reading
the body in memory and counting it (413), the form and its options (422, the field named as the form names it), the
pictures (415 not an accepted type, 422 corrupt, too many pixels, a mask of another size). The painting then runs on
the one worker thread (``pbe.serve.painter``); the answer is a PNG, or with ``Accept: text/event-stream`` a stream of
events. A client that goes away cancels its painting at the next step, or drops it from the queue. The page
(``static/``) uses only this API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import os
import shlex
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from .. import __version__
from ..checkpoint import DTYPES
from ..options import ModelOptions, OptionError, PaintOptions
from ..schedulers import SCHEDULERS, make_scheduler
from . import uploads
from .limits import Limits
from .painter import Job, Painter, QueueFull
from .uploads import PICTURE_FIELDS, Refused

STATIC = Path(__file__).resolve().parent / "static"
SEED_RANGE = 2**64  # seeds are 0 .. 2**64 - 1, as torch.Generator.manual_seed takes them and `pbe paint --seed`


def create_app(pipe: Callable[..., Any], *, model: ModelOptions | None = None, limits: Limits = Limits(),
               token: str | None = None) -> FastAPI:
    """The ``pbe serve`` application around ``pipe`` (called like ``PaintByExample.__call__``, one painting at a
    time on a worker thread of its own).

    ``model``: the options ``pipe`` was loaded with (health and the repeat command name them); ``limits``: upload
    size, pixels per picture, queue length; ``token``: when set, ``POST /api/paint`` needs ``Authorization: Bearer
    <token>``. ``app.state.painter`` is the worker (``Painter``); it stops with the application.
    """
    if token is not None and not token:
        raise ValueError("token: expected a non-empty text or None, got ''")
    painter = Painter(pipe, queue=limits.queue)
    scheduler_config = getattr(pipe, "scheduler_config", None)
    schedulers = {name: {"max_steps": make_scheduler(name, scheduler_config).max_steps} for name in SCHEDULERS}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        painter.stop()

    app = FastAPI(title="pbe serve", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Paint by Example: repaint the white part of a mask with the content "
                                              "of an example picture. One model, a queue of requests.")
    app.state.painter = painter

    @app.get("/api/health", summary="Whether the server is up, which model it serves and how busy it is")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "model": _model_description(pipe, model),
                "queue": {"waiting": painter.waiting, "limit": limits.queue, "busy": painter.busy}}

    @app.get("/api/options", summary="The painting options (defaults, choices, ranges), samplers and limits")
    def options() -> dict[str, Any]:
        return {"options": PaintOptions.describe(), "schedulers": schedulers,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels}}

    @app.post("/api/paint", summary="Paint a picture: PNG bytes, or Server-Sent Events with Accept: text/event-stream",
              openapi_extra=_paint_openapi(), response_class=Response)
    async def paint(request: Request) -> Response:
        try:
            _check_token(request, token)
            uploads.check_declared_size(request.headers, limits.max_upload_bytes)
            try:
                painter.reserve()
            except QueueFull as err:
                raise Refused(503, str(err), headers={"Retry-After": str(err.retry_after)}) from None
            try:
                job = await _read_job(request, limits, scheduler_config)
            except BaseException:
                painter.release()
                raise
        except Refused as err:
            return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)
        except ClientDisconnect:  # gone while uploading: nobody reads an answer
            return Response(status_code=499)
        painter.submit(job)
        command = _repeat_command(job, model)
        if "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(_events(painter, job, command), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        return await _png_answer(request, painter, job, command)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(_DOCS_PAGE)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _model_description(pipe: Any, model: ModelOptions | None) -> dict[str, Any]:
    if model is not None:
        return {"checkpoint": model.checkpoint, "device": model.device, "dtype": model.dtype}
    device, dtype = getattr(pipe, "device", None), getattr(pipe, "dtype", None)
    name = next((name for name, value in DTYPES.items() if value == dtype), None)  # as --dtype names it
    return {"checkpoint": None, "device": device and str(device), "dtype": name}


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        what = "no Authorization header" if not given else "a wrong token"
        raise Refused(401, f"this server needs a token (Authorization: Bearer <token>), got {what}",
                      headers={"WWW-Authenticate": "Bearer"})


# ---- reading a request --------------------------------------------------------------------------------------------


def _form_value(text: str, kind: str) -> Any:
    """A form field's text as the type the option takes; text that does not read as one is kept, so the options'
    own check refuses it with its own message."""
    try:
        if kind == "integer":
            return int(text) if text.lstrip("+-").isdigit() else float(text)
        if kind == "number":
            return float(text)
    except ValueError:
        return text
    if kind == "boolean":
        return {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}.get(text.lower(), text)
    return text


def _read_options(form: Any, scheduler_config: Any) -> PaintOptions:
    """The PaintOptions the form fields give (a missing or empty field: the default), checked as the CLI checks."""
    schema = {field["name"]: field["type"] for field in PaintOptions.describe()}
    unknown = sorted(set(form.keys()) - schema.keys() - {"seed", *PICTURE_FIELDS})
    if unknown:
        raise Refused(422, f"{unknown[0]}: not a field of /api/paint; expected {', '.join(PICTURE_FIELDS)}, seed or "
                           f"an option: {', '.join(schema)}")
    values = {}
    for name, kind in schema.items():
        text = form.get(name)
        if isinstance(text, str) and text.strip():
            values[name] = _form_value(text.strip(), kind)
        elif text is not None and not isinstance(text, str):
            raise Refused(422, f"{name}: expected a text field, got a file")
    try:
        options = PaintOptions(**values)
        options.check_run(options.make_scheduler(scheduler_config))
    except OptionError as err:
        raise Refused(422, str(err)) from None
    return options


def _read_seed(form: Any) -> int:
    text = form.get("seed")
    if text is None or (isinstance(text, str) and not text.strip()):
        return int.from_bytes(os.urandom(4), "little")  # as `pbe paint` draws a fresh seed
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or not text.isdigit() or int(text) >= SEED_RANGE:
        raise Refused(422, f"seed: expected an integer from 0 to 2**64 - 1, got {text!r}")
    return int(text)


async def _read_job(request: Request, limits: Limits, scheduler_config: Any) -> Job:
    form = await uploads.read_form(request.headers, request.stream(), limit=limits.max_upload_bytes)
    try:
        options = _read_options(form, scheduler_config)
        seed = _read_seed(form)
        pictures = {name: await uploads.read_picture(form, name, max_pixels=limits.max_pixels)
                    for name in PICTURE_FIELDS}
    finally:
        await form.close()
    if pictures["mask"].size != pictures["image"].size:
        raise Refused(422, f"mask: {'x'.join(map(str, pictures['mask'].size))} pixels but image is "
                           f"{'x'.join(map(str, pictures['image'].size))}; they must be the same size")
    return Job(pictures["example"], pictures["image"], pictures["mask"], options, seed, asyncio.get_running_loop())


def _repeat_command(job: Job, model: ModelOptions | None) -> str:
    """The ``pbe paint`` command that repeats this painting from the three pictures saved under the page's names."""
    words = ["pbe", "paint", "--image", "image.png", "--mask", "mask.png", "--example", "example.png",
             "-o", "painted.png", "--seed", str(job.seed), *job.options.flags()]
    return shlex.join(words + (model.flags() if model is not None else []))


# ---- answering ------------------------------------------------------------------------------------------------------


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(painter: Painter, job: Job, command: str) -> AsyncIterator[bytes]:
    """The job's events as Server-Sent Events; the stream closed early (client gone) cancels the job."""
    try:
        while True:
            name, data = await job.events.get()
            if name == "painted":
                image = data["image"]
                png = await asyncio.to_thread(_png, image)
                yield _sse("done", {"image": "data:image/png;base64," + base64.b64encode(png).decode(),
                                    "width": image.width, "height": image.height, "seed": job.seed,
                                    "command": command})
                return
            yield _sse(name, data)
            if name == "error":
                return
    finally:
        painter.cancel(job)  # nothing to do when it finished


async def _until_disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body was read whole before: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _png_answer(request: Request, painter: Painter, job: Job, command: str) -> Response:
    """Wait for the job and answer its PNG; the client gone first cancels it."""
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                painter.cancel(job)
                return Response(status_code=499)  # nobody reads it
            name, data = event.result()
            if name == "painted":
                png = await asyncio.to_thread(_png, data["image"])
                return Response(png, media_type="image/png", headers={
                    "X-Pbe-Seed": str(job.seed), "X-Pbe-Command": _header_text(command),
                    "Cache-Control": "no-store"})
            if name == "error":
                return JSONResponse({"detail": data["detail"]}, status_code=data["status"])
    finally:
        gone.cancel()
        painter.cancel(job)


def _header_text(text: str) -> str:
    """``text`` as an HTTP header value: as is when ASCII, else percent-encoded (headers are Latin-1 at best)."""
    return text if text.isascii() and text.isprintable() else quote(text)


def _paint_openapi() -> dict[str, Any]:
    """``POST /api/paint``'s form and answers for the OpenAPI page (the body is read by hand, to count its bytes)."""
    kinds = {"integer": "integer", "number": "number", "boolean": "boolean", "string": "string"}
    properties: dict[str, Any] = {name: {"type": "string", "format": "binary", "description": what} for name, what in
                                  (("image", "the picture to paint (PNG, JPEG, WebP, BMP, GIF)"),
                                   ("mask", "white = repaint, black = keep; the size of image"),
                                   ("example", "the example whose content is painted in"))}
    for field in PaintOptions.describe():
        schema: dict[str, Any] = {"type": kinds[field["type"]], "default": field["default"],
                                  "description": field["help"]}
        if field["choices"]:
            schema["enum"] = field["choices"]
        if field["minimum"] is not None:
            schema["minimum"] = field["minimum"]
        properties[field["name"]] = schema
    properties["seed"] = {"type": "integer", "minimum": 0, "maximum": SEED_RANGE - 1,
                          "description": "absent or empty: a fresh random seed, reported back"}
    error = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": list(PICTURE_FIELDS), "properties": properties}}}},
        "responses": {
            "200": {"description": "the painted picture; with Accept: text/event-stream, events queued, started, "
                                   "progress, done (the picture as a data URL, seed, command) or error",
                    "headers": {"X-Pbe-Seed": {"schema": {"type": "string"}},
                                "X-Pbe-Command": {"schema": {"type": "string"}}},
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "401": {"description": "a token is needed", "content": error},
            "413": {"description": "upload too large", "content": error},
            "415": {"description": "not a picture of an accepted type", "content": error},
            "422": {"description": "a bad option, seed or picture", "content": error},
            "503": {"description": "the queue is full: retry after Retry-After seconds", "content": error,
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
        },
    }


# The API page, offline (FastAPI's own /docs loads Swagger UI from a CDN): the endpoints read from /openapi.json.
_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pbe serve: HTTP API</title>
<style>body{font:15px/1.4 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
code{background:#eee;padding:0 .2em}td,th{text-align:left;vertical-align:top;padding:.2em .6em}</style></head>
<body><h1>pbe serve: HTTP API</h1><p>The machine-readable description: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="api">loading /openapi.json...</div>
<script>
const esc = s => String(s ?? "").replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"})[c]);
fetch("/openapi.json").then(r => r.json()).then(spec => {
  let html = "";
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      html += `<h2><code>${method.toUpperCase()} ${esc(path)}</code></h2><p>${esc(op.summary)}</p>`;
      const form = op.requestBody?.content?.["multipart/form-data"]?.schema?.properties;
      if (form) {
        html += "<table><tr><th>field</th><th>type</th><th>default</th><th>meaning</th></tr>";
        for (const [name, f] of Object.entries(form)) {
          const type = f.format === "binary" ? "file" : f.enum ? f.enum.join(" | ") : f.type;
          html += `<tr><td><code>${esc(name)}</code></td><td>${esc(type)}</td><td>${esc(f.default)}</td>` +
                  `<td>${esc(f.description)}</td></tr>`;
        }
        html += "</table>";
      }
      html += "<ul>" + Object.entries(op.responses || {}).map(([code, r]) =>
        `<li><code>${code}</code> ${esc(r.description)}</li>`).join("") + "</ul>";
    }
  }
  document.getElementById("api").innerHTML = html;
});
</script></body></html>
"""
