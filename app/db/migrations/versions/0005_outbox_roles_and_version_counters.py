"""outbox dispatch times, sweeper leases, model version counters, operator scope

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 06:20:00
"""
import sqlalchemy as sa
from alembic import op

import app.db.tables

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', app.db.tables.UTCDateTime(), nullable=True))
    # Jobs queued before this revision were sent when they were created.
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE status = 'queued'")

    op.create_table('leases',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('holder', sa.String(length=300), nullable=False),
    sa.Column('expires_at', app.db.tables.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('model_names',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('last_version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'name')
    )
    op.execute(
        "INSERT INTO model_names (tenant_id, name, last_version) "
        "SELECT tenant_id, name, MAX(version) FROM models GROUP BY tenant_id, name"
    )

    # `admin` used to be the platform's superuser; it now means a tenant's own administrator, and
    # the platform role is `operator`. The first key of tenant "default" (the one `visiontune up`
    # printed) keeps its meaning: it becomes an operator too. Other admin keys become tenant admins.
    keys = sa.table('api_keys', sa.column('id', sa.String), sa.column('tenant_id', sa.String),
                    sa.column('scopes', sa.JSON), sa.column('created_at', sa.DateTime))
    tenants = sa.table('tenants', sa.column('id', sa.String), sa.column('name', sa.String))
    connection = op.get_bind()
    first = connection.execute(
        sa.select(keys.c.id, keys.c.scopes).join(tenants, tenants.c.id == keys.c.tenant_id)
        .where(tenants.c.name == 'default').order_by(keys.c.created_at).limit(1)
    ).first()
    if first is not None and "admin" in first.scopes and "operator" not in first.scopes:
        connection.execute(keys.update().where(keys.c.id == first.id).values(scopes=sorted([*first.scopes, "operator"])))


def downgrade() -> None:
    op.drop_table('model_names')
    op.drop_table('leases')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('dispatched_at')
