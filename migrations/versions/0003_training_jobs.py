"""training jobs: the flock.train topic's jobs and their outcomes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-20 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_jobs',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('state', sa.String(length=16), server_default='queued', nullable=False),
    sa.Column('pet_type', sa.String(length=16), nullable=False),
    sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('data_source', sa.Text(), nullable=False),
    sa.Column('reply_to', sa.String(length=249), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('trainer_id', sa.String(length=128), nullable=True),
    sa.Column('device', sa.String(length=64), nullable=True),
    sa.Column('progress', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('adapter_version', sa.Integer(), nullable=True),
    sa.Column('code', sa.String(length=32), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed')", name=op.f('ck_training_jobs_state')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_training_jobs_attempts_nonnegative')),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_training_jobs'))
    )
    op.create_index('ix_training_jobs_state', 'training_jobs', ['state'], unique=False)
    op.create_index('ix_training_jobs_tenant_id', 'training_jobs', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_training_jobs_tenant_id', table_name='training_jobs')
    op.drop_index('ix_training_jobs_state', table_name='training_jobs')
    op.drop_table('training_jobs')
