"""POST/GET/DELETE /adapters: management, behind the admin token."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.auth import require_admin
from service.protocol import APIError
from service.registry import AdapterRecord

router = APIRouter(prefix="/adapters", tags=["management"], dependencies=[Depends(require_admin)])


@router.post(
    "",
    status_code=201,
    response_model=AdapterRecord,
    responses={202: {"model": AdapterRecord, "description": "accepted; merging (?wait=false)"}},
)
async def upload_adapter(request: Request, wait: bool = True, replace: bool = False):
    record = await request.app.state.adapters.upload(request, wait=wait, replace=replace)
    status = 201 if record.status == "ready" else 202
    return JSONResponse(
        record.model_dump(mode="json"), status_code=status, headers={"Location": f"/adapters/{record.name}"}
    )


@router.get("")
async def list_adapters(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.adapters.registry.all_latest()}


@router.get("/{name}")
async def get_adapter(name: str, request: Request) -> AdapterRecord:
    record = request.app.state.adapters.registry.latest(name)
    if record is None:
        raise APIError(404, f"adapter {name!r} does not exist", param="name", code="adapter_not_found")
    return record


@router.delete("/{name}", status_code=204)
async def delete_adapter(name: str, request: Request) -> Response:
    await request.app.state.adapters.delete(name)
    return Response(status_code=204)
