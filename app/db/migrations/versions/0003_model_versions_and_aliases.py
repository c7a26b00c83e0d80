"""model versions and aliases

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 15:18:58.486999
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_aliases',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('name', 'alias')
    )
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_aliases_model_id'), ['model_id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_name', sa.String(length=100), nullable=True))

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('version', sa.Integer(), nullable=True))
    # Models from before versioning: each is version 1 of a name of its own.
    op.execute("UPDATE models SET name = id, version = 1")
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.alter_column('name', existing_type=sa.String(length=100), nullable=False)
        batch_op.alter_column('version', existing_type=sa.Integer(), nullable=False)
        batch_op.create_index(batch_op.f('ix_models_name'), ['name'], unique=False)
        batch_op.create_unique_constraint('uq_models_name_version', ['name', 'version'])



def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_name_version', type_='unique')
        batch_op.drop_index(batch_op.f('ix_models_name'))
        batch_op.drop_column('version')
        batch_op.drop_column('name')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('model_name')

    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_aliases_model_id'))

    op.drop_table('model_aliases')
