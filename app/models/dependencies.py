"""`ModelDep`: the model a path's `{model_id}` names (an id, `name@version` or `name@alias`),
resolved within the caller's tenant, for the registry's routes; `ServedModelDep`, the same for
predictions, from this API process's memory of recent lookups (`app.state.model_lookup`)."""

from typing import Annotated

from fastapi import Depends, Request

from app.core.auth import AnyKey
from app.core.db import new_session
from app.core.ids import ModelRef
from app.db.tables import Model
from app.models import service


def find_model(tenant_id: str, model_id: str) -> Model:
    # A session of its own, closed at once: a prediction must not hold a database connection
    # while it waits for its forward pass (16 waiting requests would drain the pool).
    with new_session() as session:
        return service.get_model(session, tenant_id, model_id)


def _model(model_id: ModelRef, principal: AnyKey) -> Model:
    return find_model(principal.tenant_id, model_id)


async def _served_model(model_id: ModelRef, principal: AnyKey, request: Request) -> Model:
    return await request.app.state.model_lookup(principal.tenant_id, model_id)


ModelDep = Annotated[Model, Depends(_model)]
ServedModelDep = Annotated[Model, Depends(_served_model)]
