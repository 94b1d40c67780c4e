"""`loadtests run --server A:P,B:P`: the load goes to several broker replicas through one gRPC
channel per worker over gRPC's own address list (round_robin), loopback IP literals only."""

from __future__ import annotations

import pytest

from loadtests import cli
from loadtests.targets.broker import grpc_target, split_servers
from loadtests.targets.grpcclient import GrpcSpec


def test_one_address_is_kept_as_given() -> None:
    assert grpc_target("127.0.0.1:8443") == "127.0.0.1:8443"
    assert grpc_target("localhost:8443") == "localhost:8443"


def test_several_addresses_become_one_grpc_address_list() -> None:
    assert split_servers(" 127.0.0.1:1, 127.0.0.2:2,127.0.0.1:1,") == ["127.0.0.1:1", "127.0.0.2:2"]
    assert grpc_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.parametrize("servers", ["localhost:1,127.0.0.1:2", "127.0.0.1:1,[::1]:2"])
def test_several_addresses_need_ip_literals_of_one_family(servers: str) -> None:
    with pytest.raises(ValueError):
        grpc_target(servers)


def test_a_channel_over_several_replicas_spreads_its_calls() -> None:
    def spec(address: str) -> GrpcSpec:
        return GrpcSpec(
            address=address, method="/m", requests=(b"",), response_type="m:C",
            require_field="f", root_pem=b"", cert_pem=b"", key_pem=b"", server_name="n",
        )  # fmt: skip

    assert ("grpc.lb_policy_name", "round_robin") in spec(
        "ipv4:127.0.0.1:1,127.0.0.1:2"
    ).channel_options()
    assert all(k != "grpc.lb_policy_name" for k, _ in spec("127.0.0.1:1").channel_options())


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ("127.0.0.1:1,10.1.2.3:2", "loopback"),
        ("localhost:1,127.0.0.1:2", "IP addresses"),
    ],
)
def test_the_cli_refuses_a_replica_list_it_cannot_use(
    servers: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli.build_parser().parse_args(
        [
            "run",
            "--scenario",
            "mixed",
            "--report",
            "/tmp/x",
            "--server",
            servers,
            "--data-dir",
            "/tmp",
        ]
    )
    with pytest.raises(SystemExit) as info:
        cli._resolve(args)
    assert message in str(info.value)
