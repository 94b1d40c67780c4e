"""The scanner's matching: keyed fingerprints at every token granularity, line numbers, no
value in any result, and the sources' refusals."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from broker.scan import Blob, Fingerprint, FingerprintSet, Scanner, fingerprint, image_layers
from broker.scan.sources import MalformedImage, walk_paths

KEY = b"k" * 32
VALUE = b"correct-horse:battery=staple"  # delimiters inside the value itself
SIMPLE = b"hunter2hunter2"


def _set(*values: bytes) -> FingerprintSet:
    return FingerprintSet(
        KEY,
        [
            Fingerprint(f"secret://svc/dev/v{i}", 1, fingerprint(KEY, v), len(v))
            for i, v in enumerate(values)
        ],
    )


@pytest.mark.parametrize(
    "text",
    [
        b'password = "hunter2hunter2"',  # pragma: allowlist secret
        b"PASSWORD=hunter2hunter2",
        b"url: postgres://app:hunter2hunter2@db/app",  # pragma: allowlist secret
        b"  hunter2hunter2  ",
        b"call(token='hunter2hunter2', x=1)",
    ],
)
def test_a_simple_value_is_found_wherever_it_sits(text: bytes) -> None:
    scanner = Scanner(_set(SIMPLE), detect_secrets=False)
    hits, _ = scanner.scan_blob(Blob("f", b"first\n" + text + b"\n"))
    assert [(h.line, h.reference) for h in hits] == [(2, "secret://svc/dev/v0")]
    assert SIMPLE.decode() not in repr(hits)


def test_a_value_with_delimiters_is_found_as_a_whole_token_or_line() -> None:
    scanner = Scanner(_set(VALUE), detect_secrets=False)
    assert scanner.scan_blob(Blob("f", b'KEY="' + VALUE + b'"'))[0]
    assert scanner.scan_blob(Blob("f", VALUE + b"\n"))[0]


def test_near_misses_are_not_hits() -> None:
    scanner = Scanner(_set(SIMPLE), detect_secrets=False)
    for text in (b"hunter2hunter", b"hunter2hunter23", b"HUNTER2HUNTER2", b"xhunter2hunter2"):
        assert scanner.scan_blob(Blob("f", text))[0] == []


def test_line_numbers_of_a_git_blob_are_its_own() -> None:
    scanner = Scanner(_set(SIMPLE), detect_secrets=False)
    blob = Blob("abc:f", b"a\n" + SIMPLE, line_numbers=(10, 42))
    assert [h.line for h in scanner.scan_blob(blob)[0]] == [42]


def test_an_empty_set_matches_nothing() -> None:
    scanner = Scanner(FingerprintSet(b"", ()), detect_secrets=False)
    assert scanner.scan_blob(Blob("f", SIMPLE))[0] == []


def test_a_fingerprint_set_never_shows_its_key() -> None:
    fps = _set(SIMPLE)
    assert "kkkk" not in repr(fps) and "kkkk" not in repr(list(fps.matches_in(SIMPLE)))


def test_walk_reports_what_it_does_not_scan(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "out").symlink_to("/etc/hostname")
    items = list(walk_paths([tmp_path]))
    reasons = {Path(i.location).name: getattr(i, "reason", "scanned") for i in items}
    assert reasons["a.txt"] == "scanned" and reasons["b.bin"] == "binary"
    assert "out of the scanned tree" in reasons["out"]
    assert reasons["dangling"] == "dangling symlink"


def test_a_layer_that_is_not_a_tar_is_a_reported_skip(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {
            "manifest.json": b'[{"Layers": ["l1.tar"]}]',
            "l1.tar": b"not a tar" * 100,
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    image = tmp_path / "i.tar"
    image.write_bytes(buf.getvalue())
    items = list(image_layers(image))
    assert len(items) == 1 and "not a readable tar" in getattr(items[0], "reason", "")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(MalformedImage):
        list(image_layers(tmp_path / "empty.tar"))
