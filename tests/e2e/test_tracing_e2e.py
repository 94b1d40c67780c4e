"""Traces end to end: `broker serve --dev` with BROKER_OTLP_ENDPOINT pointing at a real OTLP/gRPC
receiver (tests/fixtures/otlp.py). A secret put and get, an SVID mint and dynamic database
credentials on the throwaway PostgreSQL go through the CLI; the receiver gets a SERVER span
for each, whose trace id is the correlation id of its ledger entry, with storage, HSM (the
dev broker's SoftHSM2 token when installed) and database-engine spans under them; the secret
is named only by `secret.ref_sha256`, and no span carries the reference, the value, the
database password or the generated user's name."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.dbtargets import Target, target_for
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan

from .conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e

REF = "secret://payments/dev/stripe/otel-key"


@pytest.fixture
async def postgres_target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for("postgresql", request) as value:
        yield value


def _ledger(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT event FROM audit ORDER BY seq").fetchall()
    return [json.loads(row[0]) for row in rows]


def _children(spans: list[ReceivedSpan], root: ReceivedSpan) -> list[ReceivedSpan]:
    ids, out = {root.span_id}, []
    grew = True
    while grew:
        grew = False
        for span in spans:
            if span.parent_span_id in ids and span not in out:
                ids.add(span.span_id)
                out.append(span)
                grew = True
    return out


async def test_spans_arrive_with_hashed_references_and_the_ledgers_correlation_ids(
    tmp_path: Path, otlp_receiver: OtlpReceiver, postgres_target: Target
) -> None:
    data = tmp_path / "data"
    server = BrokerProcess(
        data,
        tmp_path,
        env={"BROKER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    cli = BrokerCli(server, tmp_path)
    server.start()
    try:
        value = os.urandom(24).hex()
        value_file = tmp_path / "value"
        value_file.write_text(value)
        cli.ok(
            "secrets", "put", REF, "--value-file", str(value_file), "--owner", "payments",
            "--classification", "confidential", "--rotation-period", "90d",
        )  # fmt: skip
        assert cli.ok("secrets", "get", REF).stdout == value
        status = cli.ok("ca", "status", "--output", "json").json()
        spiffe_id = f"spiffe://{status['trust_domain']}/default/dev/payments"
        cli.ok("svid", "mint", "--spiffe-id", spiffe_id, "--out", str(tmp_path / "svid"))

        password_file = tmp_path / "admin-password"
        password_file.write_text(postgres_target.password + "\n")
        password_file.chmod(0o600)
        creation = tmp_path / "creation.sql"
        creation.write_text(postgres_target.sql(postgres_target.creation))
        cli.ok(
            "db", "connection", "add", "orders", "--plugin", "postgresql",
            "--dsn", postgres_target.dsn, "--password-file", str(password_file),
        )  # fmt: skip
        cli.ok("db", "role", "add", "reader", "--connection", "orders",
               "--creation-statements", str(creation))  # fmt: skip
        creds = cli.ok("db", "creds", "reader", "--output", "json").json()
        assert await postgres_target.exists(creds["username"])
    finally:
        assert server.stop() == 0, server.stderr_text()  # flushes the spans still buffered
        server.ensure_stopped()

    wanted = {
        "broker.v1.Secrets/Put",
        "broker.v1.Secrets/Get",
        "broker.v1.CertificateAuthority/MintX509SVID",
        "broker.v1.Database/IssueCredentials",
    }
    spans = otlp_receiver.wait_for(lambda got: wanted <= {s.name for s in got})
    by_name = {s.name: s for s in spans if s.kind == "SERVER"}
    assert {s.resource["service.name"] for s in spans} == {"credential-broker"}

    # Each traced RPC is the ledger entry with the same correlation id.
    ledger = {e["correlation_id"]: e for e in _ledger(data / "broker.db")}
    for name in wanted:
        span = by_name[name]
        entry = ledger[span.trace_id]
        assert entry["method"] == "/" + name and entry["outcome"] == "OK"
        assert span.attributes["broker.status"] == "OK"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["broker.caller.spiffe_id"] == entry["who"]

    ref_hash = hashlib.sha256(REF.encode()).hexdigest()
    for name in ("broker.v1.Secrets/Put", "broker.v1.Secrets/Get"):
        assert by_name[name].attributes["secret.ref_sha256"] == ref_hash

    get_children = {s.name for s in _children(spans, by_name["broker.v1.Secrets/Get"])}
    assert {"storage.read", "audit.record"} <= get_children, get_children
    assert "hsm.unwrap" in get_children or "hsm.mac" in get_children, get_children
    mint_children = {s.name for s in _children(spans, by_name[
        "broker.v1.CertificateAuthority/MintX509SVID"])}  # fmt: skip
    assert "hsm.sign" in mint_children, mint_children
    creds_spans = _children(spans, by_name["broker.v1.Database/IssueCredentials"])
    engine = [s for s in creds_spans if s.name == "db-engine.create_user"]
    assert engine and engine[0].attributes["db.system.name"] == "postgresql"
    assert engine[0].kind == "CLIENT"

    # Nothing in any span names the secret, holds its value or a database credential.
    forbidden = [REF, "otel-key", value, postgres_target.password, creds["password"],
                 creds["username"]]  # fmt: skip
    for span in spans:
        for text in span.texts():
            for secret in forbidden:
                assert secret not in text, (span.name, secret)


def test_without_an_endpoint_nothing_is_exported(
    tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    server = BrokerProcess(tmp_path / "data", tmp_path)
    cli = BrokerCli(server, tmp_path)
    server.start()
    try:
        cli.ok("ca", "status")
    finally:
        assert server.stop() == 0, server.stderr_text()
        server.ensure_stopped()
    assert "traces to" not in server.stderr_text()
    assert otlp_receiver.spans() == [] and otlp_receiver.requests == 0
