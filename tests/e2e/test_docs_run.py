"""Docs that run: every shell block of README.md, then docs/*.md, in order, against a real
`broker serve --dev`.

A fenced block in `sh`, `bash` or `console` is run unless the line before it is an
`<!-- illustrative: REASON -->` comment (it needs a second operator, an OpenID provider, a
package install, root, placeholders...); those are listed, never silently dropped. The test
serves the broker itself with the data dir `.broker` in a scratch working directory (where the
docs' relative paths, `.broker/bundle.pem` and `.venv`, resolve), so a line that starts the dev
broker (`bash scripts/run serve &`) is the one line it does not run. `sh` blocks run in one
bash with `set -euo pipefail`; a `console` block's `$ ` lines are run one by one and the lines
after each are the output it must print (stdout or stderr) and it must fail.

What a reader supplies, the test supplies as environment variables (the docs name them where
they are used): `BROKER_ADDR` (the broker), `PG_DSN` / `PG_ADMIN_PASSWORD` (a PostgreSQL
database with a table `items`, its admin login (CREATEROLE, pg_signal_backend, owner of the
database) and an existing login `app_user`, on a throwaway scram-sha-256 cluster) and
`MYSQL_DSN` / `MYSQL_ADMIN_PASSWORD` (a MariaDB database with a table `items` and an admin
login with every privilege, on a throwaway server). Each document starts with those admin
passwords valid again (a document's `db connection rotate-root` changes them, as it should).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import BrokerProcess
from tests.fixtures.mariadb import MariaDBServer
from tests.fixtures.postgres import PgCluster

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_ILLUSTRATIVE = re.compile(r"^<!--\s*illustrative\b.*-->\s*$")
_STARTS_BROKER = re.compile(r"^\s*(bash scripts/run serve|broker serve --dev)\b")
# `[--opt]`, LEASE_ID, <digest>, and ` | ` between alternatives (`list | show NAME`); a real
# pipe into a filter (`... | jq -r .x`) is no placeholder.
_PLACEHOLDER = re.compile(
    r"\[--|LEASE_ID|<digest>| \| (?!(?:jq|python3?|grep|head|tail|base64|tr|sed|cut|sort|wc) )"
)


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    illustrative: bool

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """The fenced sh/bash/console blocks of a Markdown file, each marked illustrative or not."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, fence.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in ("sh", "bash", "console"):
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            blocks.append(
                Block(
                    path.name,
                    start + 1,
                    lang,
                    "\n".join(lines[start + 1 : j]),
                    bool(_ILLUSTRATIVE.match(before)),
                )
            )
        i = j + 1
    return blocks


def test_blocks_are_found_and_marked() -> None:
    blocks = [b for doc in DOCS for b in shell_blocks(doc)]
    assert blocks, "no shell block found"
    runnable = [b for b in blocks if not b.illustrative]
    assert any("broker svid mint" in b.text for b in runnable)
    # A block that cannot run as written says so: placeholders only in illustrative blocks.
    for b in runnable:
        assert not re.search(_PLACEHOLDER, b.text), b.name


@dataclass(frozen=True)
class Workspace:
    path: Path
    env: dict[str, str]  # what the reader supplies (module docstring)
    reset: Callable[[], None]  # the admin passwords in env are valid again


@pytest.fixture(scope="module")
def workdir(
    tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster, mariadb_server: MariaDBServer
) -> Iterator[Workspace]:
    work = tmp_path_factory.mktemp("docs")
    (work / ".venv").symlink_to(Path(sys.prefix))
    suffix = secrets.token_hex(4)
    pg_db, pg_admin, pg_password = f"app_{suffix}", f"admin_{suffix}", secrets.token_urlsafe(18)
    pg_cluster.psql(f'CREATE DATABASE "{pg_db}"')
    pg_cluster.psql(f"CREATE ROLE \"{pg_admin}\" LOGIN CREATEROLE PASSWORD '{pg_password}'")
    pg_cluster.psql(f'ALTER DATABASE "{pg_db}" OWNER TO "{pg_admin}"')
    pg_cluster.psql(f'GRANT pg_signal_backend TO "{pg_admin}"')
    pg_cluster.psql("CREATE TABLE items (id int); INSERT INTO items VALUES (1)", pg_db)
    pg_cluster.psql(f'ALTER TABLE items OWNER TO "{pg_admin}"', pg_db)
    pg_cluster.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_user') THEN "
        "CREATE ROLE app_user LOGIN; END IF; END $$"
    )
    my_db, my_admin, my_password = f"shop_{suffix}", f"admin_{suffix}", secrets.token_urlsafe(18)
    mariadb_server.sql(f"CREATE DATABASE `{my_db}`")
    mariadb_server.sql(f"CREATE TABLE `{my_db}`.items (id int)")
    mariadb_server.sql(f"CREATE USER '{my_admin}'@'%%' IDENTIFIED BY %s", my_password)
    mariadb_server.sql(f"GRANT ALL PRIVILEGES ON *.* TO '{my_admin}'@'%' WITH GRANT OPTION")

    def reset() -> None:
        pg_cluster.psql(f"ALTER ROLE \"{pg_admin}\" PASSWORD '{pg_password}'")
        mariadb_server.sql(f"ALTER USER '{my_admin}'@'%%' IDENTIFIED BY %s", my_password)

    server = BrokerProcess(
        work / ".broker",
        tmp_path_factory.mktemp("docs-logs"),
        serve_args=["--dev", "--data-dir", str(work / ".broker")],
    )
    server.start()
    try:
        yield Workspace(
            work,
            {
                "BROKER_ADDR": server.address,
                "PG_DSN": f"postgresql://{pg_admin}@{pg_cluster.host}:{pg_cluster.port}/{pg_db}",
                "PG_ADMIN_PASSWORD": pg_password,
                "MYSQL_DSN": f"mysql://{my_admin}@{mariadb_server.host}:"
                f"{mariadb_server.port}/{my_db}",
                "MYSQL_ADMIN_PASSWORD": my_password,
            },
            reset,
        )
    finally:
        server.stop()


def _env(work: Workspace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "PG", "MYSQL"))}
    env.update(work.env)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_sh(block: Block, work: Workspace) -> None:
    script = "\n".join(
        "true  # the test serves the broker" if _STARTS_BROKER.match(ln) else ln
        for ln in block.text.splitlines()
    )
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=work.path,
        env=_env(work),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.name} exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
        f"stderr:\n{done.stderr[-3000:]}"
    )


def _run_console(block: Block, work: Workspace) -> None:
    commands: list[tuple[str, list[str]]] = []
    for ln in block.text.splitlines():
        if ln.startswith("$ "):
            commands.append((ln[2:], []))
        elif commands and ln.strip():
            commands[-1][1].append(ln)
    assert commands, f"{block.name}: a console block without a $ line"
    for command, expected in commands:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=work.path,
            env=_env(work),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out = done.stdout + done.stderr
        if any(line.startswith("broker: ") for line in expected):
            assert done.returncode == 1, f"{block.name}: {command!r} exited {done.returncode}"
        for line in expected:
            assert line in out, f"{block.name}: {command!r} printed\n{out}\nnot {line!r}"


def _all_blocks() -> list[Block]:
    """Every block in order; DOCS_RUN_ONLY=kms.md,secrets.md narrows it to those documents
    (to work on one page; CI runs them all)."""
    only = {name.strip() for name in os.environ.get("DOCS_RUN_ONLY", "").split(",") if name}
    return [b for doc in DOCS if not only or doc.name in only for b in shell_blocks(doc)]


@pytest.mark.timeout(1800)  # a few hundred CLI commands, each its own Python process
def test_docs_run_in_order(workdir: Workspace) -> None:
    ran, illustrative = [], []
    doc = ""
    for block in _all_blocks():
        if block.doc != doc:
            doc = block.doc
            workdir.reset()
        if block.illustrative:
            illustrative.append(block.name)
            continue
        print(f"running {block.name}", flush=True)
        if block.lang == "console":
            _run_console(block, workdir)
        else:
            _run_sh(block, workdir)
        ran.append(block.name)
    assert ran, "no block ran"
    print(f"ran {ran}; illustrative {illustrative}")


def test_illustrative_blocks_say_why() -> None:
    for doc in DOCS:
        text = doc.read_text()
        for marker in re.findall(r"<!--\s*illustrative\b(.*?)-->", text):
            assert marker.strip(": ").strip(), (
                f"{doc.name}: an illustrative marker without a reason"
            )
