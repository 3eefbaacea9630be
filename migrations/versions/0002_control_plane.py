"""control plane: worker topic/mode, lease hand-over columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('workers', sa.Column('topic', sa.String(length=249), nullable=True))
    op.add_column('workers', sa.Column('follows_leases', sa.Boolean(), server_default='false', nullable=False))
    op.add_column('partition_leases', sa.Column('next_worker_id', sa.String(length=128), nullable=True))
    op.add_column('partition_leases', sa.Column('handover_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('partition_leases', sa.Column('hot_tenants', postgresql.JSONB(astext_type=sa.Text()),
                                                server_default='[]', nullable=False))
    op.add_column('partition_leases', sa.Column('assigned_at', sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(op.f('fk_partition_leases_next_worker_id_workers'), 'partition_leases', 'workers',
                          ['next_worker_id'], ['worker_id'], ondelete='SET NULL')


def downgrade() -> None:
    op.drop_constraint(op.f('fk_partition_leases_next_worker_id_workers'), 'partition_leases', type_='foreignkey')
    op.drop_column('partition_leases', 'assigned_at')
    op.drop_column('partition_leases', 'hot_tenants')
    op.drop_column('partition_leases', 'handover_at')
    op.drop_column('partition_leases', 'next_worker_id')
    op.drop_column('workers', 'follows_leases')
    op.drop_column('workers', 'topic')
