from alembic import context

from app.core.db import make_engine
from app.db.tables import Base

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode copies a table and drops the original, which SQLite's foreign-key
            # enforcement refuses while other tables point at it (Alembic's documented advice:
            # turn enforcement off for the migration; it is on again for every new connection).
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        # render_as_batch: SQLite can only change tables by copying them.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
