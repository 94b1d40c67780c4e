"""The KMS SDK's local data-key cache (bounded in uses, age and entries) and envelope format,
and the KMS ciphertext and encryption-context rules, without a broker."""

from __future__ import annotations

import datetime as dt
import os
import pickle
from collections.abc import Mapping

import pytest

from broker.errors import InvalidArgument
from broker.kms import Ciphertext, context_bytes, context_hash
from broker.kms.sdk import EnvelopeError, KmsEnvelope, LocalDataKeyCache


class FakeSource:
    """Data keys "wrapped" as (counter, context) so a wrong context is refused."""

    def __init__(self) -> None:
        self.keys: dict[bytes, tuple[bytes, bytes]] = {}
        self.generated = 0
        self.decrypted = 0

    def generate_data_key(self, key: str, context: Mapping[str, str]) -> tuple[bytes, bytes]:
        self.generated += 1
        plaintext = os.urandom(32)
        wrapped = f"{key}:{self.generated}".encode()
        self.keys[wrapped] = (plaintext, context_bytes(context))
        return plaintext, wrapped

    def decrypt_data_key(self, ciphertext: bytes, context: Mapping[str, str]) -> bytes:
        self.decrypted += 1
        plaintext, bound = self.keys[ciphertext]
        if bound != context_bytes(context):
            raise InvalidArgument("wrong encryption context")
        return plaintext


class Mono:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_data_keys_are_reused_up_to_max_uses_then_replaced() -> None:
    source = FakeSource()
    envelope = KmsEnvelope(source, "k", LocalDataKeyCache(max_uses=3))
    blobs = [envelope.encrypt(b"m%d" % i, {"a": "1"}) for i in range(7)]
    assert source.generated == 3  # uses 1-3, 4-6, 7
    reader = KmsEnvelope(source, "k")
    assert [reader.decrypt(b, {"a": "1"}) for b in blobs] == [b"m%d" % i for i in range(7)]
    assert source.decrypted == 3  # one unwrap per distinct data key


def test_data_keys_expire_by_age() -> None:
    source, mono = FakeSource(), Mono()
    cache = LocalDataKeyCache(max_age=dt.timedelta(seconds=60), monotonic=mono)
    envelope = KmsEnvelope(source, "k", cache)
    envelope.encrypt(b"a", {})
    mono.now = 59
    envelope.encrypt(b"b", {})
    assert source.generated == 1
    mono.now = 61
    envelope.encrypt(b"c", {})
    assert source.generated == 2


def test_contexts_get_their_own_data_keys_and_must_match() -> None:
    source = FakeSource()
    envelope = KmsEnvelope(source, "k")
    one = envelope.encrypt(b"x", {"order": "1"})
    envelope.encrypt(b"y", {"order": "2"})
    assert source.generated == 2
    with pytest.raises((EnvelopeError, InvalidArgument)):
        KmsEnvelope(source, "k").decrypt(one, {"order": "2"})
    with pytest.raises(EnvelopeError, match="malformed"):
        envelope.decrypt(one[:10], {"order": "1"})
    with pytest.raises(EnvelopeError, match="did not verify"):
        envelope.decrypt(one[:-1] + bytes([one[-1] ^ 1]), {"order": "1"})


def test_the_cache_is_bounded_and_never_shows_or_pickles_keys() -> None:
    cache = LocalDataKeyCache(max_entries=2)
    for i in range(3):
        cache.put(i, b"secret-key-%d" % i, b"wrapped")
    assert len(cache) == 2 and cache.get(0) is None
    assert "secret" not in repr(cache)
    with pytest.raises(TypeError):
        pickle.dumps(cache)


def test_context_limits_and_canonical_form() -> None:
    assert context_bytes({"a": "1", "b": "2"}) == context_bytes({"b": "2", "a": "1"})
    assert context_hash({"a": "1"}) != context_hash({"a": "2"})
    assert context_bytes({"ab": "c"}) != context_bytes({"a": "bc"})
    with pytest.raises(InvalidArgument, match="32 pairs"):
        context_bytes({str(i): "" for i in range(33)})
    with pytest.raises(InvalidArgument, match="4096 bytes"):
        context_bytes({"k": "v" * 4096})
    with pytest.raises(InvalidArgument, match="empty"):
        context_bytes({"": "v"})


def test_ciphertext_round_trip_and_malformed_input() -> None:
    blob = Ciphertext("acme", "orders-dek", 3, b"w" * 40, b"n" * 12, b"c" * 20)
    assert Ciphertext.from_bytes(blob.to_bytes()) == blob
    raw = blob.to_bytes()
    for bad in (b"", b"bkms", raw[:-5], b"xxxx" + raw[4:], raw[:20]):
        with pytest.raises(InvalidArgument, match="malformed ciphertext"):
            Ciphertext.from_bytes(bad)
