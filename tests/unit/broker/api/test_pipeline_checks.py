"""The pipeline's one check on durations (issue 20, finding 14): every `*_seconds` field of
every request is bounded before any servicer does arithmetic with it."""

import pytest

from broker.api._proto import access_pb2, ca_pb2, database_pb2, identity_pb2, secrets_pb2
from broker.api.server.pipeline import MAX_DURATION_SECONDS, check_durations
from broker.errors import InvalidArgument

EXTREMES = (2**63 - 1, -(2**63))
# FieldDescriptor.CPPTYPE_INT32 / INT64 / UINT32 / UINT64 and the largest value each holds
LARGEST = {1: 2**31 - 1, 2: 2**63 - 1, 3: 2**32 - 1, 4: 2**64 - 1}


@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize(
    ("message", "field"),
    [
        (ca_pb2.MintX509SVIDRequest, "ttl_seconds"),
        (ca_pb2.MintJWTSVIDRequest, "ttl_seconds"),
        (access_pb2.CreateGrantRequest, "ttl_seconds"),
        (identity_pb2.CreateJoinTokenRequest, "ttl_seconds"),
        (secrets_pb2.PutSecretRequest, "rotation_period_seconds"),
    ],
)
def test_out_of_range_durations_are_refused_naming_the_field(
    message: type, field: str, value: int
) -> None:
    with pytest.raises(InvalidArgument, match=f"{field} = {value} is out of range"):
        check_durations(message(**{field: value}))


def test_every_seconds_field_of_every_request_is_covered() -> None:
    """No request type slips through: each int `*_seconds` field, set to 2^63-1, is refused."""
    checked = 0
    for module in (access_pb2, ca_pb2, database_pb2, identity_pb2, secrets_pb2):
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            cls = getattr(module, descriptor.name)
            for field in descriptor.fields:
                top = LARGEST.get(field.cpp_type, 0)
                if field.name.endswith("_seconds") and not field.is_repeated and top:
                    if top <= MAX_DURATION_SECONDS:
                        continue  # the type cannot hold an out-of-range value
                    with pytest.raises(InvalidArgument):
                        check_durations(cls(**{field.name: top}))
                    checked += 1
    assert checked >= 10


def test_ordinary_and_negative_values_are_left_to_the_domain() -> None:
    check_durations(ca_pb2.MintX509SVIDRequest(ttl_seconds=3600))
    check_durations(ca_pb2.MintX509SVIDRequest(ttl_seconds=-60))  # "must be positive" later
    check_durations(ca_pb2.MintX509SVIDRequest(ttl_seconds=MAX_DURATION_SECONDS))
