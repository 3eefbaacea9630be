"""Tenant authentication on the data path: per-tenant keys, request signatures, their check.

A request proves its tenant with an HMAC-SHA256 of the exact record value (the msgpack request,
which names the tenant) under one of the tenant's keys, in the ``flock-auth`` header::

    flock-auth: v1:<key_id>:<base64url(HMAC-SHA256(secret, value)), no padding>

The worker (each edge process of a group, so the engine process never pays) checks it before
anything else, decoding included (:meth:`Keyring.verify` reads the header and the raw bytes, so a
forgery costs no decode): unknown, revoked or expired key, a wrong MAC or no header at all, and
then a key of another tenant than the request names -> ``unauthenticated``. Keys live in PostgreSQL (``tenant_keys``);
workers keep them in memory (:class:`Keyring`) and re-read them every ``FLOCK_AUTH_KEYS_POLL_S``.
A rotation adds a key and gives the older ones an expiry (``FLOCK_KEY_ROTATION_OVERLAP_S``), so
producers can switch over without a failed request. One check is ~2-3 µs of CPU (bench/dataplane.py).
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

from schema.messages import Headers

SCHEME = "v1"
_AUTH = Headers.AUTH
_B64 = base64.urlsafe_b64encode
_digest = hmac.digest
_equal = hmac.compare_digest

# Why a request was refused (the label of flock_auth_failures_total).
MISSING, MALFORMED, UNKNOWN_KEY, WRONG_TENANT, EXPIRED, BAD_SIGNATURE = (
    "missing", "malformed", "unknown_key", "wrong_tenant", "expired", "bad_signature")


def new_key_id() -> str:
    return "k" + secrets.token_hex(8)


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def encode_key(key_id: str, secret: bytes) -> str:
    """The one string a tenant is given: ``<key_id>.<base64url secret>`` (FLOCK_TENANT_KEY)."""
    return f"{key_id}.{_B64(secret).rstrip(b'=').decode()}"


def decode_key(text: str) -> tuple[str, bytes]:
    key_id, sep, b64 = text.strip().partition(".")
    if not sep or not key_id or not b64:
        raise ValueError("a tenant key looks like <key_id>.<base64url secret>")
    return key_id, base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))


def sign(key_id: str, secret: bytes, value: bytes) -> bytes:
    """The ``flock-auth`` header value for a request's bytes."""
    return f"{SCHEME}:{key_id}:".encode() + _B64(_digest(secret, value, "sha256")).rstrip(b"=")


def auth_header(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    for k, v in headers or ():
        if k == _AUTH:
            return v
    return None


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    tenant_id: str
    secret: bytes
    expires_at: float | None  # unix seconds; None = no expiry


class Keyring:
    """key_id -> (tenant, secret, expiry), swapped whole on each refresh (no locks needed: the
    Kafka loop only reads ``self.keys``; a refresh assigns new dicts)."""

    def __init__(self, rows: Iterable[KeyRow] = ()):
        self.keys: dict[str, KeyRow] = {}
        self._by_id: dict[bytes, KeyRow] = {}  # as the header spells it: no decode per request
        self.tenants: frozenset[bytes] = frozenset()  # tenants with a key, as record keys spell them
        self.replace(rows)

    def replace(self, rows: Iterable[KeyRow]) -> None:
        keys = {r.key_id: r for r in rows}
        self._by_id = {k.encode(): r for k, r in keys.items()}
        self.tenants = frozenset(r.tenant_id.encode() for r in keys.values())
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def verify(self, value: bytes, headers: Iterable[tuple[str, bytes]] | None,
               now: float | None = None) -> tuple[str | None, str | None]:
        """Who signed ``value``: ``(tenant_id, None)``, or ``(None, why not)``. Reads only the
        ``flock-auth`` header and the raw bytes, so a forgery is refused before it is decoded;
        the caller still checks that the decoded request names that tenant."""
        h = auth_header(headers)
        if h is None:
            return None, MISSING
        if h[:3] != b"v1:":
            return None, MALFORMED
        key_id, sep, mac = h[3:].partition(b":")
        if not sep:
            return None, MALFORMED
        row = self._by_id.get(key_id)
        if row is None:
            return None, UNKNOWN_KEY
        if row.expires_at is not None and (now or time.time()) >= row.expires_at:
            return None, EXPIRED
        if not _equal(_B64(_digest(row.secret, value, "sha256")).rstrip(b"="), mac):
            return None, BAD_SIGNATURE
        return row.tenant_id, None

    def check(self, tenant_id: str, value: bytes, headers: Iterable[tuple[str, bytes]] | None,
              now: float | None = None) -> str | None:
        """None when ``value`` is signed by a valid key of ``tenant_id``, else why not."""
        signer, why = self.verify(value, headers, now)
        if why is not None:
            return why
        return None if signer == tenant_id else WRONG_TENANT


class Unanswered:
    """Refused requests over their tenant's refusal budget: no reply and no DLQ record each, but
    counted here and handed out (``take``) as one summary DLQ record per period, so an operator
    sees a flood (how many, why, which tenants, which offsets) without it costing a record each."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.since = time.time()
        self.reasons: dict[str, int] = {}
        self.tenants: dict[bytes | None, int] = {}  # record key (the tenant it claims) -> count
        self.other = 0  # beyond the first 1,000 distinct record keys
        self.offsets: dict[int, list[int]] = {}  # partition -> [first, last]

    def add(self, partition: int, offset: int, why: str, key: bytes | None) -> None:
        self.n += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1
        t = self.tenants
        if key in t or len(t) < 1000:  # record keys are the forger's choice: bounded
            t[key] = t.get(key, 0) + 1
        else:
            self.other += 1
        span = self.offsets.get(partition)
        if span is None:
            self.offsets[partition] = [offset, offset]
        elif offset > span[1]:
            span[1] = offset

    def take(self, top: int = 20) -> dict | None:
        """The summary since the last take (None if nothing was refused), and start afresh."""
        if not self.n:
            return None
        tenants = sorted(self.tenants.items(), key=lambda kv: -kv[1])
        out = {"unanswered": self.n, "since": self.since, "until": time.time(), "reasons": self.reasons,
               "claimed_tenants": {(k or b"").decode("utf-8", "replace"): c for k, c in tenants[:top]},
               "other_tenants": sum(c for _, c in tenants[top:]) + self.other,
               "offsets": {str(p): span for p, span in sorted(self.offsets.items())}}
        self._reset()
        return out


# ------------------------------------------------------------------ PostgreSQL (tenant_keys)
def _ts(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


def load_keys(sessions) -> list[KeyRow]:
    """Every key a worker should accept now or later (not revoked, not yet expired)."""
    from sqlalchemy import func, or_, select

    from schema.tables import TenantKey as K
    with sessions() as db:
        rows = db.execute(select(K.key_id, K.tenant_id, K.secret, K.expires_at)
                          .where(K.revoked_at.is_(None), or_(K.expires_at.is_(None), K.expires_at > func.now())))
        return [KeyRow(k, t, bytes(s), _ts(e)) for k, t, s, e in rows]


def key_loader(database_url: str) -> Callable[[], list[KeyRow]]:
    from workers.db import session_factory
    sessions = session_factory(database_url)
    return lambda: load_keys(sessions)


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant_id: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None:
            return "expired" if self.expires_at <= datetime.now(timezone.utc) else "expiring"
        return "active"


class TenantKeys:
    """Create, rotate, list and revoke tenant keys (the CLI's ``flockserve tenant key``)."""

    def __init__(self, sessions):
        self.sessions = sessions

    def _tenant(self, db, tenant_id: str) -> None:
        from schema.tables import Tenant
        from workers.adapters.store import TenantNotFound
        if db.get(Tenant, tenant_id) is None:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist")

    def create(self, tenant_id: str) -> tuple[KeyInfo, str]:
        """A new key next to the existing ones; returns it and the secret string (shown once)."""
        from schema.tables import TenantKey as K
        with self.sessions() as db, db.begin():
            self._tenant(db, tenant_id)
            key_id, secret = new_key_id(), new_secret()
            db.add(K(key_id=key_id, tenant_id=tenant_id, secret=secret))
        return self.get(key_id), encode_key(key_id, secret)

    def rotate(self, tenant_id: str, overlap_s: float) -> tuple[KeyInfo, str]:
        """A new key; the tenant's other live keys expire ``overlap_s`` from now (sooner if
        they already expire sooner), so producers switch over without a refused request."""
        from sqlalchemy import or_, update

        from schema.tables import TenantKey as K
        with self.sessions() as db, db.begin():
            self._tenant(db, tenant_id)
            until = datetime.now(timezone.utc) + timedelta(seconds=overlap_s)
            db.execute(update(K).where(K.tenant_id == tenant_id, K.revoked_at.is_(None),
                                       or_(K.expires_at.is_(None), K.expires_at > until))
                       .values(expires_at=until))
            key_id, secret = new_key_id(), new_secret()
            db.add(K(key_id=key_id, tenant_id=tenant_id, secret=secret))
        return self.get(key_id), encode_key(key_id, secret)

    def revoke(self, key_id: str) -> KeyInfo:
        from sqlalchemy import func, update

        from schema.tables import TenantKey as K
        with self.sessions() as db, db.begin():
            n = db.execute(update(K).where(K.key_id == key_id, K.revoked_at.is_(None))
                           .values(revoked_at=func.now())).rowcount
        info = self.get(key_id)
        if info is None:
            raise KeyError(f"no key {key_id!r}")
        if not n and info.revoked_at is None:  # pragma: no cover - raced with a delete
            raise KeyError(f"no key {key_id!r}")
        return info

    def get(self, key_id: str) -> KeyInfo | None:
        from schema.tables import TenantKey as K
        with self.sessions() as db:
            k = db.get(K, key_id)
            return None if k is None else KeyInfo(k.key_id, k.tenant_id, k.created_at, k.expires_at, k.revoked_at)

    def list(self, tenant_id: str | None = None) -> list[KeyInfo]:
        from sqlalchemy import select

        from schema.tables import TenantKey as K
        q = select(K.key_id, K.tenant_id, K.created_at, K.expires_at, K.revoked_at).order_by(K.tenant_id, K.created_at)
        if tenant_id is not None:
            q = q.where(K.tenant_id == tenant_id)
        with self.sessions() as db:
            return [KeyInfo(*r) for r in db.execute(q)]
