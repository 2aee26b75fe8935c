"""The FastAPI app: routes, the body-size limit, and JSON error bodies for every client mistake.

``build_http_app(service)`` is called once per ingress replica (``deployments.RecommenderApi``);
``service`` does the work, this module only speaks HTTP. OpenAPI docs are at /docs.

Status codes: 400 body is not JSON / not an object, 404 unknown item or route, 405 wrong method,
413 body over the limit, 422 a field is wrong (types, ranges, unknown items, model not served),
503 a model replica is not answering (GET /healthz only). Every error body has the same shape,
``schema.ErrorResponse``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tiger_ray.serving.schema import (
    MAX_ASIN_LENGTH,
    ApiError,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    ItemDetails,
    RecommendRequest,
    RecommendResponse,
    describe_validation_errors,
)

log = logging.getLogger(__name__)

HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 415: "unsupported_media_type"}
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 422)}


class Service(Protocol):
    async def recommend(self, request: RecommendRequest) -> RecommendResponse: ...
    def item(self, item_id: int) -> ItemDetails: ...
    def item_by_asin(self, asin: str) -> ItemDetails: ...
    async def info(self) -> InfoResponse: ...
    async def health(self) -> HealthResponse: ...


def error_response(status: int, error: str, message: str, fields=()) -> JSONResponse:
    body = ErrorResponse(error=error, message=message, fields=list(fields))
    return JSONResponse(body.model_dump(), status_code=status)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a JSON 413, before they are parsed.

    A declared Content-Length over the limit is refused without reading the body; a chunked
    body is counted as it arrives. (Starlette's own limiter answers in plain text.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            response = error_response(413, HTTP_ERRORS[413], error.detail)
            return await response(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI re-raises it from body parsing to our handler.
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = describe_validation_errors(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        response = error_response(exc.status_code, HTTP_ERRORS.get(exc.status_code, "http_error"), message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: log it with its traceback, answer without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the replica's log")


def build_http_app(service: Service, max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="tiger-ray recommendations",
        description="Generative retrieval (TIGER, Rajput et al. 2023) and a dual-encoder + FAISS "
                    "baseline, served by Ray Serve with dynamic batching.",
        version="1",
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.post("/recommend", response_model=RecommendResponse, responses=ERROR_RESPONSES,
              summary="top-k next items for a history")
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        return await service.recommend(body)

    @app.get("/items/{item_id}", response_model=ItemDetails, responses=ERROR_RESPONSES,
             summary="one item's metadata by item id")
    def item(item_id: int = Path(description="item id, 1..N")) -> ItemDetails:
        return service.item(item_id)

    @app.get("/items/asin/{asin}", response_model=ItemDetails, responses=ERROR_RESPONSES,
             summary="one item's metadata by ASIN")
    def item_by_asin(asin: str = Path(min_length=1, max_length=MAX_ASIN_LENGTH)) -> ItemDetails:
        return service.item_by_asin(asin)

    @app.get("/info", response_model=InfoResponse, summary="run, model versions, catalog size, limits")
    async def info() -> InfoResponse:
        return await service.info()

    @app.get("/healthz", response_model=HealthResponse,
             responses={503: {"model": ErrorResponse}}, summary="every model replica answers")
    async def healthz() -> HealthResponse:
        return await service.health()

    return app
