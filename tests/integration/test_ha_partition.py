"""A broker replica that loses its database while its clients still reach it (issue 19, "a
split where a replica loses the database but keeps client connections"): it must stop answering
from what it holds in memory (its CA, its caches) and refuse with UNAVAILABLE and a retry-after
hint, without hanging; once the database is back it reconnects by itself and serves again.

The database is a real PostgreSQL (tests/fixtures/postgres.py) reached through a TCP proxy the
test cuts (tests/fixtures/tcpproxy.py): the broker's connections are reset and new ones refused,
as when a network partition separates the replica from the primary.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
from typing import Any

import grpc
import pytest
from cryptography import x509

from broker.api._proto import ca_pb2
from broker.errors import StorageError, StorageUnavailable
from broker.storage.postgres import open_postgres
from tests.fixtures.postgres import PgCluster
from tests.fixtures.tcpproxy import TcpProxy

from .conftest import CORRELATION_HEADER, TRUST_DOMAIN, BrokerFactory

pytestmark = pytest.mark.postgres

DEV_WORKLOAD = f"spiffe://{TRUST_DOMAIN}/default/dev/partitioned"


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_replica_cut_from_its_database_refuses_instead_of_serving_stale(
    broker_factory: BrokerFactory, pg_cluster: PgCluster
) -> None:
    name, _ = pg_cluster.fresh_database()
    proxy = TcpProxy(pg_cluster.host, pg_cluster.port).start()
    try:
        dsn = pg_cluster.dsn(name).replace(f":{pg_cluster.port}/", f":{proxy.port}/")
        storage = await open_postgres(dsn, primary_wait=1.0)
        await storage.migrate()

        def use_postgres(sqlite: Any) -> Any:
            asyncio.get_running_loop().create_task(sqlite.close())
            return storage

        broker = await broker_factory(wrap_storage=use_postgres)
        # The ledger retries an append that did not commit (a failover) for 12 s by default;
        # a partition that does not heal is refused sooner here.
        broker.app.ledger.append_retry_budget = 1.0
        ca = broker.ca()
        first = await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD))
        assert first.spiffe_id == DEV_WORKLOAD
        entries_before = len(await storage.read_audit(limit=100_000))

        proxy.down()  # the partition: the broker still answers its clients
        for call in (
            ca.MintX509SVID(
                ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD),
                metadata=((CORRELATION_HEADER, "cut-x509"),),
            ),
            ca.MintJWTSVID(ca_pb2.MintJWTSVIDRequest(spiffe_id=DEV_WORKLOAD, audience=["db"])),
            ca.GetBundle(ca_pb2.GetBundleRequest()),
        ):
            err = await refused(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "retry after" in (err.details() or ""), err.details()
            assert "Traceback" not in (err.details() or "")
        # The storage says so itself, with the hint, within its wait (no hang).
        with pytest.raises(StorageUnavailable) as info:
            await storage.try_lease("probe", "me", 5.0, broker.clock.now())
        assert info.value.retry_after > 0

        proxy.up()  # the partition heals: the pool reconnects by itself
        second = await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD))
        assert second.spiffe_id == DEV_WORKLOAD
        # Nothing was issued while cut off: the ledger holds the first mint, the refusals
        # written after the heal (none: they failed closed), and the second mint.
        records = await storage.read_audit(limit=100_000)
        events = [json.loads(r.event) for r in records]
        serials = [
            e["details"]["serial"]
            for e in events
            if e.get("outcome") == "OK" and e.get("details", {}).get("serial")
        ]
        issued = {
            format(x509.load_der_x509_certificate(m.cert_chain[0]).serial_number, "x")
            for m in (first, second)
        }
        assert len(serials) == 2 and set(serials) == issued, (serials, issued)
        assert len(records) > entries_before
        verification = await broker.app.ledger.verify()
        assert verification.intact, verification.reason
    finally:
        proxy.stop()


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_multi_host_dsn_skips_unreachable_hosts_and_refuses_when_none_answers(
    pg_cluster: PgCluster,
) -> None:
    _, dsn = pg_cluster.fresh_database()
    dead = [f"127.0.0.1:{_dead_port()}" for _ in range(2)]
    live = f"{pg_cluster.host}:{pg_cluster.port}"
    many = dsn.replace(live, ",".join([*dead, live])) + "?target_session_attrs=read-write"
    storage = await open_postgres(many, primary_wait=1.0)
    try:
        await storage.migrate()
        assert await storage.schema_version() > 0
    finally:
        await storage.close()
    nowhere = dsn.replace(live, ",".join(dead))
    with pytest.raises(StorageError) as info:
        await asyncio.wait_for(open_postgres(nowhere, connect_timeout=2.0), 30)
    assert pg_cluster.password not in str(info.value)
    assert "cannot connect to PostgreSQL" in str(info.value)


# -- a real network fault: the database path crosses a veth pair into a network namespace ----

_FORWARDER = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection(sys.argv[3], int(sys.argv[4]))
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class _Namespace:
    """A network namespace joined to the host by a veth pair (10.213.N.1 host, .2 inside)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name, self.host_if, self.ns_if = f"bha{tag}", f"vh{tag}", f"vn{tag}"
        octet = secrets.randbelow(200) + 20
        self.host_ip, self.ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def _ip(self, *args: str, inside: bool = False) -> None:
        argv = ["ip", "netns", "exec", self.name, *args] if inside else list(args)
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        self._ip("ip", "netns", "add", self.name)
        self._ip("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("ip", "link", "set", self.ns_if, "netns", self.name)
        self._ip("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("ip", "link", "set", self.host_if, "up")
        self._ip("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, inside=True)
        self._ip("ip", "link", "set", self.ns_if, "up", inside=True)
        self._ip("ip", "link", "set", "lo", "up", inside=True)

    def drop_tcp(self) -> None:
        """Silently drop every TCP segment entering the namespace (no RST, no ICMP)."""
        self._ip("iptables", "-I", "INPUT", "-p", "tcp", "-j", "DROP", inside=True)

    def heal(self) -> None:
        self._ip("iptables", "-D", "INPUT", "-p", "tcp", "-j", "DROP", inside=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def _namespace_or_fail() -> _Namespace:
    namespace = _Namespace()
    try:
        namespace.create()
    except (OSError, subprocess.SubprocessError) as exc:
        namespace.delete()
        reason = f"cannot create a network namespace (root and iproute2 needed): {exc}"
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return namespace


@pytest.mark.ha
async def test_silent_partition_between_a_replica_and_its_database(
    broker_factory: BrokerFactory, pg_cluster: PgCluster
) -> None:
    """The database path runs host -> veth -> namespace -> veth -> host; the namespace then
    drops every segment silently (iptables DROP: no reset, no ICMP), as a cut cable or a
    firewall would. The replica must answer its clients UNAVAILABLE with the retry-after hint
    well inside their deadline, issue nothing, and serve again once the path heals."""
    namespace = _namespace_or_fail()
    host_leg = TcpProxy(pg_cluster.host, pg_cluster.port, listen_host=namespace.host_ip).start()
    port = _dead_port()
    forwarder = subprocess.Popen(
        [
            *("ip", "netns", "exec", namespace.name, sys.executable, "-c", _FORWARDER),
            *(namespace.ns_ip, str(port), namespace.host_ip, str(host_leg.port)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert forwarder.stdout is not None
        assert forwarder.stdout.readline().strip() == "ready"
        name, _ = pg_cluster.fresh_database()
        dsn = pg_cluster.dsn(name).replace(
            f"{pg_cluster.host}:{pg_cluster.port}/", f"{namespace.ns_ip}:{port}/"
        )
        storage = await open_postgres(
            dsn, primary_wait=1.0, command_timeout=3.0, connect_timeout=3.0
        )
        await storage.migrate()

        def use_postgres(sqlite: Any) -> Any:
            asyncio.get_running_loop().create_task(sqlite.close())
            return storage

        broker = await broker_factory(wrap_storage=use_postgres)
        broker.app.ledger.append_retry_budget = 1.0
        ca = broker.ca()
        first = await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD))

        namespace.drop_tcp()
        err = await refused(
            ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD), timeout=60)
        )
        # Not DEADLINE_EXCEEDED: the broker answered, it did not hang on the dead socket.
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "retry after" in (err.details() or "")

        namespace.heal()
        second = await ca.MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD), timeout=60
        )
        events = [json.loads(r.event) for r in await storage.read_audit(limit=100_000)]
        serials = [
            e["details"]["serial"]
            for e in events
            if e.get("outcome") == "OK" and e.get("details", {}).get("serial")
        ]
        issued = {
            format(x509.load_der_x509_certificate(m.cert_chain[0]).serial_number, "x")
            for m in (first, second)
        }
        assert len(serials) == 2 and set(serials) == issued, (serials, issued)
        assert (await broker.app.ledger.verify()).intact
    finally:
        forwarder.kill()
        forwarder.wait(timeout=30)
        if forwarder.stdout is not None:
            forwarder.stdout.close()
        host_leg.stop()
        namespace.delete()
