"""`broker scan`: find managed secret values (by keyed fingerprint) and unmanaged ones
(detect-secrets) in files, directories, git history and OCI image tarballs.

Exit status: 0 clean, 1 a managed value or an unmanaged secret was found (each printed as
`LOCATION:LINE: REFERENCE`, never the value), 2 the scan could not run (one line on stderr).
Skipped inputs (binary, too large, symlinks out of the tree, unreadable layers) are reported on
stderr and do not fail the scan.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from broker.cli.options import clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render, wants_json
from broker.errors import BrokerError
from broker.scan import (
    FingerprintSet,
    Scanner,
    ScanReport,
    git_history,
    image_layers,
    load_baseline,
    walk_paths,
)
from broker.scan.sources import DEFAULT_MAX_BYTES, Blob, Skip

__all__ = ["scan", "scan_json"]

_BASELINE = Path(".secrets.baseline")


class ScanRefusal(Refusal):
    exit_code = 2


def scan_json(report: ScanReport, seconds: float) -> dict[str, Any]:
    """`broker scan --output json`: locations and references, never a value."""
    return {
        "hits": [record_json(h) for h in report.hits],
        "unmanaged": [
            record_json(f, rename={"kind": "type"}, exclude={"hashed_secret"})
            for f in report.findings
        ],
        "skipped": [record_json(s) for s in report.skips],
        "scanned": {"blobs": report.blobs, "bytes": report.bytes, "seconds": round(seconds, 3)},
    }


@click.command("scan")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--git",
    "git_range",
    metavar="RANGE",
    help="Also scan the lines added in this git revision range (e.g. origin/main..HEAD; ALL "
    "for every ref).",
)
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
    help="The git repository for --git.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="An OCI image layout tarball (or docker save output); every layer is scanned.",
)
@click.option("--prefix", default="", help="Only managed secrets whose reference starts so.")
@click.option("--tenant", default="", help="The tenant whose secrets to look for.")
@click.option(
    "--offline",
    is_flag=True,
    help="Do not ask the broker for fingerprints (unmanaged secrets only).",
)
@click.option("--no-detect-secrets", is_flag=True, help="Do not look for unmanaged secrets.")
@click.option(
    "--baseline",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A detect-secrets baseline of known false positives [default: ./.secrets.baseline "
    "when present].",
)
@click.option(
    "--exclude-unmanaged",
    "exclude_unmanaged",
    multiple=True,
    metavar="REGEX",
    help="Paths (or locations) where detect-secrets findings are not reported, e.g. "
    "'^broker/api/_proto/' (managed values are still looked for there).",
)
@click.option(
    "--max-size",
    type=click.IntRange(1),
    default=DEFAULT_MAX_BYTES,
    show_default=True,
    help="Skip (and report) files larger than this many bytes.",
)
@connection_options(on_group=False)
@click.pass_context
def scan(
    ctx: click.Context,
    paths: tuple[Path, ...],
    git_range: str | None,
    repo: Path,
    images: tuple[Path, ...],
    prefix: str,
    tenant: str,
    offline: bool,
    no_detect_secrets: bool,
    baseline: Path | None,
    exclude_unmanaged: tuple[str, ...],
    max_size: int,
) -> None:
    """Find leaked secrets: managed values by fingerprint, never by value.

    broker scan .                          # a tree
    broker scan --git origin/main..HEAD    # what a branch adds
    broker scan --image app.tar            # every layer of an image
    """
    if not paths and not git_range and not images:
        raise click.UsageError("give PATHS, --git RANGE or --image FILE")
    if offline and no_detect_secrets:
        raise click.UsageError("--offline with --no-detect-secrets would scan for nothing")
    known: frozenset[str] = frozenset()
    try:
        if baseline is not None:
            known = load_baseline(baseline)
        elif _BASELINE.is_file():
            known = load_baseline(_BASELINE)
    except BrokerError as exc:
        raise ScanRefusal(str(exc)) from None
    if offline:
        fingerprints = FingerprintSet(b"", ())
    else:
        keyset = clients(ctx).scan.fingerprints(tenant=tenant, prefix=prefix)
        fingerprints = FingerprintSet(keyset.key, keyset.fingerprints)
    started = time.perf_counter()
    report = ScanReport()
    try:
        excluded = [re.compile(x) for x in exclude_unmanaged]
    except re.error as exc:
        raise click.BadParameter(str(exc), param_hint="--exclude-unmanaged") from None
    with Scanner(
        fingerprints, detect_secrets=not no_detect_secrets, baseline=known, exclude=excluded
    ) as scanner:
        if scanner.detect_secrets_missing:
            click.echo("broker scan: detect-secrets is not installed; unmanaged secrets are not "
                       "looked for", err=True)  # fmt: skip
        try:
            sources: list[Iterator[Blob | Skip]] = []
            if paths:
                sources.append(walk_paths(list(paths), max_bytes=max_size))
            for image in images:
                sources.append(image_layers(image, max_bytes=max_size))
            if git_range:
                sources.append(git_history(repo, git_range, max_bytes=max_size))
            for source in sources:
                scanner.run(source, report)
        except BrokerError as exc:
            raise ScanRefusal(str(exc)) from None
    seconds = time.perf_counter() - started
    _print(ctx, report, seconds, len(fingerprints))
    if report.hits or report.findings:
        ctx.exit(1)


def _print(ctx: click.Context, report: ScanReport, seconds: float, managed: int) -> None:
    """JSON on stdout; or the findings on stdout, what was skipped and a summary on stderr."""
    if wants_json(ctx):
        render(ctx, scan_json(report, seconds), ())
        return
    for skip in report.skips:
        click.echo(f"broker scan: skipped {skip.location}: {skip.reason}", err=True)
    render(ctx, scan_json(report, seconds), _lines(report))
    mb = report.bytes / 1e6
    rate = mb / seconds if seconds > 0 else 0.0
    click.echo(
        f"broker scan: {report.blobs} blob(s), {mb:.1f} MB in {seconds:.2f} s ({rate:.1f} MB/s), "
        f"{managed} managed fingerprint(s): {len(report.hits)} managed hit(s), "
        f"{len(report.findings)} unmanaged, {len(report.skips)} skipped",
        err=True,
    )
    sys.stderr.flush()


def _lines(report: ScanReport) -> list[str]:
    """What was found, one line each (stdout): where, and which managed secret or what kind
    of unmanaged one, never the value."""
    lines = [
        f"{hit.location}:{hit.line}: managed secret {hit.reference} (version {hit.version}); "
        f"answer with: broker secrets rotate {hit.reference} --env "
        f"{hit.reference.split('/')[3]} (or broker secrets revoke {hit.reference})"
        for hit in report.hits
    ]
    lines.extend(f"{f.location}:{f.line}: unmanaged secret ({f.kind})" for f in report.findings)
    return lines
