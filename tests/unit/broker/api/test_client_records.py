"""Client records from response messages (`broker.api.client.records.record_from`): the one
mapping every feature client uses, checked field by field against hand-built records."""

from __future__ import annotations

import datetime as dt

import pytest

from broker.api._proto import (
    access_pb2,
    ca_pb2,
    database_pb2,
    identity_pb2,
    secrets_pb2,
)
from broker.api.client.access import GrantView
from broker.api.client.ca import Authority
from broker.api.client.database import Lease
from broker.api.client.identity import Entry
from broker.api.client.records import record_from
from broker.api.client.secrets import SecretMeta, _details
from broker.api.timestamps import to_timestamp

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)


def test_a_lease_with_renames_and_unset_times() -> None:
    message = database_pb2.Lease(
        id="db/app/1",
        role="app",
        connection="pg",
        username="v_app_x",
        holder="spiffe://td/ns/web",
        state="active",
        created_at=to_timestamp(T0),
        expires_at=to_timestamp(T1),
        lease_duration_seconds=3600,
        renewable=True,
        attempts=2,
        last_error="",
    )
    lease = record_from(Lease, message, {"lease_duration": "lease_duration_seconds"})
    assert lease == Lease(
        id="db/app/1",
        role="app",
        connection="pg",
        username="v_app_x",
        holder="spiffe://td/ns/web",
        state="active",
        created_at=T0,
        expires_at=T1,
        max_expires_at=None,  # unset Timestamp on an optional field
        lease_duration=3600,
        renewable=True,
        attempts=2,
        last_error="",
        next_attempt_at=None,
    )


def test_repeated_fields_are_lists_or_tuples_as_the_record_says() -> None:
    entry = record_from(
        Entry,
        identity_pb2.Entry(
            id="e1",
            spiffe_id="spiffe://td/web",
            parent_id="spiffe://td/agent",
            selectors=["unix:uid:1000"],
            dns_names=["web.internal"],
            created_at=to_timestamp(T0),
        ),
    )
    assert entry.selectors == ["unix:uid:1000"] and isinstance(entry.selectors, list)
    assert entry.created_at == T0  # a required datetime
    meta = record_from(SecretMeta, secrets_pb2.SecretMetadata(missing=["owner", "service"]))
    assert meta.missing == ("owner", "service")
    assert meta.last_rotated is None


def test_the_converters_the_clients_use() -> None:
    grant = record_from(
        GrantView,
        access_pb2.Grant(id="g1", grantee="alice", state="active", expires_at=to_timestamp(T1)),
    )
    assert (grant.id, grant.grantee, grant.expires_at, grant.revoked_at) == (
        "g1",
        "alice",
        T1,
        None,
    )
    authority = record_from(Authority, ca_pb2.Authority(id="root-1", generation=3))
    assert (authority.id, authority.generation, authority.not_after) == ("root-1", 3, None)
    info = secrets_pb2.SecretInfo(
        metadata=secrets_pb2.SecretMetadata(reference="secret://a/b/c", current_version=2),
        versions=[secrets_pb2.SecretVersion(version=1, kek="k1", created_at=to_timestamp(T0))],
    )
    details = _details(info)
    assert details.metadata.current_version == 2
    assert [(v.version, v.kek, v.created_at, v.retire_at) for v in details.versions] == [
        (1, "k1", T0, None)
    ]


def test_a_record_field_the_message_lacks_is_an_error() -> None:
    with pytest.raises(KeyError):
        record_from(Lease, database_pb2.Lease())  # lease_duration is not renamed
