"""Alembic migrations: they build exactly the tables the ORM declares, on SQLite and PostgreSQL,
and they go both ways."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.core.db import make_engine
from app.db.migrate import alembic_config, upgrade_to_head
from app.db.tables import Base
from tests.conftest import BOTH_DATABASES


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_migrations_match_the_tables_and_downgrade_cleanly(tmp_path, database_url):
    url = database_url or f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    command.downgrade(alembic_config(url), "base")
    upgrade_to_head(url)
    engine.dispose()


def test_data_from_before_tenancy_moves_to_the_default_tenant(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command.upgrade(alembic_config(url), "0003")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO datasets (id, name, status, num_images, classes, has_val_split, sha256, size_bytes, warnings, created_at) "
            "VALUES ('ds_1', 'old', 'ready', 10, '[]', 0, 'x', 5, '[]', CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO jobs (id, dataset_id, backbone, strategy, pretrained, hyperparameters, seed, status, epoch, "
            "metrics, attempts, created_at) VALUES ('job_1', 'ds_1', 'b', 'full', 1, '{}', 0, 'succeeded', 1, '{}', 1, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO models (id, name, version, job_id, dataset_id, backbone, classes, metrics, preprocessing, size_bytes, "
            "created_at) VALUES ('model_1', 'pets', 1, 'job_1', 'ds_1', 'b', '[]', '{}', '{}', 7, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO model_aliases (name, alias, model_id, updated_at) VALUES ('pets', 'production', 'model_1', CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    upgrade_to_head(url)
    with engine.connect() as connection:
        (tenant_id,) = connection.execute(text("SELECT id FROM tenants WHERE name = 'default'")).one()
        for table in ("datasets", "jobs", "models", "model_aliases"):
            assert connection.execute(text(f"SELECT DISTINCT tenant_id FROM {table}")).scalars().all() == [tenant_id]
    command.downgrade(alembic_config(url), "0003")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT model_id FROM model_aliases")).scalars().all() == ["model_1"]
    engine.dispose()


def test_the_first_admin_key_stays_an_operator_and_version_numbers_carry_on(tmp_path):
    """Before 0005 `admin` was the platform's superuser: the key `visiontune up` printed keeps that
    meaning (it gains `operator`); every other admin key becomes its tenant's own admin."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command.upgrade(alembic_config(url), "0004")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, name, created_at) VALUES "
                                "('tn_d', 'default', CURRENT_TIMESTAMP), ('tn_a', 'acme', CURRENT_TIMESTAMP)"))  # fmt: skip
        for key_id, tenant, created in (("key_1", "tn_d", "2026-01-01"), ("key_2", "tn_d", "2026-01-02"),
                                        ("key_3", "tn_a", "2025-12-01")):  # fmt: skip
            connection.execute(text(
                "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, scopes, created_at) "
                f"VALUES ('{key_id}', '{tenant}', '', '{key_id}', 'h', '[\"admin\"]', '{created}')"
            ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO jobs (id, tenant_id, backbone, strategy, pretrained, hyperparameters, seed, status, epoch, "
            "metrics, attempts, created_at) VALUES ('job_1', 'tn_a', 'b', 'full', 1, '{}', 0, 'succeeded', 1, '{}', 1, "
            "CURRENT_TIMESTAMP), ('job_2', 'tn_a', 'b', 'full', 1, '{}', 0, 'queued', 0, '{}', 0, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO models (id, tenant_id, name, version, job_id, dataset_id, backbone, classes, metrics, "
            "preprocessing, size_bytes, created_at) VALUES ('model_1', 'tn_a', 'pets', 3, 'job_1', 'ds_1', 'b', '[]', "
            "'{}', '{}', 7, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    upgrade_to_head(url)
    with engine.connect() as connection:
        scopes = dict(connection.execute(text("SELECT id, scopes FROM api_keys")).all())
        assert scopes == {"key_1": '["admin", "operator"]', "key_2": '["admin"]', "key_3": '["admin"]'}
        assert connection.execute(text("SELECT tenant_id, name, last_version FROM model_names")).all() == [("tn_a", "pets", 3)]
        dispatched = dict(connection.execute(text("SELECT id, dispatched_at IS NOT NULL FROM jobs")).all())
        assert dispatched == {"job_1": 0, "job_2": 1}  # the queued job counts as sent when it was created
    engine.dispose()
