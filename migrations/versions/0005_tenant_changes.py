"""tenant change log: workers follow adapter-version switches with a cursor, not a full read

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 12:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# One trigger sees every writer (CLI, bulk import, trainer, plain SQL). An update that leaves
# active_version alone (a display name) is not a change a worker cares about.
TRIGGER_FUNCTION = """
CREATE FUNCTION flock_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO tenant_changes (tenant_id, active_version, deleted) VALUES (OLD.tenant_id, NULL, true);
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' OR NEW.active_version IS DISTINCT FROM OLD.active_version THEN
        INSERT INTO tenant_changes (tenant_id, active_version, deleted)
        VALUES (NEW.tenant_id, NEW.active_version, false);
    END IF;
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    op.create_table('tenant_changes',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('active_version', sa.Integer(), nullable=True),
    sa.Column('deleted', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenant_changes'))
    )
    op.create_index('ix_tenant_changes_at', 'tenant_changes', ['at'], unique=False)
    op.execute(TRIGGER_FUNCTION)
    op.execute("CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OF active_version OR DELETE ON tenants "
               "FOR EACH ROW EXECUTE FUNCTION flock_tenant_changed()")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS tenants_changed ON tenants")
    op.execute("DROP FUNCTION IF EXISTS flock_tenant_changed()")
    op.drop_index('ix_tenant_changes_at', table_name='tenant_changes')
    op.drop_table('tenant_changes')
