"""Security (issue 17): Kafka connection options, tenant keys and signatures, and the secured
suite on a real SASL_SSL + ACL broker that `scripts/services secure-up` starts beside the plain
one (certificates made by the script; SCRAM users and ACLs made with Kafka's own tools).

The secured tests run one worker (admin principal) against that broker, with tenant signatures
required and per-tenant reply topics; tenants talk to it as their own SCRAM principals.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time

import pytest

from schema.messages import ErrorCode, Headers, InferReply, InferRequest, header_map
from schema.topics import tenant_reply_topic
from workers import kafka_conn
from workers.auth import (BAD_SIGNATURE, EXPIRED, MALFORMED, MISSING, UNKNOWN_KEY, WRONG_TENANT, KeyRow, Keyring,
                          TenantKeys, decode_key, encode_key, load_keys, sign)
from workers.config import Settings, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- connection options (no services)
def test_plaintext_adds_nothing():
    assert kafka_conn.kafka_options(Settings()) == {}


def test_sasl_ssl_scram_options_from_files(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                 kafka_sasl_username="acme", kafka_sasl_password_file=pw)
    opts = kafka_conn.kafka_options(s)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "acme" and opts["sasl_plain_password"] == "s3cret"
    assert opts["ssl_context"].check_hostname
    shown = kafka_conn.describe(s)
    assert shown["sasl_password"] == "***" and "s3cret" not in repr(shown) and "s3cret" not in repr(s)


def test_incomplete_sasl_setup_is_refused():
    with pytest.raises(ValueError, match="FLOCK_KAFKA_SASL_USERNAME"):
        kafka_conn.kafka_options(Settings(kafka_security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ValueError, match="OAUTH_TOKEN_FILE"):
        kafka_conn.kafka_options(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER"))


def test_oauthbearer_token_is_read_from_its_file(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("eyJ.token\n")
    opts = kafka_conn.kafka_options(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER",
                                             kafka_oauth_token_file=tok))
    assert asyncio.run(opts["sasl_oauth_token_provider"].token()) == "eyJ.token"


def test_database_tls_goes_into_the_url_and_passwords_are_redacted():
    s = Settings(database_url="postgresql://flock:pw@db:5432/flock", database_sslmode="verify-full",
                 database_sslrootcert="/etc/flock/ca.pem")
    assert s.database_url.endswith("?sslmode=verify-full&sslrootcert=%2Fetc%2Fflock%2Fca.pem")
    assert "pw" not in kafka_conn.redact_url(s.database_url).split("@")[0]
    # Already in the URL: kept as given.
    s = Settings(database_url="postgresql://a:b@h/d?sslmode=require", database_sslmode="verify-ca")
    assert s.database_url == "postgresql://a:b@h/d?sslmode=require"


# ---------------------------------------------------------------- signatures (no services)
def test_keyring_accepts_exactly_the_tenants_valid_signature():
    kid, secret = "k1", b"x" * 32
    ring = Keyring([KeyRow(kid, "acme", secret, None), KeyRow("k2", "other", b"y" * 32, None),
                    KeyRow("k3", "acme", b"z" * 32, time.time() - 1)])
    value = InferRequest(tenant_id="acme", text="hi").encode()
    h = [(Headers.AUTH, sign(kid, secret, value))]
    assert ring.check("acme", value, h) is None
    assert ring.check("acme", value + b"\x00", h) == BAD_SIGNATURE  # any changed byte
    assert ring.check("other", value, h) == WRONG_TENANT  # acme's key does not speak for another tenant
    assert ring.check("acme", value, [(Headers.AUTH, sign("k2", b"y" * 32, value))]) == WRONG_TENANT
    assert ring.check("acme", value, [(Headers.AUTH, sign("k3", b"z" * 32, value))]) == EXPIRED
    assert ring.check("acme", value, [(Headers.AUTH, sign("nope", secret, value))]) == UNKNOWN_KEY
    assert ring.check("acme", value, [(Headers.AUTH, b"v2:k1:abc")]) == MALFORMED
    assert ring.check("acme", value, [(Headers.AUTH, b"garbage")]) == MALFORMED
    assert ring.check("acme", value, []) == MISSING
    key = encode_key(kid, secret)
    assert decode_key(key) == (kid, secret)


def test_sdk_follows_the_per_tenant_reply_scheme(monkeypatch):
    from workers.client import FlockClient
    monkeypatch.setenv("FLOCK_TENANT_REPLY_TOPICS", "1")
    settings.cache_clear()
    try:
        c = FlockClient(tenant="acme", tenant_key=encode_key("k1", b"s" * 32), routing=False)
        assert c.reply_topic == "flock.replies.acme"
        assert c.request("acme", "x").reply_to == "flock.replies.acme"
    finally:
        settings.cache_clear()


def test_refusals_are_answered_within_a_budget_per_tenant():
    from workers.serving.worker import Worker, WorkerConfig
    cfg = WorkerConfig("w", "x:1", "req", "rep", "dlq", "g", [0], auth_refusals_burst=3, auth_refusals_per_s=2.0)
    w = Worker(cfg, engine=None, tokenizer=None)
    assert [w.may_answer_refusal("a", 100.0) for _ in range(5)] == [True, True, True, False, False]
    assert w.may_answer_refusal("b", 100.0)  # each tenant its own budget
    assert w.may_answer_refusal("a", 100.5) and not w.may_answer_refusal("a", 100.5)  # refilled at 2/s


def test_compose_production_profile_turns_security_on():
    import yaml
    services = yaml.safe_load(open(os.path.join(ROOT, "compose.yaml")))["services"]
    fields = {f"FLOCK_{k.upper()}" for k in Settings.model_fields}
    for name in ("manager-secure", "worker-secure"):
        svc = services[name]
        env = svc["environment"]
        assert svc["profiles"] == ["production"] and not [k for k in env if k.startswith("FLOCK_") and k not in fields]
        assert env["FLOCK_AUTH_REQUIRED"] == "1" and env["FLOCK_TENANT_REPLY_TOPICS"] == "1"
        assert env["FLOCK_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["FLOCK_DATABASE_SSLMODE"] == "verify-full"
        assert "FLOCK_KAFKA_SASL_PASSWORD" not in env  # from a secret file, never inline


# ---------------------------------------------------------------- keys in PostgreSQL
def test_key_create_rotate_revoke(sessions, unique):
    from workers.tenants import TenantRegistry
    tid = f"keys-{unique}"
    TenantRegistry(sessions).create(tid)
    keys = TenantKeys(sessions)
    first, text = keys.create(tid)
    assert first.state == "active" and decode_key(text)[0] == first.key_id
    second, _ = keys.rotate(tid, overlap_s=3600)
    mine = {k.key_id: k for k in keys.list(tid)}
    assert mine[first.key_id].state == "expiring" and mine[second.key_id].state == "active"
    live = {r.key_id for r in load_keys(sessions) if r.tenant_id == tid}
    assert live == {first.key_id, second.key_id}  # both valid during the overlap
    keys.rotate(tid, overlap_s=0)  # no overlap: the older keys stop at once
    assert {r.key_id for r in load_keys(sessions) if r.tenant_id == tid} == {keys.list(tid)[-1].key_id}
    keys.revoke(keys.list(tid)[-1].key_id)
    assert not [r for r in load_keys(sessions) if r.tenant_id == tid]


def test_cli_key_commands(database_url, unique):
    import json
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url}
    run = lambda *a: subprocess.run([os.path.join(ROOT, ".venv/bin/flockserve"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    tid = f"clikey-{unique}"
    assert run("tenant", "create", tid).returncode == 0
    r = run("tenant", "key", "create", tid, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["key"].startswith(made["key_id"] + ".")
    r = run("tenant", "key", "list", "--tenant", tid, "--json")
    listed = json.loads(r.stdout)
    assert [k["key_id"] for k in listed] == [made["key_id"]] and "key" not in listed[0] and "secret" not in r.stdout
    r = run("tenant", "key", "revoke", "knothere")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run("tenant", "key", "create", "no-such-tenant")
    assert r.returncode == 1 and r.stderr.startswith("error: ")
    r = subprocess.run([os.path.join(ROOT, ".venv/bin/flockserve"), "security", "show", "--json"],
                       env={**env, "FLOCK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FLOCK_KAFKA_SASL_USERNAME": "u",
                            "FLOCK_KAFKA_SASL_PASSWORD": "hunter2"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "hunter2" not in r.stdout and ":***@" in r.stdout


# ---------------------------------------------------------------- the secured broker
def _services(*args: str) -> str:
    r = subprocess.run([os.path.join(ROOT, "scripts", "services"), *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    if r.returncode != 0:
        pytest.fail(f"scripts/services {' '.join(args[:1])} failed: {r.stderr[-2000:]}", pytrace=False)
    return r.stdout


class Secured:
    """The secured broker, its admin settings, a worker on it and two tenants with keys."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.bootstrap = env["FLOCK_KAFKA_BOOTSTRAP"]
        self.admin = kafka_conn.kafka_options(Settings(**{k[6:].lower(): v for k, v in env.items()}))

    def as_tenant(self, name: str, password: str) -> dict:
        return kafka_conn.kafka_options(Settings(
            kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=name,
            kafka_sasl_password=password, kafka_ssl_cafile=self.env["FLOCK_KAFKA_SSL_CAFILE"]))


@pytest.fixture(scope="module")
def secured(sessions, database_url, unique_module):
    from tests.serving_harness import Topics, WorkerProcess, make_tenants
    from workers.kafka_admin import ensure_topics
    _services("secure-up")
    env = dict(re.findall(r"(FLOCK_[A-Z_]+)=(\S+)", _services("secure-env")))
    sec = Secured(env)
    tag = f"sec{unique_module}"
    sec.topics = Topics(f"req.{tag}", f"rep.{tag}", f"dlq.{tag}", 2)
    sec.prefix = f"rep.{tag}."
    sec.tenants = make_tenants(sessions, tag, 2)
    sec.passwords = {t: f"pw-{unique_module}-{i}" for i, t in enumerate(sec.tenants)}
    sec.reply = {t: tenant_reply_topic(t, sec.prefix) for t in sec.tenants}
    plan = {sec.topics.requests: (2, {}), sec.topics.replies: (1, {}), sec.topics.dlq: (1, {}),
            **{topic: (1, {}) for topic in sec.reply.values()}}
    asyncio.run(ensure_topics(sec.bootstrap, plan, kafka=sec.admin))
    for t in sec.tenants:
        _services("secure-tenant", t, sec.passwords[t], sec.topics.requests, sec.reply[t])
    sec.keys = {t: TenantKeys(sessions).create(t)[1] for t in sec.tenants}
    w = WorkerProcess(database_url, sec.topics, tag, **env, FLOCK_AUTH_REQUIRED="1", FLOCK_AUTH_KEYS_POLL_S="0.5",
                      FLOCK_TENANT_REPLY_TOPICS="1", FLOCK_REPLY_TOPIC_PREFIX=sec.prefix, FLOCK_EDGES="1",
                      FLOCK_AUTH_SUMMARY_S="1").start()
    sec.worker = w
    yield sec
    w.terminate()


@pytest.fixture(scope="module")
def unique_module() -> str:
    import uuid
    return uuid.uuid4().hex[:8]


def _client(sec: Secured, tenant: str, key: str | None):
    from workers.client import FlockClient
    return FlockClient(sec.bootstrap, requests_topic=sec.topics.requests, reply_topic=sec.reply[tenant],
                       routing=False, tenant_key=key, kafka=sec.as_tenant(tenant, sec.passwords[tenant]))


def _metric(w, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in w.get("/metrics")[1].splitlines():
        if line.startswith(f"{name}{{{want}}} " if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _read(sec: Secured, topic: str, kafka: dict, until, timeout: float = 30.0) -> list:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    c = AIOKafkaConsumer(bootstrap_servers=sec.bootstrap, **kafka, enable_auto_commit=False,
                         auto_offset_reset="earliest")
    await c.start()
    out: list = []
    try:
        c.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(out):
            for recs in (await c.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await c.stop()
    return out


def test_round_trip_over_sasl_ssl_as_the_tenant(secured):
    async def go():
        async with _client(secured, secured.tenants[0], secured.keys[secured.tenants[0]]) as c:
            return await c.infer(secured.tenants[0], "the service was great", timeout=60)
    reply = asyncio.run(go())
    assert reply.status is ErrorCode.OK and reply.outputs["label"], reply


def test_wrong_or_missing_key_is_unauthenticated_and_nothing_computed(secured):
    a, b = secured.tenants
    w = secured.worker
    computed = _metric(w, "flock_adapter_lookups_total", result="ok")

    async def go():
        # Tenant a's principal, signing with b's key (or not at all): refused before any compute.
        async with _client(secured, a, secured.keys[b]) as c:
            wrong = await c.infer(a, "forged", timeout=30)
        async with _client(secured, a, None) as c:
            unsigned = await c.infer(a, "unsigned", timeout=30)
        return wrong, unsigned
    wrong, unsigned = asyncio.run(go())
    assert wrong.status is ErrorCode.UNAUTHENTICATED and "wrong_tenant" in wrong.error_message
    assert unsigned.status is ErrorCode.UNAUTHENTICATED and "missing" in unsigned.error_message
    assert _metric(w, "flock_adapter_lookups_total", result="ok") == computed
    assert _metric(w, "flock_auth_failures_total", reason="wrong_tenant") >= 1
    assert _metric(w, "flock_auth_failures_total", reason="missing") >= 1
    dlq = asyncio.run(_read(secured, secured.topics.dlq, secured.admin,
                            lambda recs: {wrong.request_id, unsigned.request_id} <= {header_map(r.headers).get(Headers.REQUEST_ID) for r in recs}))
    reasons = {header_map(r.headers)[Headers.REQUEST_ID]: header_map(r.headers)[Headers.ERROR] for r in dlq}
    assert reasons[wrong.request_id].startswith("unauthenticated: wrong_tenant")
    assert reasons[unsigned.request_id].startswith("unauthenticated: missing")


async def _subscribe_read(sec: Secured, topic: str, kafka: dict) -> dict:
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(topic, bootstrap_servers=sec.bootstrap, **kafka, enable_auto_commit=False,
                         auto_offset_reset="earliest")
    try:
        await c.start()
        return await c.getmany(timeout_ms=3000)
    finally:
        await c.stop()


def test_a_tenant_cannot_read_another_tenants_replies(secured):
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError
    a, b = secured.tenants
    as_a = secured.as_tenant(a, secured.passwords[a])
    asyncio.run(_subscribe_read(secured, secured.reply[a], as_a))  # its own: allowed
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(_subscribe_read(secured, secured.reply[b], as_a))

    async def produce():  # ... nor write a forged "reply" into b's topic
        p = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **as_a)
        await p.start()
        try:
            await p.send_and_wait(secured.reply[b], b"x")
        finally:
            await p.stop()
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(produce())


def test_forged_reply_to_is_not_honoured(secured):
    from aiokafka import AIOKafkaProducer
    a, b = secured.tenants
    w = secured.worker
    refused = _metric(w, "flock_reply_to_refused_total")
    req = InferRequest(tenant_id=a, text="send my answer to b", reply_to=secured.reply[b])
    key_id, secret = decode_key(secured.keys[a])
    value = req.encode()

    async def produce():
        p = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **secured.as_tenant(a, secured.passwords[a]))
        await p.start()
        try:
            await p.send_and_wait(secured.topics.requests, value, key=a.encode(),
                                  headers=req.headers() + [(Headers.AUTH, sign(key_id, secret, value))])
        finally:
            await p.stop()
    asyncio.run(produce())
    mine = asyncio.run(_read(secured, secured.reply[a], secured.admin,
                             lambda recs: any(InferReply.decode(r.value).request_id == req.request_id for r in recs)))
    got = [InferReply.decode(r.value) for r in mine if InferReply.decode(r.value).request_id == req.request_id]
    assert got and got[0].status is ErrorCode.OK  # answered, on a's own topic
    theirs = asyncio.run(_read(secured, secured.reply[b], secured.admin, lambda r: False, timeout=3))
    assert req.request_id not in {InferReply.decode(r.value).request_id for r in theirs}
    assert _metric(w, "flock_reply_to_refused_total") == refused + 1


def test_a_forged_flood_is_counted_not_answered_and_never_computed(secured):
    from aiokafka import AIOKafkaProducer
    from workers.auth import sign
    b = secured.tenants[1]
    w = secured.worker
    key_id = decode_key(secured.keys[b])[0]
    computed = _metric(w, "flock_adapter_lookups_total", result="ok")
    unanswered = _metric(w, "flock_auth_unanswered_total")
    forged = [InferRequest(tenant_id=b, text=f"forged {i}") for i in range(300)]

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **secured.admin, linger_ms=5)
        await p.start()
        try:
            for r in forged:  # b's real key id, a wrong secret: each needs the full MAC check
                v = r.encode()
                await p.send(secured.topics.requests, v, key=b.encode(),
                             headers=r.headers() + [(Headers.AUTH, sign(key_id, bytes(32), v))])
            await p.flush()
        finally:
            await p.stop()
        async with _client(secured, b, secured.keys[b]) as c:  # after the flood, on the same partition
            return await c.infer(b, "the real one", timeout=60)
    real = asyncio.run(go())
    assert real.status is ErrorCode.OK
    ids = {r.request_id for r in forged}
    mine = asyncio.run(_read(secured, secured.reply[b], secured.admin, lambda r: False, timeout=3))
    answered = [InferReply.decode(r.value) for r in mine if InferReply.decode(r.value).request_id in ids]
    assert answered and all(a.status is ErrorCode.UNAUTHENTICATED for a in answered)
    assert len(answered) <= 20 + 5  # FLOCK_AUTH_REFUSALS_BURST, plus what refills while it runs
    assert _metric(w, "flock_auth_unanswered_total") - unanswered == len(forged) - len(answered)
    assert _metric(w, "flock_adapter_lookups_total", result="ok") == computed + 1  # the real one only
    summaries = asyncio.run(_read(secured, secured.topics.dlq, secured.admin, timeout=15, until=lambda recs: any(
        header_map(r.headers).get(Headers.ERROR, "").startswith("unauthenticated: ") and b"unanswered" in r.value
        for r in recs)))
    summary = [r for r in summaries if b"unanswered" in r.value]
    assert summary and sum(json.loads(r.value)["claimed_tenants"].get(b, 0) for r in summary) >= len(forged) - len(answered)


def test_key_rotation_keeps_serving(secured, sessions):
    a = secured.tenants[0]
    old = secured.keys[a]
    _, new = TenantKeys(sessions).rotate(a, overlap_s=300)
    time.sleep(1.5)  # the worker re-reads keys every 0.5 s

    async def both():
        async with _client(secured, a, old) as c_old, _client(secured, a, new) as c_new:
            return await asyncio.gather(c_old.infer(a, "old key", timeout=60), c_new.infer(a, "new key", timeout=60))
    r_old, r_new = asyncio.run(both())
    assert r_old.status is ErrorCode.OK and r_new.status is ErrorCode.OK
    TenantKeys(sessions).revoke(decode_key(old)[0])  # end of the overlap, early
    time.sleep(1.5)
    r_old, r_new = asyncio.run(both())
    assert r_old.status is ErrorCode.UNAUTHENTICATED and r_new.status is ErrorCode.OK
    secured.keys[a] = new
