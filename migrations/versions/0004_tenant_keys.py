"""tenant keys: per-tenant request-signing keys (HMAC), rotation with an overlap window

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-21 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_keys',
                    sa.Column('key_id', sa.String(length=32), nullable=False),
                    sa.Column('tenant_id', sa.String(length=63), nullable=False),
                    sa.Column('secret', sa.LargeBinary(), nullable=False),
                    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
                    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
                    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
                    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.tenant_id'],
                                            name=op.f('fk_tenant_keys_tenant_id_tenants'), ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_tenant_keys')))
    op.create_index('ix_tenant_keys_tenant_id', 'tenant_keys', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_tenant_keys_tenant_id', table_name='tenant_keys')
    op.drop_table('tenant_keys')
