"""LoRA adapters over HTTP: vLLM's load / unload endpoints, and routing a request by "model".

    POST /v1/load_lora_adapter     {"lora_name": NAME, "lora_path": DIR}
    POST /v1/unload_lora_adapter   {"lora_name": NAME}

Both sit behind the API key, like /admin. The answer comes once every rank has run the
operation (it travels in the step plan); an unload waits for the requests still using the
adapter, and from the moment it is asked for new requests for that name get 404.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mlx_cluster.engine.adapters import AdapterRequest
from mlx_cluster.engine.plan import MAX_ADAPTER_PATH_BYTES
from mlx_cluster.models.lora import AdapterError, read_adapter_config
from mlx_cluster.server.protocol import APIError, parse_request

ADAPTER_TIMEOUT_S = 300.0


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/-]+$")

    def unknown_fields(self) -> list[str]:  # parse_request logs these; vLLM's other fields are ignored
        return []


class LoadLoraAdapterRequest(UnloadLoraAdapterRequest):
    lora_path: str = Field(min_length=1, max_length=4096)


def served_names(state) -> list[str]:
    reg = state.adapters
    return [state.model_name, *(a.name for a in reg.ready())] if reg is not None else [state.model_name]


def resolve_model(state, model: str | None) -> str:
    """The name a request runs under (the base model's when it names none); 404 for unknown names."""
    if model is None or model == state.model_name:
        return state.model_name
    if state.adapters is not None and state.adapters.slot_of(model) is not None:
        return model
    names = ", ".join(repr(n) for n in served_names(state))
    raise APIError(
        404, f"the model {model!r} does not exist; this server serves {names}", param="model", code="model_not_found"
    )


def adapter_slot(state, model: str) -> int:
    """The adapter slot requests for `model` (a name resolve_model returned) run with."""
    reg = state.adapters
    if reg is None:
        return 0
    if model == state.model_name:
        return reg.default_slot
    slot = reg.slot_of(model)
    if slot is None:  # unloaded between the check and the submit
        resolve_model(state, model)
    return slot


def adapter_cards(state) -> list[dict]:
    """/v1/models entries of the ready adapters (vLLM's shape: parent is the base model)."""
    if state.adapters is None:
        return []
    return [
        {
            "id": a.name,
            "object": "model",
            "created": int(a.created),
            "owned_by": "mlx-cluster",
            "root": a.path,
            "parent": state.model_name,
        }
        for a in state.adapters.ready()
    ]


def _check_adapter_dir(path: str) -> None:
    """Fail fast, on rank 0, for what every rank would fail on anyway (shapes are checked per rank)."""
    if len(path.encode("utf-8", "surrogatepass")) > MAX_ADAPTER_PATH_BYTES:  # the plan codec's bound
        raise APIError(400, f"lora_path is longer than {MAX_ADAPTER_PATH_BYTES} bytes", param="lora_path")
    try:
        read_adapter_config(Path(path).expanduser())
    except AdapterError as e:
        raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, an unknown ~user, ...
        raise APIError(400, f"lora_path is not a usable path: {e}", param="lora_path", code="invalid_adapter") from None


def _body(model) -> dict:
    """/openapi.json: the handlers read the body themselves (size cap, 400 not 422)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def lora_router(state) -> APIRouter:
    from mlx_cluster.server.app import check_serving, read_json

    router = APIRouter()

    async def run(name: str, path: str) -> None:
        if state.adapters is None:
            raise APIError(400, "LoRA adapters are off (model.max_adapters is 0)", code="adapters_disabled")
        check_serving(state)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def answer(error: str | None) -> None:  # engine thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(error))

        state.frontend.adapter_request(AdapterRequest(name, path, answer))
        try:
            error = await asyncio.wait_for(done, ADAPTER_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(
                504, "the adapter operation did not finish in time", type="timeout", code="timeout"
            ) from None
        if error is not None:
            status = 404 if error.startswith("no LoRA adapter") else 400
            raise APIError(status, error, param="lora_name" if status == 404 else "lora_path", code="invalid_adapter")

    @router.post("/v1/load_lora_adapter", openapi_extra=_body(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request):
        req = parse_request(LoadLoraAdapterRequest, await read_json(request, state.config.server.max_request_bytes))
        if req.lora_name == state.model_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name", code="invalid_value")
        _check_adapter_dir(req.lora_path)
        await run(req.lora_name, req.lora_path)
        return {"object": "lora_adapter", "id": req.lora_name, "loaded": True, "ranks": state.world_size}

    @router.post("/v1/unload_lora_adapter", openapi_extra=_body(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request):
        req = parse_request(UnloadLoraAdapterRequest, await read_json(request, state.config.server.max_request_bytes))
        await run(req.lora_name, "")
        return {"object": "lora_adapter", "id": req.lora_name, "loaded": False, "ranks": state.world_size}

    return router
