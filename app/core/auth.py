"""Who is calling: `Authorization: Bearer <key>` on every /v1 request, and the scope each endpoint
needs. Routers take a `*Key` dependency; every object lookup then filters by `principal.tenant_id`,
so another tenant's ids answer 404 exactly like ids that do not exist."""

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.db import new_session
from app.core.errors import Forbidden, Unauthorized
from app.tenants.service import Principal, authenticate

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer vt_...`.")


def authenticated(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    if credentials is None:
        raise Unauthorized("Send an API key: `Authorization: Bearer <key>`.", code="missing_api_key")
    # A session of its own, closed at once (see app.models.router._model).
    with new_session() as session:
        return authenticate(session, credentials.credentials)


def _require(scope: str):
    # async: a check this cheap should not take a trip through the thread pool on every request
    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.allows(scope):
            raise Forbidden(f"This API key lacks the '{scope}' scope this endpoint needs.")
        return principal

    return check


ReadKey = Annotated[Principal, Depends(_require("read"))]
TrainKey = Annotated[Principal, Depends(_require("train"))]
PredictKey = Annotated[Principal, Depends(_require("predict"))]
AdminKey = Annotated[Principal, Depends(_require("admin"))]
AnyKey = Annotated[Principal, Depends(authenticated)]
