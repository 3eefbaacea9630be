"""`flockserve tenant key ...` (tenant request-signing keys) and `flockserve security show`
(the effective connection security, secrets redacted). docs/security.md."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from workers.cli.app import CliError, JsonFlag, emit, fail, group, out, print_json, run_cli, sessions
from workers.cli.tenants import tenant_app

key_app = typer.Typer(no_args_is_help=True, help="Tenant request-signing keys (HMAC; FLOCK_AUTH_REQUIRED).")
tenant_app.add_typer(key_app, name="key")
security_app = group("security", "Connection security and tenant authentication settings.")

KEY_COLS = ["key_id", "tenant_id", "state", "created_at", "expires_at", "revoked_at"]


def _row(info) -> dict:
    return {"key_id": info.key_id, "tenant_id": info.tenant_id, "state": info.state, "created_at": info.created_at,
            "expires_at": info.expires_at, "revoked_at": info.revoked_at}


def _own_reply_topic(tenant_id: str) -> str | None:
    """With per-tenant replies, make sure the tenant's reply topic exists (idempotent)."""
    import asyncio

    from schema.topics import REPLY_PARTITIONS, TOPICS, REPLIES_TOPIC, tenant_reply_topic
    from workers.config import settings
    from workers.kafka_admin import ensure_topics
    s = settings()
    if not s.tenant_reply_topics:
        return None
    topic = tenant_reply_topic(tenant_id, s.reply_topic_prefix)
    asyncio.run(ensure_topics(s.kafka_bootstrap, {topic: (REPLY_PARTITIONS, TOPICS[REPLIES_TOPIC][1])}))
    return topic


def _issued(info, secret: str, as_json: bool) -> None:
    topic = run_cli(lambda: _own_reply_topic(info.tenant_id))
    if as_json:
        print_json({**_row(info), "key": secret, "reply_topic": topic})
        return
    emit(_row(info), False, KEY_COLS)
    out.print(f"key (shown once; give it to the tenant as FLOCK_TENANT_KEY): {secret}", soft_wrap=True)
    if topic:
        out.print(f"replies for {info.tenant_id} go to {topic}")


@key_app.command("create")
def key_create(tenant_id: str, as_json: JsonFlag = False) -> None:
    """A new key for a tenant (existing keys stay valid)."""
    from workers.auth import TenantKeys
    info, secret = run_cli(lambda: TenantKeys(sessions()).create(tenant_id))
    _issued(info, secret, as_json)


@key_app.command("rotate")
def key_rotate(tenant_id: str,
               overlap: Annotated[Optional[float], typer.Option(help="Seconds the older keys stay valid "
                                                                "(default FLOCK_KEY_ROTATION_OVERLAP_S).")] = None,
               as_json: JsonFlag = False) -> None:
    """A new key; the tenant's older keys expire after the overlap window."""
    from workers.auth import TenantKeys
    from workers.config import settings
    window = settings().key_rotation_overlap_s if overlap is None else overlap
    if window < 0:
        fail("--overlap must be >= 0")
        raise typer.Exit(1)
    info, secret = run_cli(lambda: TenantKeys(sessions()).rotate(tenant_id, window))
    _issued(info, secret, as_json)


@key_app.command("list")
def key_list(tenant: Annotated[Optional[str], typer.Option(help="Only this tenant.")] = None,
             as_json: JsonFlag = False) -> None:
    """Keys (never their secrets) and their state: active, expiring, expired, revoked."""
    from workers.auth import TenantKeys
    emit([_row(k) for k in run_cli(lambda: TenantKeys(sessions()).list(tenant))], as_json, KEY_COLS, title="tenant keys")


@key_app.command("revoke")
def key_revoke(key_id: str, as_json: JsonFlag = False) -> None:
    """Revoke a key now (workers stop accepting it within FLOCK_AUTH_KEYS_POLL_S)."""
    from workers.auth import TenantKeys

    def go():
        try:
            return TenantKeys(sessions()).revoke(key_id)
        except KeyError as exc:
            raise CliError(exc.args[0]) from None
    emit(_row(run_cli(go)), as_json, KEY_COLS)


@security_app.command("show")
def security_show(as_json: JsonFlag = False) -> None:
    """The effective Kafka and PostgreSQL security and tenant-auth settings; secrets redacted."""
    from workers import kafka_conn
    from workers.config import settings
    s = settings()
    info = {"kafka": kafka_conn.describe(s), "database_url": kafka_conn.redact_url(s.database_url),
            "auth_required": s.auth_required, "tenant_reply_topics": s.tenant_reply_topics,
            "reply_topic_prefix": s.reply_topic_prefix if s.tenant_reply_topics else None}
    if as_json:
        print_json(info)
        return
    rows = [{"setting": f"kafka.{k}", "value": v} for k, v in info.pop("kafka").items()]
    rows += [{"setting": k, "value": v} for k, v in info.items()]
    emit(rows, False, ["setting", "value"], title="security")
