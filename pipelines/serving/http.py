"""The HTTP front: one FastAPI app (served by uvicorn in-process, or by Ray Serve's proxy) and a
uvicorn runner that works in the foreground (`prefixfleet serve`) or on a background thread."""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from prefixfleet.pipelines.serving.keys import ApiKeys, Caller, Unauthorized, current_caller
from prefixfleet.pipelines.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from prefixfleet.pipelines.serving.openai_routes import NoChatTemplate, add_openai_routes, disconnected
from prefixfleet.pipelines.serving.schemas import ErrorBody, GenerateRequest, GenerateResponse
from prefixfleet.pipelines.serving.service import BadRequest, Busy, ClientGone, PrefixService, RequestTimeout
from prefixfleet.registry import IntegrityError, InvalidUserKey, NotFound, RegistryError
from prefixfleet.workers.errors import BackboneMismatch, WorkerError

# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (Unauthorized, 401), (NotFound, 404), (InvalidUserKey, 422), (NoChatTemplate, 400), (BadRequest, 422),
    (BackboneMismatch, 409), (Busy, 429), (RequestTimeout, 504), (ClientGone, 499), (IntegrityError, 500),
    (RegistryError, 503), (WorkerError, 500),
)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
          422: "invalid_request_error", 429: "rate_limit_error", 504: "timeout"}


def error_body(message: str, status: int) -> JSONResponse:
    """One line, under both our key (`detail`) and OpenAI's (`error`)."""
    line = " ".join(message.split())
    kind = _TYPES.get(status, "server_error")
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(Busy.retry_after_s)}}.get(status)
    return JSONResponse({"detail": line, "error": {"message": line, "type": kind, "param": None, "code": status}},
                        status_code=status, headers=headers)


def _error_response(_: Request, exc: Exception) -> JSONResponse:
    return error_body(str(exc), next(code for kind, code in _STATUS if isinstance(exc, kind)))


def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Which fields are wrong and why, on one line."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_body("; ".join(problems)[:1000], 422)


def create_app(service: PrefixService, keys: ApiKeys | None = None) -> FastAPI:
    """The app; with `keys`, every /v1 route needs a key and sees only its namespace."""
    app = FastAPI(
        title="prefixfleet", version="1",
        description="Generation with per-user prefixes on one shared backbone: every decode step carries "
                    "rows of many users. OpenAI-compatible routes under /v1 (model = \"namespace/user\").",
    )
    for kind, _ in _STATUS:
        app.add_exception_handler(kind, _error_response)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.state.keys = keys
    add_openai_routes(app, service)

    @app.post("/v1/generate", response_model=GenerateResponse, responses={
        404: {"model": ErrorBody, "description": "No production prefix for this user."},
        409: {"model": ErrorBody, "description": "The user's prefix was trained on another backbone."},
        422: {"description": "The request is malformed or cannot fit the backbone."},
        429: {"model": ErrorBody, "description": "Too many requests waiting; retry after Retry-After seconds."},
    })
    async def generate(request: GenerateRequest, who: Annotated[Caller, Depends(current_caller)],
                       http: Request) -> GenerateResponse:
        """Continue the prompt with the user's production prefix."""
        return await service.generate(request, who, partial(disconnected, http))

    @app.get("/metrics", response_class=Response)
    def metrics(_: Annotated[Caller, Depends(current_caller)]) -> Response:
        """Prometheus text: queue depth, rows per step, tokens, time to first token, latency, prefix
        cache hits and misses per tier (a key is needed when the server has keys)."""
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/healthz")
    def healthz(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """"ok"; to a caller with a key (or on a server without keys) also the backbone, the
        engine's load and the cache's usage."""
        try:
            current_caller(request, authorization)
        except Unauthorized:
            return {"status": "ok"}
        return service.health()

    return app


class InProcessServer:
    """uvicorn serving `app`; port 0 picks a free port (read it from `url` once started)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def run(self) -> None:
        """Serve in the foreground until interrupted."""
        self.server.run()

    def start(self, timeout: float = 30.0) -> str:
        """Serve on a background thread; returns the base URL once it accepts connections."""
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting (is the port in use?)")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
