from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from app.backbones import service
from app.backbones.schemas import BackboneList
from app.core.auth import ReadKey
from app.core.config import get_settings

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("", response_model=BackboneList)
async def list_backbones(
    _: ReadKey,
    search: Annotated[str | None, Query(max_length=100, description="Substring of a timm architecture name")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    pretrained_here: Annotated[
        bool, Query(description="Only those whose pretrained weights are on this server (what training can start from).")
    ] = False,
) -> BackboneList:
    total, items = await run_in_threadpool(service.list_backbones, get_settings(), search, limit, offset, pretrained_here)
    return BackboneList(total=total, data=items)
