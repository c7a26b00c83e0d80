"""Who is calling: `Authorization: Bearer <key>` on every /v1 request, and the scope each endpoint
needs. Routers take a `*Key` dependency and pass `principal.tenant_id` to the services, whose
reads all go through `app.core.tenancy`, so another tenant's ids answer 404 exactly like ids that
do not exist.

Core knows nothing of where keys are stored: the app installs a `KeyLookup` (the tenants domain's,
answered from memory for `lookup_cache_seconds`: `app.core.lookups`) as `app.state.key_lookup`
when it is created.
"""

from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant and scopes.

    Two roles, never confused: `admin` is a tenant's own administrator (every scope within its
    tenant, and its own keys); `operator` runs the platform (tenants, quotas, anyone's keys) and
    is only ever granted explicitly, never implied by another scope.
    """

    tenant_id: str
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or (scope != "operator" and "admin" in self.scopes)


class KeyLookup(Protocol):
    async def __call__(self, key: str) -> Principal:
        """The principal of a key; raises Unauthorized for an unknown or revoked one."""


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer vt_...`.")


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if credentials is None:
        raise Unauthorized("Send an API key: `Authorization: Bearer <key>`.", code="missing_api_key")
    lookup: KeyLookup = request.app.state.key_lookup
    return await lookup(credentials.credentials)


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
OperatorKey = Annotated[Principal, Depends(_require("operator"))]
AnyKey = Annotated[Principal, Depends(authenticated)]
