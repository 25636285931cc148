"""The HTTP layer: FastAPI routes, API-key check, OpenAI-style error bodies, uvicorn.

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with the status an
OpenAI client expects: 400 bad input, 401 bad key, 404 unknown model or path, 413 a body over
--max-request-bytes, 429 full queue and 503 shutting down (both with Retry-After), 500 a failed
engine step or a bug (its text goes to the log, never to the client; the middleware counts
every response, 500s too). The engine keeps serving the other requests.

/health is liveness (503 when the engine thread died or is stuck in a step, or the server is
draining); /ready is readiness (503 also while the queue is full: send traffic elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineStepError, QueueFullError, UnavailableError
from tokenmill.engine.replicas import ReplicatedEngine
from tokenmill.entrypoints.openai.body_parser import BodyParser
from tokenmill.entrypoints.openai.metrics import ServerMetrics
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.entrypoints.openai.serving import ModelNotFoundError, OpenAIServing
from tokenmill.entrypoints.openai.tokenization import detokenize, tokenize
from tokenmill.entrypoints.openai.tokenize_protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.errors import InvalidParameterError, TokenmillError

log = logging.getLogger("tokenmill")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_error", 503: "internal_error"}
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")
TENANT_HEADER = "X-Tenant"  # names the tenant of a request whose body has no `user`


WORKER_THREADS = 4  # threads that parse and tokenize request bodies off the event loop
RETRY_AFTER_S = 1  # what a 429 or 503 asks a client to wait: about the time a few requests take to start


@dataclass
class ServerOptions:
    """The server's own flags (the engine's are EngineConfig's); see `tokenmill serve --help`."""

    api_key: str | None = None
    max_queue: int | None = None
    max_request_bytes: int = 16 << 20
    max_request_tokens: int | None = None  # None: MAX_REQUEST_CONTEXTS x max_model_len
    shutdown_timeout: float = 30.0
    metrics_tenant_labels: bool = False
    tool_call_parser: str | None = None  # None: the chat template's format
    reasoning_parser: str | None = None
    allowed_origins: list[str] | None = None  # CORS; None: no CORS headers at all
    allowed_methods: list[str] | None = None  # None: all ("*")
    allowed_headers: list[str] | None = None  # None: all ("*")
    allow_credentials: bool = False


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413, by its Content-Length
    before a byte is read, else (a chunked body) as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException from the body read through
                raise StarletteHTTPException(413, f"the request body is over {self.limit} bytes (--max-request-bytes)")
            return message

        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            received = int(declared)  # the first read raises, inside the app, so the answer is counted
        return await self.app(scope, limited_receive, send)


def build_app(engine: AsyncLLMEngine | ReplicatedEngine, metrics: ServerMetrics, served_model_names: list[str],
              options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    api_key = options.api_key
    app = FastAPI(title="tokenmill", summary="OpenAI-compatible LLM server", lifespan=_workers)
    app.add_middleware(BodyLimit, limit=options.max_request_bytes)
    app.state.draining = False  # set on SIGTERM: new work is refused, the work in flight finishes
    serving = OpenAIServing(engine, served_model_names, options.max_request_tokens, options.tool_call_parser,
                            options.reasoning_parser)
    app.state.body_parser = BodyParser(serving.max_model_len)
    _install_error_handlers(app)

    @app.middleware("http")
    async def check_key_and_count(request: Request, call_next):
        path = request.url.path
        if api_key is not None and not path.startswith(OPEN_PATHS) and not _key_ok(request, api_key):
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        elif app.state.draining and path.startswith("/v1/") and request.method == "POST":
            response = error_response(503, "the server is shutting down; send the request to another replica")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug: logged here, never sent to the client, and counted below
                log.exception("unexpected error while answering %s", path)
                response = error_response(500, "internal error: the server log has the details")
        endpoint = path if path in route_paths else "other"
        metrics.http_responses.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> Response:
        status = "draining" if app.state.draining else "ok" if engine.alive else "engine stopped"
        body = {"status": status}
        if isinstance(engine, ReplicatedEngine):  # data-parallel: how many replicas take requests now
            body["replicas"] = {"up": engine.num_up, "total": len(engine.replicas)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/ready")
    async def ready() -> Response:
        queue_full = engine.max_queue is not None and engine.num_queued >= engine.max_queue
        status = ("draining" if app.state.draining else "engine stopped" if not engine.alive
                  else "queue full" if queue_full else "ready")
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        tenants = options.metrics_tenant_labels or (api_key is not None and _key_ok(request, api_key))
        if isinstance(engine, ReplicatedEngine):
            await engine.refresh_stats()
        return Response(metrics.render(tenant_labels=tenants), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request):
        body = await _parse(request, app.state.body_parser, CompletionRequest)
        return await _respond(serving.completion(body, request.headers.get(TENANT_HEADER)), request)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await _parse(request, app.state.body_parser, ChatCompletionRequest)
        return await _respond(serving.chat(body, request.headers.get(TENANT_HEADER)), request)

    @app.post("/tokenize", openapi_extra=_json_body(TokenizeRequest))
    async def tokenize_route(request: Request) -> dict:
        return await tokenize(serving, await _parse(request, app.state.body_parser, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize_route(request: Request) -> dict:
        return await detokenize(serving, await _parse(request, app.state.body_parser, DetokenizeRequest))

    if options.allowed_origins is not None:  # outermost: a preflight needs no API key; errors get the headers too
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                           allow_methods=options.allowed_methods or ["*"],
                           allow_headers=options.allowed_headers or ["*"], allow_credentials=options.allow_credentials)
    route_paths = {route.path for route in app.routes}
    app.openapi = lambda: _openapi(app, (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest))
    return app


@asynccontextmanager
async def _workers(app: FastAPI):
    """The threads that parse and tokenize requests, all started before the first request: one
    started mid-request waited ~140 ms for the GIL while another thread parsed a large body,
    and the event loop (every other request, /health) waited with it. At the end, the body
    parser's process goes too."""
    executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="tokenmill-worker")
    started = threading.Barrier(WORKER_THREADS)  # each task waits for the others: one per thread
    for future in [executor.submit(started.wait) for _ in range(WORKER_THREADS)]:
        future.result()
    asyncio.get_running_loop().set_default_executor(executor)  # what asyncio.to_thread runs on
    yield
    executor.shutdown(wait=False)
    app.state.body_parser.close()


async def _parse(request: Request, parser: BodyParser, model: type[BaseModel]) -> BaseModel:
    """The body, parsed and checked off the event loop (see BodyParser): done on the loop, as
    FastAPI does it, a 10 MB list of token ids held every other request and /health for seconds."""
    return await asyncio.to_thread(parser.parse, model, await request.body())


def _json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its own (see _parse): the model, by reference."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI, models: tuple[type[BaseModel], ...]) -> dict:
    """FastAPI's document, plus the schemas of the bodies the routes parse themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


async def _respond(work, request: Request) -> Response:
    """Await the endpoint's work unless the client leaves first (then cancel it: that aborts its
    requests and frees their KV blocks). A stream is handed to StreamingResponse, which does
    the same when the client leaves mid-stream."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    result = task.result()
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _key_ok(request: Request, api_key: str) -> bool:
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
        param = loc[0] if loc and first.get("type") != "json_invalid" else None
        where = ".".join(loc)
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", ""))
        elif not loc:
            message = "the request body must be a JSON object (send Content-Type: application/json)"
        return error_response(400, message, param)

    @app.exception_handler(InvalidParameterError)
    async def invalid_parameter(_request, exc: InvalidParameterError):
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(ModelNotFoundError)
    async def unknown_model(_request, exc: ModelNotFoundError):
        return error_response(404, str(exc), "model")

    @app.exception_handler(QueueFullError)
    async def queue_full(_request, exc: QueueFullError):
        return error_response(429, str(exc))

    @app.exception_handler(TokenmillError)
    async def other_bad_input(_request, exc: TokenmillError):
        return error_response(400, str(exc))

    @app.exception_handler(UnavailableError)
    async def unavailable(_request, exc: UnavailableError):  # shutting down, or the replica serving it died
        return error_response(503, str(exc))

    @app.exception_handler(EngineStepError)
    async def engine_failed(_request, exc: EngineStepError):
        return error_response(500, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))


def serve(front, host: str, port: int, options: ServerOptions, served_model_names: list[str] | None,
          log_level: str = "info") -> None:
    """Run the server until interrupted (blocks). `front(max_queue, observer)` builds what the server
    hands requests to: an AsyncLLMEngine, or a ReplicatedEngine of several. On SIGTERM or Ctrl-C it stops taking
    connections and new requests (503) and lets the requests in flight finish for up to
    `options.shutdown_timeout` seconds; those still running then end with an error event and [DONE]
    (503 if not streamed). A second signal exits at once."""
    import uvicorn

    metrics = ServerMetrics()
    async_engine = front(options.max_queue, metrics.observe)
    names = served_model_names or [async_engine.engine.model_name]
    metrics.bind_engine(async_engine, names[0])
    app = build_app(async_engine, metrics, names, options)
    log.info("tokenmill: serving %s on http://%s:%d", ", ".join(names), host, port)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if app.state.draining:  # a second signal: exit now
                self.should_exit = self.force_exit = True
                return
            log.info("tokenmill: draining; requests in flight have %.0f s to finish", options.shutdown_timeout)
            app.state.draining = True  # from now on new requests get 503 and /health says draining
            threading.Thread(target=self._drain, name="tokenmill-drain", daemon=True).start()

        def _drain(self) -> None:
            """Wait for the requests in flight, end those left at the deadline, then let uvicorn stop."""
            deadline = time.monotonic() + options.shutdown_timeout
            while async_engine.num_in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            if async_engine.num_in_flight:
                async_engine.end_all()
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=options.shutdown_timeout + 5)  # room for the error events
    try:
        DrainingServer(config).run()
    finally:
        async_engine.shutdown()
