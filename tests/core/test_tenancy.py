"""Tenant scoping is structural: every domain reads its objects through app.core.tenancy."""

import re
from pathlib import Path

import pytest

from app.core.errors import NotFound

APP = Path(__file__).resolve().parents[2] / "app"
TENANT_TABLES = ("Dataset", "Job", "Model", "ModelAlias", "Sweep")


def test_a_foreign_id_and_a_missing_id_give_the_same_404(client):
    """Rows written straight to the real database (the cross-tenant suite in tests/tenants does the
    same over HTTP with real uploads)."""
    from app.cli import create_key
    from app.core.db import new_session
    from app.core.tenancy import Scoped
    from app.db.tables import Dataset, Tenant

    create_key("other", ["read"], "tests")  # a second tenant
    with new_session() as session:
        tenants = {t.name: t.id for t in session.query(Tenant)}
        for name, tenant_id in tenants.items():
            session.add(Dataset(id=f"ds_{name}", tenant_id=tenant_id, name=name, status="ready", num_images=0,
                                classes=[], has_val_split=False, sha256="0" * 64, size_bytes=0, warnings=[]))  # fmt: skip
        session.commit()
        datasets = Scoped(Dataset, "dataset")
        assert datasets.get(session, tenants["default"], "ds_default").name == "default"
        assert [d.id for d in datasets.list(session, tenants["default"], 10)] == ["ds_default"]
        for ref in ("ds_other", "ds_missing"):
            with pytest.raises(NotFound) as refused:
                datasets.get(session, tenants["default"], ref)
            assert refused.value.code == "dataset_not_found" and refused.value.message == f"Dataset '{ref}' not found."


def test_no_router_or_service_reads_a_tenant_table_by_primary_key():
    """`session.get(Job, id)` skips the tenant filter: routers and services must use a `Scoped`
    table instead. (The worker's runner acts on the job id its message names, and is exempt.)"""
    pattern = re.compile(rf"session\.get\(\s*({'|'.join(TENANT_TABLES)})\b")
    offenders = [
        f"{path.relative_to(APP)}:{number}"
        for path in APP.rglob("*.py")
        if path.name in ("router.py", "service.py", "dependencies.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
