from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.concurrency import run_in_threadpool

from app.core.auth import AnyKey, ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import SweepId
from app.core.pagination import PageDep
from app.db.tables import Sweep
from app.jobs import service as jobs
from app.jobs.schemas import JobOut
from app.sweeps import service
from app.sweeps.schemas import Promote, SweepCreate, SweepList, SweepOut

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


def _sweep(sweep_id: SweepId, principal: AnyKey, session: SessionDep) -> Sweep:
    return service.get_sweep(session, principal.tenant_id, sweep_id)


SweepDep = Annotated[Sweep, Depends(_sweep)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=SweepOut)
async def create_sweep(request: SweepCreate, principal: TrainKey, session: SessionDep) -> SweepOut:
    sweep = await run_in_threadpool(service.create_sweep, session, get_settings(), principal.tenant_id, request)
    return service.to_out(session, sweep)


@router.get("", response_model=SweepList)
def list_sweeps(principal: ReadKey, session: SessionDep, page: PageDep) -> SweepList:
    sweeps = service.list_sweeps(session, principal.tenant_id, page.limit, page.after)
    return SweepList(data=[service.to_out(session, sweep) for sweep in sweeps])


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep: SweepDep, _: ReadKey, session: SessionDep) -> SweepOut:
    return service.to_out(session, sweep)


@router.post("/{sweep_id}/promote", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
async def promote(sweep: SweepDep, request: Promote, _: TrainKey, session: SessionDep) -> JobOut:
    job = await run_in_threadpool(service.promote, session, get_settings(), sweep, request)
    return jobs.to_out(session, job)
