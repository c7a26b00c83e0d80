"""Alembic migrations: they build exactly the tables the ORM declares, and they go both ways."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.core.db import make_engine
from app.db.migrate import alembic_config, upgrade_to_head
from app.db.tables import Base


def test_migrations_match_the_tables_and_downgrade_cleanly(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    command.downgrade(alembic_config(url), "base")
    upgrade_to_head(url)
    engine.dispose()
