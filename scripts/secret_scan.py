"""CI secret scan: fail when detect-secrets finds anything not already in .secrets.baseline.

Unlike `detect-secrets-hook`, this compares findings by file and hashed secret only, so a
known (audited) finding that merely moved to another line does not fail the build, and the
baseline file is never rewritten. New findings are listed one per line.
Usage: python scripts/secret_scan.py  (from the repository root, with detect-secrets installed)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    scan = subprocess.run(
        [
            sys.executable,
            "-m",
            "detect_secrets",
            "scan",
            "--exclude-files",
            r"^\.secrets\.baseline$",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(scan.stdout)["results"]
    baseline = json.loads(Path(".secrets.baseline").read_text())["results"]
    known = {(name, s["hashed_secret"]) for name, items in baseline.items() for s in items}
    new = [
        f"{name}:{s['line_number']}: {s['type']}"
        for name, items in found.items()
        for s in items
        if (name, s["hashed_secret"]) not in known
    ]
    for line in new:
        print(f"possible secret: {line}", file=sys.stderr)
    if new:
        print(
            "secret scan failed: remove the secret, or if it is a false positive, audit it into "
            ".secrets.baseline (detect-secrets scan --baseline .secrets.baseline)",
            file=sys.stderr,
        )
        return 1
    print(f"secret scan: no new findings ({len(known)} audited in the baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
