"""Kafka connection options for every client (worker, edges, manager, CLI, SDK, load generator,
trainer, benchmarks): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL with PLAIN, SCRAM-SHA-256/512 or
OAUTHBEARER, CA / client certificate / key files. One home: call sites spread
``**kafka_options()`` into aiokafka's constructors next to ``bootstrap_servers``.

Secrets (SASL password, key password, OAuth token) come from ``FLOCK_*`` settings or files and are
held as SecretStr; ``describe()`` is what may be printed or logged.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from workers.config import Settings, settings

SASL = ("SASL_PLAINTEXT", "SASL_SSL")
TLS = ("SSL", "SASL_SSL")


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER: the token is read from a file at every (re-)authentication, so whatever
    refreshes it (a sidecar, a cron job) needs no restart of Flock."""

    def __init__(self, path: Path):
        self.path = Path(path)

    async def token(self) -> str:
        return self.path.read_text().strip()


def _secret(value: Any, path: Path | None) -> str | None:
    if path is not None:
        return Path(path).read_text().strip()
    return value.get_secret_value() if value is not None else None


def ssl_context(s: Settings) -> ssl.SSLContext:
    ctx = create_ssl_context(cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None,
                             certfile=str(s.kafka_ssl_certfile) if s.kafka_ssl_certfile else None,
                             keyfile=str(s.kafka_ssl_keyfile) if s.kafka_ssl_keyfile else None,
                             password=_secret(s.kafka_ssl_key_password, None))
    ctx.check_hostname = s.kafka_ssl_check_hostname
    return ctx


def kafka_options(s: Settings | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security (empty for PLAINTEXT, so plain
    clients are constructed exactly as before). Raises ValueError for an incomplete setup."""
    s = s or settings()
    proto = s.kafka_security_protocol
    if proto == "PLAINTEXT":
        return {}
    opts: dict[str, Any] = {"security_protocol": proto}
    if proto in TLS:
        opts["ssl_context"] = ssl_context(s)
    if proto in SASL:
        mech = s.kafka_sasl_mechanism
        opts["sasl_mechanism"] = mech
        if mech == "OAUTHBEARER":
            if s.kafka_oauth_token_file is None:
                raise ValueError("FLOCK_KAFKA_SASL_MECHANISM=OAUTHBEARER needs FLOCK_KAFKA_OAUTH_TOKEN_FILE")
            opts["sasl_oauth_token_provider"] = FileTokenProvider(s.kafka_oauth_token_file)
        else:
            password = _secret(s.kafka_sasl_password, s.kafka_sasl_password_file)
            if not s.kafka_sasl_username or not password:
                raise ValueError(f"{proto} with {mech} needs FLOCK_KAFKA_SASL_USERNAME and "
                                 "FLOCK_KAFKA_SASL_PASSWORD (or FLOCK_KAFKA_SASL_PASSWORD_FILE)")
            opts["sasl_plain_username"] = s.kafka_sasl_username
            opts["sasl_plain_password"] = password
    return opts


def describe(s: Settings | None = None) -> dict[str, Any]:
    """The connection as it may be shown: no secret, only whether one is set."""
    s = s or settings()
    out: dict[str, Any] = {"bootstrap": s.kafka_bootstrap, "security_protocol": s.kafka_security_protocol}
    if s.kafka_security_protocol in SASL:
        out["sasl_mechanism"] = s.kafka_sasl_mechanism
        out["sasl_username"] = s.kafka_sasl_username
        out["sasl_password"] = "***" if (s.kafka_sasl_password or s.kafka_sasl_password_file) else None
    if s.kafka_security_protocol in TLS:
        out["ssl_cafile"] = str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None
        out["ssl_certfile"] = str(s.kafka_ssl_certfile) if s.kafka_ssl_certfile else None
    return out


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ***."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: show nothing of it
        return "***"
