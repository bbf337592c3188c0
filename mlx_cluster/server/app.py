"""Rank 0's HTTP API: OpenAI endpoints, probes, metrics and admin, on FastAPI.

Handlers never touch the model: they validate, tokenize, hand a `GenerationRequest` to the
engine's frontend and relay its events, so the asyncio loop never blocks on model work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_cluster.config import ClusterConfig
from mlx_cluster.server.auth import check_auth
from mlx_cluster.server.chat import collect_chat, stream_chat
from mlx_cluster.server.generation import (
    Choice,
    Limits,
    RequestStream,
    chunk,
    completion_prompt,
    echo_chunk,
    full_response,
    sampling_params,
    sse,
    sse_response,
    usage_chunk,
)
from mlx_cluster.server.lora_routes import adapter_cards, lora_router, resolve_model
from mlx_cluster.server.messages import CountTokensRequest, MessagesRequest, count_tokens_endpoint, messages_endpoint
from mlx_cluster.server.model_routes import model_cards, model_view, models_health
from mlx_cluster.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    anthropic_error_body,
    parse_request,
)
from mlx_cluster.server.response_store import ResponseStore
from mlx_cluster.server.responses import ResponsesRequest, delete_response, get_response, responses_endpoint
from mlx_cluster.server.turn import Turn, prepare_turn, run_until_done, submit

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the HTTP side knows about the engine; written by the rank runtime."""

    config: ClusterConfig
    world_size: int = 1
    status: str = "loading"  # loading | ready | draining | stopped | dead
    detail: str = ""
    frontend: object | None = None
    tokenizer: object | None = None
    limits: Limits | None = None
    engine_timer: object | None = None
    engine_alive: callable = lambda: True
    api_keys: tuple[str, ...] = ()
    started_at: float = field(default_factory=time.time)
    metrics: object | None = None
    prefix_cache: object | None = None  # rank 0's PrefixCache (None when caching is off)
    bus_stats: object | None = None
    speculator: object | None = None  # rank 0's engine/speculate.py Speculator (None when off)
    wedged_after_s: float = 30.0
    agent: object | None = None  # server/turn.py AgentSetup: tool / reasoning formats, grammar compiler
    responses: object | None = None  # server/responses.py ResponseStore
    adapters: object | None = None  # engine/adapters.py AdapterRegistry (None: LoRA adapters off)
    cluster_status: object | None = None  # server/status.py ClusterStatus: every rank's reports, history
    models: object | None = None  # engine/models.py ModelSet when several models are served (models:)

    @property
    def model_name(self) -> str:
        return self.config.model.served_name

    def wedged(self) -> bool:
        """A step has run for too long, or work is pending but no step has finished for too long."""
        now = time.monotonic()
        models = self.models
        if models is not None and models.loading:  # a model load is one long step, bounded like start-up
            return now - models.loading_since > self.config.supervisor.startup_timeout_s
        timer = self.engine_timer
        if timer is not None and timer.busy_since and now - timer.busy_since > self.wedged_after_s:
            return True
        frontend = self.frontend
        if frontend is None or not frontend.has_work_threadsafe():
            return False
        last = frontend.stats.last_step_at
        return bool(last) and now - last > self.wedged_after_s


def _body_schema(model) -> dict:
    """Document the JSON body in /openapi.json: handlers read the body themselves (size cap,
    400 instead of 422), so FastAPI cannot infer it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # added to components by _openapi_with_request_models
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_with_request_models(app: FastAPI):
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, CompletionRequest, MessagesRequest, ResponsesRequest):
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {})
                components.update(defs)
        return app.openapi_schema

    return openapi


def error_response(err: APIError, path: str = "") -> JSONResponse:
    """OpenAI's error envelope, or Anthropic's on the Messages API routes."""
    body = anthropic_error_body(err) if path.startswith("/v1/messages") else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mlx-cluster", version="0.1.0")
    app.state.server = state
    if state.responses is None:
        server_cfg = state.config.server
        state.responses = ResponseStore(server_cfg.responses_store_max, server_cfg.responses_store_ttl_s)
    app.openapi = _openapi_with_request_models(app)
    if state.config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.config.server.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        return error_response(
            APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value"), request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return error_response(APIError(exc.status_code, message, code=code), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in a request handler")
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return error_response(err, request.url.path)

    @app.middleware("http")
    async def _auth_and_limits(request: Request, call_next):
        path = request.url.path
        protected = path.startswith("/v1") or path.startswith("/admin")
        protected |= path == "/metrics" and not state.config.server.open_metrics
        protected |= path in ("/livez", "/readyz", "/health") and not state.config.server.open_probes
        if protected and request.method != "OPTIONS":
            err = check_auth(request.headers.get("authorization"), state.api_keys, request.headers.get("x-api-key"))
            if err is not None:
                return error_response(err, path)
        return await call_next(request)

    # ---- probes ---------------------------------------------------------------------
    @app.get("/livez")
    async def livez():
        alive = state.status != "dead" and state.engine_alive()
        return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)

    @app.get("/readyz")
    async def readyz():
        ready = state.status == "ready" and state.engine_alive() and not state.wedged()
        reason = state.status if state.status != "ready" else ("wedged" if state.wedged() else "ok")
        return JSONResponse({"status": "ready" if ready else reason}, status_code=200 if ready else 503)

    @app.get("/health")
    async def health():
        return JSONResponse(health_report(state), status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response("", media_type="text/plain")
        body, content_type = state.metrics.render(state)
        return Response(body, media_type=content_type)

    from mlx_cluster.server.admin import admin_router  # imported here: admin.py imports this module

    app.include_router(admin_router(state))
    app.include_router(lora_router(state))
    from mlx_cluster.server.status import status_router

    app.include_router(status_router(state))  # GET /admin/status, the dashboard at / and /dashboard

    # ---- models ---------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": int(state.started_at), "owned_by": "mlx-cluster"}

    def cards() -> list[dict]:
        if state.models is not None:  # several models: every configured one, loaded or not
            return model_cards(state)
        return [model_card(), *adapter_cards(state)]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if state.models is not None:
            model_view(state, model_id)  # 404 for names this server does not serve
        else:
            resolve_model(state, model_id)
        return next(c for c in cards() if c["id"] == model_id)

    # ---- generation -----------------------------------------------------------------
    async def accept(request: Request, model_cls):
        """Every generation route's front door: bounded body, validated, this model, serving."""
        data = await read_json(request, state.config.server.max_request_bytes)
        req = parse_request(model_cls, data)
        # Serving first: while a restarted group loads, its adapters are not registered yet, and
        # a request naming one must hear "loading, retry" (503), not "no such model" (404).
        check_serving(state)
        if state.models is not None:  # several models: the request runs with its model's view
            return req, model_view(state, req.model)
        resolve_model(state, req.model)  # the base model or a loaded LoRA adapter
        return req, state

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/responses", openapi_extra=_body_schema(ResponsesRequest))
    async def responses(request: Request):
        req, view = await accept(request, ResponsesRequest)
        return await responses_endpoint(view, request, req)

    @app.get("/v1/responses/{response_id}")
    async def get_stored_response(response_id: str):
        return get_response(state, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_stored_response(response_id: str):
        return delete_response(state, response_id)

    @app.post("/v1/messages", openapi_extra=_body_schema(MessagesRequest))
    async def messages(request: Request):
        req, view = await accept(request, MessagesRequest)
        return await messages_endpoint(view, request, req)

    @app.post("/v1/messages/count_tokens", openapi_extra=_body_schema(CountTokensRequest))
    async def count_tokens(request: Request):
        req, view = await accept(request, CountTokensRequest)
        return count_tokens_endpoint(view, req)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        return await generate(request, "completions")

    async def generate(request: Request, kind: str):
        req, state = await accept(request, ChatCompletionRequest if kind == "chat" else CompletionRequest)
        timeout_s = state.config.server.request_timeout_s
        stream = RequestStream(asyncio.get_running_loop(), kind, resolve_model(state, req.model))
        if kind == "chat":
            turn = prepare_turn(state, req)
            submit(state, stream, turn)
            if req.stream:
                return sse_response(stream_chat(state, stream, turn, req, timeout_s))
            return await collect_chat(state, request, stream, turn, timeout_s)
        tokenizer = state.tokenizer
        prompt = completion_prompt(tokenizer, req, state.limits.vocab_size)
        params = sampling_params(req, len(prompt), state.limits, set(tokenizer.eos_token_ids))
        if req.echo:
            stream.echo = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(prompt)
        submit(state, stream, Turn(prompt=prompt, params=params, n=req.n, stop=req.stop_list))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(stream_events(state, stream, req, timeout_s, include_usage))
        return await collect(state, request, stream, req, timeout_s)

    return app


async def read_json(request: Request, max_bytes: int):
    """Read the body with a hard size cap (also for chunked bodies), then parse JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # e.g. 100k nested '[': a client error, not a 500
        raise APIError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None


def check_serving(state: ServerState) -> None:
    if state.status == "ready" and state.engine_alive():
        return
    if state.status == "draining":
        raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    if state.status == "loading":
        raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})
    raise APIError(
        503,
        f"the engine is unavailable: {state.detail or state.status}",
        code="engine_unavailable",
        headers={"Retry-After": "5"},
    )


def health_report(state: ServerState) -> dict:
    frontend = state.frontend
    stats = getattr(frontend, "stats", None)
    waiting = frontend.queue_depth if frontend is not None else 0
    running = stats.requests_running if stats is not None else 0
    return {
        "status": health_status(state, waiting, running),
        "model": state.model_name,
        "ranks": state.world_size,
        "queue_depth": waiting,
        "running_sequences": stats.seqs_running if stats is not None else 0,
        "running_requests": running,
        "engine": state.status,
        "uptime_s": round(time.time() - state.started_at, 1),
        **({"models": models_health(state)} if state.models is not None else {}),
    }


def health_status(state: ServerState, waiting: int, running: int) -> str:
    """ok, degraded (queue building up or engine slow), overloaded (queue nearly full), shutting_down.

    Thresholds (docs/operations.md): overloaded at >= 90% of scheduler.max_queue waiting;
    degraded when any request waits while the batch is full, or the engine is not ready.
    """
    if state.status in ("draining", "stopped"):
        return "shutting_down"
    if state.status != "ready" or not state.engine_alive() or state.wedged():
        return "degraded"
    max_queue = state.config.scheduler.max_queue
    if max_queue and waiting >= 0.9 * max_queue:
        return "overloaded"
    if waiting > 0 and running >= state.config.scheduler.max_batch_size:
        return "degraded"
    return "ok"


async def stream_events(state: ServerState, stream: RequestStream, req, timeout_s: float, include_usage: bool):
    """SSE body: a role chunk (chat), token chunks, an optional usage chunk, then [DONE].

    Failures mid-stream end with a `data: {"error": ...}` chunk. If the client goes away the
    generator is closed, and `finally` aborts the sequence on every rank.
    """
    tokenizer = state.tokenizer
    try:
        if stream.kind == "chat":
            for i in range(req.n):
                yield sse(chunk(stream, tokenizer, None, first=True, index=i))
        elif stream.echo:
            for i in range(req.n):
                yield sse(echo_chunk(stream, i))
        async for event in stream.events(timeout_s):
            if state.metrics is not None:
                state.metrics.token_event(stream, event)
            yield sse(chunk(stream, tokenizer, event))
        if include_usage:
            yield sse(usage_chunk(stream))
        if state.metrics is not None:
            state.metrics.request_finished(stream, "ok")
        yield b"data: [DONE]\n\n"
    except APIError as e:
        if state.metrics is not None:
            state.metrics.request_finished(stream, "error")
        yield sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        if not stream.finished:
            state.frontend.abort(stream.id)
            if state.metrics is not None:
                state.metrics.request_finished(stream, "abort")


async def collect(state: ServerState, request: Request, stream: RequestStream, req, timeout_s: float):
    """Non-streaming: gather every choice, aborting if the client disconnects meanwhile."""
    choices = [Choice(index=i) for i in range(req.n)]

    async def gather():
        async for event in stream.events(timeout_s):
            if state.metrics is not None:
                state.metrics.token_event(stream, event)
            c = choices[event.index]
            c.text += event.text
            c.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                c.finish_reason = event.finish_reason

    if not await run_until_done(state, request, stream, gather):
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(full_response(stream, state.tokenizer, choices))
