"""Adapter admin: upload, list, inspect, delete, and vLLM's load/unload aliases.

Every route needs the admin token. Uploads are parsed and bounded here (`uploads.py`,
`archives.py`); the engine then validates the adapter against the base model and writes
it to the store atomically. Engine calls run in a worker thread, so streams in flight
keep flowing while an adapter is parsed and written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from server.api.admin_schemas import (UPLOAD_OPENAPI, AdapterDeleted, AdapterList, AdapterObject, LoadLoraRequest,
                                      UnloadLoraRequest)
from server.api.auth import require_admin
from server.api.errors import ApiError
from server.api.folders import read_adapter_folder
from server.api.uploads import check_safetensors, read_upload, validate_name
from server.engine.request import EngineError

log = logging.getLogger(__name__)

ERRORS = {400: {"description": "invalid upload or adapter"}, 401: {"description": "missing or wrong admin token"},
          403: {"description": "admin routes disabled (no admin token configured)"}}
router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], tags=["adapters"], responses=ERRORS)


async def _engine_call(request: Request, operation: str, func: Callable[..., Any], *args: Any) -> Any:
    metrics = request.app.state.metrics
    try:
        result = await asyncio.to_thread(func, *args)
    except EngineError as exc:
        metrics.adapter_admin.labels(operation, str(exc.status)).inc()
        raise
    metrics.adapter_admin.labels(operation, "ok").inc()
    return result


def _adapter(request: Request, info: Any) -> AdapterObject:
    return AdapterObject.from_info(info, request.app.state.engine.base_name)


def _counted(request: Request, operation: str, exc: ApiError) -> ApiError:
    request.app.state.metrics.adapter_admin.labels(operation, str(exc.status)).inc()
    return exc


@router.post("/adapters", status_code=201, response_model=AdapterObject, openapi_extra=UPLOAD_OPENAPI,
             responses={409: {"description": "name taken (send overwrite=true)"},
                        413: {"description": "upload over --max-adapter-bytes"}},
             summary="Upload an adapter (multipart: name, overwrite, the two PEFT files or one archive)")
async def upload_adapter(request: Request) -> AdapterObject:
    engine, settings = request.app.state.engine, request.app.state.settings
    try:
        upload = await read_upload(request, settings.max_adapter_bytes, engine.base_name)
    except ApiError as exc:
        raise _counted(request, "upload", exc) from None
    request.scope.setdefault("loraplex", {})["model"] = upload.name
    info = await _engine_call(request, "upload", engine.add_adapter, upload.name, upload.config, upload.weights,
                              upload.overwrite)
    log.info("adapter %s version %s registered (%d bytes)", info.name, info.version, info.size_bytes)
    return _adapter(request, info)


@router.get("/adapters", response_model=AdapterList, summary="List adapters with status, tier and usage")
async def list_adapters(request: Request) -> AdapterList:
    adapters = await asyncio.to_thread(request.app.state.engine.list_adapters)
    return AdapterList(data=[_adapter(request, a) for a in adapters])


@router.get("/adapters/{name}", response_model=AdapterObject, responses={404: {"description": "unknown adapter"}},
            summary="One adapter: rank, alpha, targets, size, version, status, tier, usage")
async def get_adapter(name: str, request: Request) -> AdapterObject:
    return _adapter(request, await asyncio.to_thread(request.app.state.engine.adapter_info, name))


async def _delete(request: Request, name: str, operation: str, param: str) -> None:
    engine = request.app.state.engine
    if name == engine.base_name:
        raise _counted(request, operation, ApiError(400, "the base model cannot be deleted", param=param,
                                                    code="invalid_value"))
    request.scope.setdefault("loraplex", {})["model"] = name
    await _engine_call(request, operation, engine.delete_adapter, name)
    request.app.state.metrics.forget_model(name)
    log.info("adapter %s deleted", name)


@router.delete("/adapters/{name}", response_model=AdapterDeleted, responses={404: {"description": "unknown adapter"}},
               summary="Unregister an adapter and remove it from the store")
async def delete_adapter(name: str, request: Request) -> AdapterDeleted:
    await _delete(request, name, "delete", "name")
    return AdapterDeleted(id=name)


@router.post("/load_lora_adapter", response_class=PlainTextResponse,
             responses={403: {"description": "path outside --allowed-adapter-root, or no root configured"}},
             summary="vLLM alias: register the adapter folder at lora_path under lora_name")
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    engine, settings = request.app.state.engine, request.app.state.settings
    try:
        name = validate_name(body.lora_name, engine.base_name, param="lora_name")
        config, weights = await asyncio.to_thread(read_adapter_folder, body.lora_path,
                                                  settings.allowed_adapter_root, settings.max_adapter_bytes)
        check_safetensors(weights, "adapter_model.safetensors")
    except ApiError as exc:
        raise _counted(request, "load", exc) from None
    request.scope.setdefault("loraplex", {})["model"] = name
    await _engine_call(request, "load", engine.add_adapter, name, config, weights, body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM alias: unregister the adapter lora_name (same as DELETE /v1/adapters/{name})")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    await _delete(request, body.lora_name, "unload", "lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
