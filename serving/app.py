"""The HTTP layer: TF Serving's REST API, Open Inference Protocol health paths, uploads, page, metrics.

Routes only: every answer comes from `pipeline.serving.service.ModelService`,
every refusal is its `ServingError` turned into `{"error": "..."}` with the
error's status. Paths follow tensorflow_serving/g3doc/api_rest.md:

    POST /v1/models/{name}:predict                     (the `stable` label)
    POST /v1/models/{name}/versions/{version}:predict
    POST /v1/models/{name}/labels/{label}:predict      (stable | canary)
    GET  /v1/models/{name}[/versions/{version}]        (model_version_status)
    GET  /v1/models/{name}[/versions/{version}]/metadata
    POST /v1/feedback                                  (a true label for a logged prediction)
    GET  /v1/models/{name}/monitoring                  (live quality per version, shadow comparison)
    POST /predict                                      (multipart upload, top-k per file)
    GET  /v2/health/live, /v2/health/ready, /v2/models/{name}/ready
    GET  /metrics                                      (Prometheus)
    GET  /                                             (the upload page)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pipeline.serving.inputs import ServingError
from pipeline.serving.metrics import CONTENT_TYPE
from pipeline.serving.service import ModelService

VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-Id"

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error(status: int, message: str, version: str | None = None) -> JSONResponse:
    headers = {VERSION_HEADER: version} if version else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit_mb: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit_mb`."""
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    too_big = ServingError(f"the request body exceeds serve.max_body_mb = {limit_mb:g} MB", status=413)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class Metered:
    """ASGI middleware: in-flight gauge, and every response counted by route, status and version."""

    def __init__(self, app: Any, service: ModelService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "version": None}

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for key, value in message.get("headers", []):
                    if key.decode().lower() == VERSION_HEADER.lower():
                        answer["version"] = value.decode()
            await send(message)

        metrics = self.service.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            self.service.observe_request(endpoint, answer["status"], answer["version"], seconds)


def create_app(service: ModelService, max_body_mb: float, poll: bool = True) -> FastAPI:
    """The FastAPI application over `service` (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        service.start(poll=poll)
        yield
        await run_in_threadpool(service.stop)

    app = FastAPI(
        title="image-classifier serving",
        description="TF Serving's REST API over the pipeline's champion (see README: Serving).",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )

    @app.exception_handler(ServingError)
    async def refused(_: Request, exc: ServingError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error(500, f"internal error ({exc.__class__.__name__}); see the service log")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    async def predict(request: Request, name: str, version: str | None, label: str | None) -> Response:
        try:
            body = await read_body(request, max_body_mb)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it; counted as 499 like nginx does
        result, served = await service.predict_async(name, body, version, label)
        return JSONResponse(result, headers={VERSION_HEADER: served, REQUEST_ID_HEADER: result["request_id"]})

    @app.post("/v1/models/{name}:predict")
    async def predict_stable(request: Request, name: str) -> Response:
        return await predict(request, name, None, None)

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def predict_version(request: Request, name: str, version: str) -> Response:
        return await predict(request, name, version, None)

    @app.post("/v1/models/{name}/labels/{label}:predict")
    async def predict_label(request: Request, name: str, label: str) -> Response:
        return await predict(request, name, None, label)

    @app.get("/v1/models/{name}:predict")
    @app.get("/v1/models/{name}/versions/{version}:predict")
    @app.get("/v1/models/{name}/labels/{label}:predict")
    async def predict_needs_post() -> Response:
        response = error(405, "predict takes POST with a JSON body, not GET")
        response.headers["Allow"] = "POST"
        return response

    @app.get("/v1/models/{name}")
    async def model_status(name: str) -> dict[str, Any]:
        return service.status(name)

    @app.get("/v1/models/{name}/versions/{version}")
    async def version_status(name: str, version: str) -> dict[str, Any]:
        return service.status(name, version)

    @app.get("/v1/models/{name}/labels/{label}")
    async def label_status(name: str, label: str) -> dict[str, Any]:
        return service.status(name, label=label)

    @app.get("/v1/models/{name}/metadata")
    async def metadata(name: str) -> dict[str, Any]:
        return service.metadata(name)

    @app.get("/v1/models/{name}/versions/{version}/metadata")
    async def version_metadata(name: str, version: str) -> dict[str, Any]:
        return service.metadata(name, version)

    @app.get("/v1/models/{name}/labels/{label}/metadata")
    async def label_metadata(name: str, label: str) -> dict[str, Any]:
        return service.metadata(name, label=label)

    @app.post("/predict")
    async def upload(request: Request, top_k: Annotated[int | None, Query(ge=1, le=1000)] = None) -> Response:
        try:
            body = await read_body(request, max_body_mb)
        except ClientDisconnect:
            return Response(status_code=499)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServingError('send the images as multipart/form-data, one or more "file" fields')

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        limit = service.cfg.max_instances + 1  # one over: the service names the limit
        try:
            form = await Request(request.scope, replay).form(max_files=limit, max_fields=16)
        except HTTPException as refused:  # Starlette's own limits and parse errors
            if "Too many files" in str(refused.detail):
                raise ServingError(
                    f"more than {service.cfg.max_instances} files; the limit is serve.max_instances = "
                    f"{service.cfg.max_instances}"
                ) from None
            raise ServingError(f"the multipart body cannot be read: {refused.detail}") from None
        files = []
        for index, (_, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                raise ServingError(f"field {index} is not a file; send the images as file fields")
            files.append((value.filename or f"file {index}", await value.read()))
        result = await run_in_threadpool(service.predict_files, files, top_k)
        headers = {VERSION_HEADER: result["model_version"], REQUEST_ID_HEADER: result["request_id"]}
        return JSONResponse(result, headers=headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        body = await read_body(request, max_body_mb)
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise ServingError(f"the feedback body is not JSON ({bad})") from None
        return JSONResponse(await run_in_threadpool(service.feedback, parsed))

    @app.get("/v1/models/{name}/monitoring")
    async def monitoring(name: str) -> dict[str, Any]:
        return await run_in_threadpool(service.monitoring, name)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok, why = service.ready()
        return JSONResponse({"ready": ok, "message": why}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        ok, why = service.ready()
        if name != service.name:
            return error(404, f"unknown model {name!r}; this service serves {service.name!r}")
        return JSONResponse({"name": name, "ready": ok, "message": why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # The live figures read the prediction log: off the event loop.
        return Response(await run_in_threadpool(service.metrics.exposition), media_type=CONTENT_TYPE)

    page = resources.files("serving").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        html = page.replace("{{MODEL_NAME}}", service.name).replace("{{TOP_K}}", str(service.cfg.top_k))
        return HTMLResponse(html)

    app.add_middleware(Metered, service=service)
    return app
