from __future__ import annotations

from pathlib import Path

import pytest

from ca.errors import InvalidInput
from ca.keys import PinSource, SoftwareBackend, key_uri, open_backend
from ca.keys.uri import (
    DEFAULT_PKCS11_MODULE,
    Pkcs11Uri,
    SoftwareUri,
    parse_backend_uri,
    validate_label,
)


def test_pkcs11_uri_with_defaults() -> None:
    parsed = parse_backend_uri("pkcs11:token=broker")
    assert parsed == Pkcs11Uri(token="broker", module_path=DEFAULT_PKCS11_MODULE)
    assert DEFAULT_PKCS11_MODULE == "/usr/lib/softhsm/libsofthsm2.so"


def test_pkcs11_uri_with_everything() -> None:
    parsed = parse_backend_uri(
        "pkcs11:token=my%20token;object=issuing-ca-3"
        "?module-path=/opt/hsm/lib.so&pin-source=file:/run/broker/pin"
    )
    assert isinstance(parsed, Pkcs11Uri)
    assert parsed.token == "my token"
    assert parsed.object == "issuing-ca-3"
    assert parsed.module_path == "/opt/hsm/lib.so"
    assert parsed.pin_source == PinSource("file", "/run/broker/pin")


def test_pkcs11_uri_env_pin_source() -> None:
    parsed = parse_backend_uri("pkcs11:token=broker?pin-source=env:BROKER_PIN")
    assert isinstance(parsed, Pkcs11Uri)
    assert parsed.pin_source == PinSource("env", "BROKER_PIN")


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11:token=broker?pin-value=1234",
        "pkcs11:token=broker;pin-value=1234",
        "pkcs11:token=broker?module-path=/x.so&pin-value=1234",
    ],
)
def test_inline_pin_is_refused(uri: str) -> None:
    with pytest.raises(InvalidInput, match="PINs are never accepted inline; use pin-source") as e:
        parse_backend_uri(uri)
    assert "1234" not in str(e.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pkcs11:", "names no token"),
        ("pkcs11:object=x", "names no token"),
        ("pkcs11:token=", "token is empty"),
        ("pkcs11:token=" + "x" * 33, "32 bytes"),
        ("pkcs11:token=a;token=b", "given twice"),
        ("pkcs11:token=a;slot-id=3", "unsupported path attribute 'slot-id'"),
        ("pkcs11:token=a?max-threads=3", "unsupported query attribute 'max-threads'"),
        ("pkcs11:token=a?max-sessions=0", "max-sessions must be a number 1..256"),
        ("pkcs11:token=a?max-sessions=257", "max-sessions must be a number 1..256"),
        ("pkcs11:token=a?max-sessions=-1", "max-sessions must be a number 1..256"),
        ("pkcs11:token", "has no value"),
        ("pkcs11:token=a?module-path=", "module-path is empty"),
        ("pkcs11:token=a?pin-source=http://x", "unsupported PIN source"),
        ("pkcs11:token=a;object=../x", "invalid key label"),
        ("pkcs11:token=%ff", "percent-encoding"),
        ("hsm:token=a", "unsupported key backend URI"),
        ("software:path=", "path is empty"),
        ("software:color=blue", "unsupported path attribute"),
    ],
)
def test_bad_uris_are_refused_with_a_reason(uri: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_backend_uri(uri)


def test_software_uris() -> None:
    assert parse_backend_uri("software:") == SoftwareUri()
    parsed = parse_backend_uri("software:path=/var/lib/broker/keys?pin-source=env:KEYS_PIN")
    assert parsed == SoftwareUri(
        path=Path("/var/lib/broker/keys"), pin_source=PinSource("env", "KEYS_PIN")
    )


def test_key_uri_formats() -> None:
    assert key_uri("pkcs11:token=broker", "issuing-ca-3") == (
        "pkcs11:token=broker;object=issuing-ca-3"
    )
    assert key_uri(
        "pkcs11:token=my%20hsm?module-path=/x.so&pin-source=file:/secret/pin", "kek-1"
    ) == ("pkcs11:token=my%20hsm;object=kek-1")
    assert key_uri("software:", "a:b") == "software:object=a:b"
    assert key_uri("software:path=/d/keys", "k") == "software:path=/d/keys;object=k"
    with pytest.raises(InvalidInput):
        key_uri("pkcs11:token=broker", "bad label")


def test_key_uri_round_trips_through_the_parser() -> None:
    shown = key_uri("pkcs11:token=a%3Bb", "x")
    assert shown == "pkcs11:token=a%3Bb;object=x"
    parsed = parse_backend_uri(shown)
    assert isinstance(parsed, Pkcs11Uri)
    assert (parsed.token, parsed.object) == ("a;b", "x")


@pytest.mark.parametrize("label", ["issuing-ca-3", "kek.2024", "jwt:signing_1", "A", "x" * 128])
def test_valid_labels(label: str) -> None:
    assert validate_label(label) == label


@pytest.mark.parametrize("label", ["", "-x", ".hidden", "a/b", "a b", "é", "x" * 129, "a\nb"])
def test_invalid_labels(label: str) -> None:
    with pytest.raises(InvalidInput, match="invalid key label"):
        validate_label(label)


# -- PIN sources -----------------------------------------------------------------------------


def test_pin_from_file_strips_one_trailing_newline(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"s3cret-pin\n")
    assert PinSource.parse(f"file:{pin_file}").read() == b"s3cret-pin"
    pin_file.write_bytes(b"s3cret-pin\r\n")
    assert PinSource.parse(f"file://{pin_file}").read() == b"s3cret-pin"
    pin_file.write_bytes(b" spaced pin ")
    assert PinSource.parse(f"file:{pin_file}").read() == b" spaced pin "


def test_pin_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_BROKER_PIN", "from-env\n")
    assert PinSource.parse("env:TEST_BROKER_PIN").read() == b"from-env"


def test_missing_pin_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"PIN file .*nope does not exist"):
        PinSource.parse(f"file:{tmp_path / 'nope'}").read()
    with pytest.raises(InvalidInput, match="is a directory"):
        PinSource.parse(f"file:{tmp_path}").read()
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(InvalidInput, match="is empty"):
        PinSource.parse(f"file:{tmp_path / 'empty'}").read()


def test_unset_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_BROKER_NO_PIN", raising=False)
    with pytest.raises(InvalidInput, match=r"TEST_BROKER_NO_PIN .* is not set"):
        PinSource.parse("env:TEST_BROKER_NO_PIN").read()


@pytest.mark.parametrize(
    "spec", ["", "1234", "pin:1234", "file:", "env:", "env:1BAD", "env:A-B", "file://host/x"]
)
def test_bad_pin_source_specs(spec: str) -> None:
    with pytest.raises(InvalidInput):
        PinSource.parse(spec)


def test_pin_source_never_holds_the_pin(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"top-secret-pin")
    source = PinSource.parse(f"file:{pin_file}")
    assert "top-secret-pin" not in repr(source)
    assert str(source) == f"file:{pin_file}"


# -- open_backend ----------------------------------------------------------------------------


def test_open_software_in_memory() -> None:
    backend = open_backend("software:")
    try:
        assert isinstance(backend, SoftwareBackend)
        assert not backend.persistent
    finally:
        backend.close()


def test_open_software_dir_with_pin_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS_PIN", "dir-pin")
    backend = open_backend(f"software:path={tmp_path / 'k'}", "env:TEST_KEYS_PIN")
    try:
        assert isinstance(backend, SoftwareBackend)
        assert backend.persistent
        assert (tmp_path / "k").is_dir()
    finally:
        backend.close()
    again = open_backend(
        f"software:path={tmp_path / 'k'}?pin-source=env:TEST_KEYS_PIN",
        PinSource("env", "TEST_KEYS_PIN"),
    )
    again.close()


def test_open_needs_a_pin_where_keys_are_protected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="needs a PIN"):
        open_backend("pkcs11:token=broker")
    with pytest.raises(InvalidInput, match="needs a PIN"):
        open_backend(f"software:path={tmp_path}")


def test_open_refuses_two_different_pin_sources() -> None:
    with pytest.raises(InvalidInput, match="two different PIN sources"):
        open_backend("pkcs11:token=broker?pin-source=env:A", "env:B")


def test_open_pkcs11_reads_pin_and_reports_missing_pin(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        open_backend(f"pkcs11:token=broker?pin-source=file:{tmp_path / 'missing'}")


def test_pkcs11_uri_max_sessions() -> None:
    parsed = parse_backend_uri("pkcs11:token=a?max-sessions=2")
    assert isinstance(parsed, Pkcs11Uri) and parsed.max_sessions == 2
    default = parse_backend_uri("pkcs11:token=a")
    assert isinstance(default, Pkcs11Uri) and default.max_sessions is None


def test_backend_schemes_are_a_registry() -> None:
    from ca.keys.uri import backend_schemes

    assert backend_schemes() == ("pkcs11", "software")


def test_pkcs11_without_python_pkcs11_names_the_package(tmp_path: Path) -> None:
    # In a process of its own: python-pkcs11 made unimportable before ca.keys is loaded.
    import subprocess
    import sys

    pin = tmp_path / "pin"
    pin.write_text("pin-1234\n")
    script = f"""
import sys
sys.modules["pkcs11"] = None  # as if python-pkcs11 were not installed
from ca.errors import KeyBackendError
from ca.keys import SoftwareBackend, open_backend
try:
    open_backend("pkcs11:token=broker?pin-source=file:{pin}")
except KeyBackendError as exc:
    print(exc)
assert "ca.keys.pkcs11" not in sys.modules
assert isinstance(open_backend("software:"), SoftwareBackend)  # other schemes need nothing
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "the pkcs11 key backend needs the Python package python-pkcs11, which is not "
        "installed (pip install python-pkcs11)\n"
    )
