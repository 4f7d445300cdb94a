"""Adapter admin: upload, list, inspect, delete, and vLLM's load/unload aliases.

Every route needs the admin token. Uploads are parsed and bounded here (`uploads.py`,
`archives.py`) and streamed to temporary files; the engine then validates the adapter
against the base model and writes it to the store atomically, and the temporary files are
removed whatever happened. At most `--max-concurrent-uploads` run at once (429 beyond).
Engine calls run on the low-priority admin pool (`background.py`), so streams in flight keep
flowing meanwhile. The
admin token is checked by `auth.AuthGate` before any of this runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from server.adapters.names import WEIGHTS_FILE
from server.api.admin_schemas import (
    UPLOAD_OPENAPI,
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from server.api.errors import ApiError, engine_status
from server.api.folders import copy_adapter_folder, read_contract, resolve_under_root
from server.api.uploads import Upload, check_safetensors, read_upload, validate_name
from server.engine.request import AdapterExistsError, EngineError, UnknownModelError

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "invalid upload or adapter"}, 401: {"description": "missing or wrong admin token"},
          403: {"description": "admin routes disabled (no admin token configured)"},
          503: {"description": "engine not ready, or shutting down"}}
UPLOAD_RETRY_AFTER = 5
router = APIRouter(prefix="/v1", tags=["adapters"], responses=ERRORS)


async def _engine_call(request: Request, operation: str, func: Callable[..., Any], *args: Any) -> Any:
    metrics = request.app.state.metrics
    try:
        result = await request.app.state.background.run(func, *args)
    except EngineError as exc:
        metrics.adapter_admin.labels(operation, str(engine_status(exc))).inc()
        raise
    metrics.adapter_admin.labels(operation, "ok").inc()
    return result


def _adapter(request: Request, info: Any) -> AdapterObject:
    return AdapterObject.from_info(info, request.app.state.engine.base_name)


def _counted(request: Request, operation: str, exc: ApiError) -> ApiError:
    request.app.state.metrics.adapter_admin.labels(operation, str(exc.status)).inc()
    return exc


@router.post("/adapters", status_code=201, response_model=AdapterObject, openapi_extra=UPLOAD_OPENAPI,
             responses={408: {"description": "the client stopped sending (--upload-read-timeout)"},
                        409: {"description": "name taken (send overwrite=true)"},
                        413: {"description": "upload over --max-adapter-bytes"},
                        429: {"description": "too many uploads at once (--max-concurrent-uploads); see Retry-After"}},
             summary="Upload an adapter (multipart: name, overwrite, the two PEFT files or one archive)")
async def upload_adapter(request: Request) -> AdapterObject:
    engine, settings = request.app.state.engine, request.app.state.settings
    slots = request.app.state.upload_slots
    if not slots.try_acquire():
        raise _counted(request, "upload", ApiError(
            429, f"{slots.limit} uploads are in progress (--max-concurrent-uploads); retry later",
            code="too_many_uploads", headers={"Retry-After": str(UPLOAD_RETRY_AFTER), "Connection": "close"}))
    try:
        try:
            upload = await read_upload(request, request.app.state.background, settings.max_adapter_bytes,
                                       engine.base_name, settings.upload_read_timeout, settings.upload_tmp_dir)
        except ApiError as exc:
            raise _counted(request, "upload", exc) from None
        return await _register(request, upload, "upload")
    finally:
        slots.release()


async def _register(request: Request, upload: Upload, operation: str) -> AdapterObject:
    """Hand the upload to the engine, then remove its temporary files whatever happened.

    If this task is cancelled (shutdown grace over) while the engine still reads the file,
    the files are removed when the engine call returns, not under its feet.
    """
    engine = request.app.state.engine
    request.scope.setdefault("loraplex", {})["model"] = upload.name
    call = asyncio.ensure_future(_engine_call(request, operation, engine.add_adapter, upload.name, upload.config,
                                              upload.weights_path, upload.overwrite, upload.contract))
    try:
        info = await asyncio.shield(call)
    finally:
        if call.done():
            await request.app.state.background.run(upload.cleanup)
        else:
            call.add_done_callback(lambda _: upload.cleanup())
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


@router.patch("/adapters/{name}", response_model=AdapterObject, responses={404: {"description": "unknown adapter"}},
              summary="Edit the adapter's contract (loraplex.json, a JSON merge patch): a new version, same weights")
async def patch_adapter(name: str, body: dict[str, Any], request: Request) -> AdapterObject:
    request.scope.setdefault("loraplex", {})["model"] = name
    info = await _engine_call(request, "patch", request.app.state.engine.patch_contract, name, body)
    log.info("adapter %s contract edited: version %s", info.name, info.version)
    return _adapter(request, info)


async def _delete(request: Request, name: str, operation: str, param: str) -> None:
    engine = request.app.state.engine
    if name == engine.base_name:
        raise _counted(request, operation, ApiError(400, "the base model cannot be deleted", param=param,
                                                    code="invalid_value"))
    request.scope.setdefault("loraplex", {})["model"] = name
    await _engine_call(request, operation, engine.delete_adapter, name)
    request.app.state.metrics.forget_model(name)
    log.info("adapter %s deleted", name)


@router.delete("/adapters/{name}", response_model=AdapterDeleted,
               responses={404: {"description": "unknown adapter"},
                          403: {"description": "a shipped adapter in the default store (read-only)"}},
               summary="Unregister an adapter and remove it from the store")
async def delete_adapter(name: str, request: Request) -> AdapterDeleted:
    await _delete(request, name, "delete", "name")
    return AdapterDeleted(id=name)


def _own_store_folder(request: Request, name: str, lora_path: str) -> bool:
    """Whether `lora_path` (absolute, or relative to the server's folder or the allowed root) is the store's
    own folder for `name`: loading it registers the files in place (after an unload) instead of copying."""
    engine, root = request.app.state.engine, request.app.state.settings.allowed_adapter_root
    if not lora_path or "\x00" in lora_path or not hasattr(engine, "adapter_folder"):
        return False
    try:
        own = engine.adapter_folder(name).resolve()
        candidates = [Path(lora_path)] + ([root / lora_path] if root is not None else [])
        return any(c.resolve() == own for c in candidates) and own.is_dir()
    except (OSError, RuntimeError, ValueError):
        return False


def _already_loaded(name: str) -> ApiError:
    # vLLM's answer to the same call (400, and the field that replaces it).
    return ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                    "place, set 'load_inplace' to true.", code="adapter_exists", param="lora_name")


@router.post("/load_lora_adapter", response_class=PlainTextResponse,
             responses={403: {"description": "path outside --allowed-adapter-root, or no root configured"},
                        404: {"description": "no adapter folder at lora_path"}},
             summary="vLLM alias: register the adapter folder at lora_path under lora_name")
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    engine, settings = request.app.state.engine, request.app.state.settings
    success = PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")
    try:
        name = validate_name(body.lora_name, engine.base_name, param="lora_name")
        registered = any(a.name == name for a in await asyncio.to_thread(engine.list_adapters))
        if registered and not body.load_inplace:
            raise _already_loaded(name)
    except ApiError as exc:
        raise _counted(request, "load", exc) from None
    request.scope.setdefault("loraplex", {})["model"] = name
    if _own_store_folder(request, name, body.lora_path):
        if not registered:  # unloaded earlier: its files are still in the store
            info = await _engine_call(request, "load", engine.reload_adapter, name)
            log.info("adapter %s version %s registered again from the store", info.name, info.version)
        return success
    try:
        config, weights, workdir = await request.app.state.background.run(
            copy_adapter_folder, body.lora_path, settings.allowed_adapter_root, settings.max_adapter_bytes,
            settings.upload_tmp_dir)
    except ApiError as exc:
        raise _counted(request, "load", exc) from None
    upload = Upload(name=name, overwrite=body.load_inplace, config=config, weights_path=weights, workdir=workdir)
    try:
        folder = resolve_under_root(body.lora_path, settings.allowed_adapter_root)
        upload.contract = await request.app.state.background.run(read_contract, folder)
    except ApiError as exc:
        await request.app.state.background.run(upload.cleanup)
        raise _counted(request, "load", exc) from None
    try:
        check_safetensors(weights, WEIGHTS_FILE)
    except ApiError as exc:
        await request.app.state.background.run(upload.cleanup)
        raise _counted(request, "load", exc) from None
    try:
        await _register(request, upload, "load")
    except AdapterExistsError:  # registered meanwhile by another call
        raise _already_loaded(name) from None
    return success


@router.post("/unload_lora_adapter", response_class=PlainTextResponse,
             responses={404: {"description": "unknown adapter"}},
             summary="vLLM alias: unregister the adapter lora_name; its files stay in the store")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    engine, name = request.app.state.engine, body.lora_name
    if name == engine.base_name:
        raise _counted(request, "unload", ApiError(400, "the base model cannot be unloaded", param="lora_name",
                                                   code="invalid_value"))
    try:  # the same checks as load: a name no load could have registered is a 400, not a 404
        validate_name(name, engine.base_name, param="lora_name")
    except ApiError as exc:
        raise _counted(request, "unload", exc) from None
    request.scope.setdefault("loraplex", {})["model"] = name
    try:
        await _engine_call(request, "unload", engine.unload_adapter, name)
    except UnknownModelError:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", code="model_not_found",
                       param="lora_name") from None
    request.app.state.metrics.forget_model(name)
    log.info("adapter %s unloaded (its files stay in the store)", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
