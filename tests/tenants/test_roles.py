"""Two roles: the platform operator (tenants, quotas, anyone's keys) and a tenant's own admin
(its own keys; its quotas to read, never to raise). A tenant admin reaches no /v1/admin operation,
on another tenant or on its own, and nothing changes when it tries."""

import re

import pytest

from app.cli import main as cli
from tests.conftest import BOTH_DATABASES

# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)


def tenant_with_key(client, name: str, scopes: list[str]) -> tuple[dict, dict, str]:
    tenant = client.post("/v1/admin/tenants", json={"name": name, "max_models": 5}).json()
    key = client.post(f"/v1/admin/tenants/{tenant['id']}/keys", json={"name": name, "scopes": scopes}).json()
    return tenant, {"Authorization": f"Bearer {key['key']}"}, key["id"]


def state(client, tenant_ids: list[str]) -> list:
    """Everything an /v1/admin call could change, as the operator sees it (a key's last use aside:
    trying is using)."""
    keys = [[{**k, "last_used_at": None} for k in client.get(f"/v1/admin/tenants/{t}/keys").json()["data"]]
            for t in tenant_ids]  # fmt: skip
    return [client.get(f"/v1/admin/tenants/{t}").json() for t in tenant_ids] + keys


def test_a_tenant_admin_reaches_no_admin_operation_on_another_tenant_or_its_own(client):
    alpha, alpha_admin, alpha_key = tenant_with_key(client, "alpha", ["admin"])
    beta, _, beta_key = tenant_with_key(client, "beta", ["admin"])
    before = state(client, [alpha["id"], beta["id"]])
    values = {"tenant_id": None, "key_id": None}
    bodies = {"post": {"name": "x", "scopes": ["operator"]}, "patch": {"max_models": 1000}}

    tried = set()
    for template, operations in client.app.openapi()["paths"].items():
        if not template.startswith("/v1/admin"):
            continue
        for method in operations:
            for tenant_id, key_id in ((beta["id"], beta_key), (alpha["id"], alpha_key)):
                values.update(tenant_id=tenant_id, key_id=key_id)
                url = re.sub(r"{(\w+)}", lambda m: values[m.group(1)], template)
                body = {"name": "gamma"} if template == "/v1/admin/tenants" else bodies.get(method)
                response = client.request(method, url, headers=alpha_admin, json=body)
                assert response.status_code == 403, (method, url, response.text)
                assert response.json()["error"]["code"] == "insufficient_scope"
                tried.add((method, template))
    assert len(tried) == 7  # every /v1/admin operation there is
    assert state(client, [alpha["id"], beta["id"]]) == before  # nothing changed
    assert client.get("/v1/admin/tenants").json()["data"][-1]["name"] == "beta"  # no tenant "gamma"


def test_a_tenant_admin_manages_its_own_keys_only_and_reads_its_quotas(client):
    alpha, alpha_admin, _ = tenant_with_key(client, "alpha", ["admin"])
    beta, _, beta_key = tenant_with_key(client, "beta", ["admin"])

    me = client.get("/v1/me", headers=alpha_admin).json()
    assert me["tenant"]["id"] == alpha["id"] and me["tenant"]["limits"]["max_models"] == 5

    reader = client.post("/v1/keys", headers=alpha_admin, json={"name": "reader", "scopes": ["read"]})
    assert reader.status_code == 201 and reader.json()["tenant_id"] == alpha["id"] and reader.json()["scopes"] == ["read"]
    escalate = client.post("/v1/keys", headers=alpha_admin, json={"name": "up", "scopes": ["admin", "operator"]})
    assert escalate.status_code == 403 and escalate.json()["error"]["code"] == "scope_not_grantable"
    assert {k["tenant_id"] for k in client.get("/v1/keys", headers=alpha_admin).json()["data"]} == {alpha["id"]}

    foreign = client.delete(f"/v1/keys/{beta_key}", headers=alpha_admin)
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "key_not_found"
    assert client.get(f"/v1/admin/tenants/{beta['id']}/keys").json()["data"][0]["revoked_at"] is None
    revoked = client.delete(f"/v1/keys/{reader.json()['id']}", headers=alpha_admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    reader_headers = {"Authorization": f"Bearer {reader.json()['key']}"}
    assert client.get("/v1/me", headers=reader_headers).status_code == 401

    # The operator can do what the tenant admin could not.
    raised = client.patch(f"/v1/admin/tenants/{alpha['id']}", json={"max_models": 50})
    assert raised.status_code == 200 and raised.json()["limits"]["max_models"] == 50


@pytest.mark.parametrize(("flags", "expected"), [([], ["admin"]), (["--operator"], ["admin", "operator"])])
def test_keys_made_on_the_server_are_tenant_admins_unless_operator_is_asked_for(client, capsys, flags, expected):
    cli(["keys", "create", "--tenant", "acme", *flags])
    key = capsys.readouterr().out.strip()
    me = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).json()
    assert me["tenant"]["name"] == "acme" and sorted(me["key"]["scopes"]) == expected
    admin_call = client.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {key}"})
    assert admin_call.status_code == (200 if "operator" in expected else 403)
