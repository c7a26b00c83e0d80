"""models of auto jobs

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-25 04:45:00

A model records the strategy that trained it. An `auto` job may now make two models: the requested
backbone's linear probe, served while its search goes on, and the winner if another candidate beat
it. One model per job becomes one per (job, backbone, strategy). Existing models take their job's
strategy.
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('strategy', sa.String(length=20), nullable=True))
    op.execute("UPDATE models SET strategy = (SELECT jobs.strategy FROM jobs WHERE jobs.id = models.job_id)")
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.alter_column('strategy', existing_type=sa.String(length=20), nullable=False)
        batch_op.drop_constraint('uq_models_job_id', type_='unique')
        batch_op.create_unique_constraint('uq_models_job_backbone_strategy', ['job_id', 'backbone', 'strategy'])


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_job_backbone_strategy', type_='unique')
        batch_op.create_unique_constraint('uq_models_job_id', ['job_id'])
        batch_op.drop_column('strategy')
