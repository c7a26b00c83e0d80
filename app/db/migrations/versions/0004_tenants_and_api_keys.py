"""tenants and api keys; every dataset, job, sweep, model and alias belongs to a tenant

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 16:16:47.136371
"""
import secrets

import sqlalchemy as sa
from alembic import op

import app.db.tables

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

OWNED = ('datasets', 'jobs', 'models', 'sweeps')


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('max_stored_bytes', sa.BigInteger(), nullable=True),
    sa.Column('max_concurrent_jobs', sa.Integer(), nullable=True),
    sa.Column('max_models', sa.Integer(), nullable=True),
    sa.Column('created_at', app.db.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('usage_checked_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('prefix', sa.String(length=20), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', app.db.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('prefix')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)

    # Data from before tenancy goes to a tenant named "default" (the one `visiontune up` uses).
    connection = op.get_bind()
    existing = any(connection.execute(sa.text(f'SELECT 1 FROM {table} LIMIT 1')).first() for table in OWNED)
    tenant_id = f'tn_{secrets.token_hex(12)}'
    if existing:
        connection.execute(
            sa.text("INSERT INTO tenants (id, name, created_at) VALUES (:id, 'default', CURRENT_TIMESTAMP)"),
            {'id': tenant_id},
        )
    for table in OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('tenant_id', sa.String(length=40), nullable=True))
        op.execute(sa.text(f'UPDATE {table} SET tenant_id = :id').bindparams(id=tenant_id))
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('tenant_id', existing_type=sa.String(length=40), nullable=False)
            batch_op.create_index(batch_op.f(f'ix_{table}_tenant_id'), ['tenant_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_tenant_id', 'tenants', ['tenant_id'], ['id'], ondelete='RESTRICT')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_name_version', type_='unique')
        batch_op.create_unique_constraint('uq_models_tenant_name_version', ['tenant_id', 'name', 'version'])

    # model_aliases gets tenant_id in its primary key: a new table, rows copied over.
    op.create_table('model_aliases_new',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', app.db.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'name', 'alias')
    )
    op.execute('INSERT INTO model_aliases_new (tenant_id, name, alias, model_id, updated_at) '
               'SELECT models.tenant_id, a.name, a.alias, a.model_id, a.updated_at '
               'FROM model_aliases a JOIN models ON models.id = a.model_id')
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.drop_index('ix_model_aliases_model_id')
    op.drop_table('model_aliases')
    op.rename_table('model_aliases_new', 'model_aliases')
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_aliases_model_id'), ['model_id'], unique=False)


def downgrade() -> None:
    op.create_table('model_aliases_old',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('name', 'alias')
    )
    # Names were unique per tenant; without tenants one tenant's alias of a name is kept.
    op.execute('INSERT INTO model_aliases_old (name, alias, model_id, updated_at) '
               'SELECT name, alias, MIN(model_id), MAX(updated_at) FROM model_aliases GROUP BY name, alias')
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.drop_index('ix_model_aliases_model_id')
    op.drop_table('model_aliases')
    op.rename_table('model_aliases_old', 'model_aliases')
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_aliases_model_id'), ['model_id'], unique=False)

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_tenant_name_version', type_='unique')
        batch_op.create_unique_constraint('uq_models_name_version', ['name', 'version'])
    for table in OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f'fk_{table}_tenant_id', type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_tenant_id'))
            batch_op.drop_column('tenant_id')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))
    op.drop_table('api_keys')
    op.drop_table('tenants')
