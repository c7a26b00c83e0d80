"""`ModelDep`: the model a path's `{model_id}` names (an id, `name@version` or `name@alias`),
resolved within the caller's tenant, for the registry's and the serving routes alike."""

from typing import Annotated

from fastapi import Depends

from app.core.auth import AnyKey
from app.core.db import new_session
from app.core.ids import ModelRef
from app.db.tables import Model
from app.models import service


def _model(model_id: ModelRef, principal: AnyKey) -> Model:
    # A session of its own, closed at once: a prediction must not hold a database connection
    # while it waits for its forward pass (16 waiting requests would drain the pool).
    with new_session() as session:
        return service.get_model(session, principal.tenant_id, model_id)


ModelDep = Annotated[Model, Depends(_model)]
