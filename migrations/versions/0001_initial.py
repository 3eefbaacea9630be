"""initial schema: tenants, adapters, blobs, workers, leases, routes, audit

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 08:36:05.502246
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapter_blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_adapter_blobs'))
    )
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('detail', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    op.create_table('tenants',
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=True),
    sa.Column('active_version', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("tenant_id ~ '^[a-z0-9][a-z0-9._-]{0,62}$'", name=op.f('ck_tenants_tenant_id_format')),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_tenants'))
    )
    op.create_table('workers',
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('capacity', sa.Float(), server_default='1.0', nullable=False),
    sa.Column('state', sa.String(length=16), server_default='starting', nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.CheckConstraint("state IN ('starting', 'serving', 'draining', 'stopped', 'dead')", name=op.f('ck_workers_state')),
    sa.PrimaryKeyConstraint('worker_id', name=op.f('pk_workers'))
    )
    op.create_table('adapters',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('pet_type', sa.String(length=16), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('base_model_id', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('storage', sa.String(length=16), server_default='postgres', nullable=False),
    sa.Column('status', sa.String(length=16), server_default='ready', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("pet_type IN ('lora', 'adapter', 'bitfit', 'ia3', 'diff', 'maskbert')", name=op.f('ck_adapters_pet_type')),
    sa.CheckConstraint("status IN ('ready', 'retired')", name=op.f('ck_adapters_status')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_adapters_version_positive')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.tenant_id'], name=op.f('fk_adapters_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
    sa.UniqueConstraint('tenant_id', 'version', name='uq_adapters_tenant_version')
    )
    op.create_index('ix_adapters_sha256', 'adapters', ['sha256'], unique=False)
    op.create_table('partition_leases',
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('epoch', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('state', sa.String(length=16), server_default='released', nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('active', 'releasing', 'released')", name=op.f('ck_partition_leases_state')),
    sa.CheckConstraint('partition >= 0', name=op.f('ck_partition_leases_partition_nonnegative')),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.worker_id'], name=op.f('fk_partition_leases_worker_id_workers'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('topic', 'partition', name=op.f('pk_partition_leases'))
    )
    op.create_index('ix_partition_leases_worker_id', 'partition_leases', ['worker_id'], unique=False)
    op.create_table('tenant_routes',
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('partitions', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.tenant_id'], name=op.f('fk_tenant_routes_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_tenant_routes'))
    )


def downgrade() -> None:
    op.drop_table('tenant_routes')
    op.drop_index('ix_partition_leases_worker_id', table_name='partition_leases')
    op.drop_table('partition_leases')
    op.drop_index('ix_adapters_sha256', table_name='adapters')
    op.drop_table('adapters')
    op.drop_table('workers')
    op.drop_table('tenants')
    op.drop_table('audit_events')
    op.drop_table('adapter_blobs')
