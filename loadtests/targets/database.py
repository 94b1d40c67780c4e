"""Target databases for the database-credential benchmarks: a throwaway PostgreSQL cluster or
MariaDB server (from tests/fixtures: initdb / mariadb-install-db into a temp dir, free port,
passwords checked), with a database `app` holding a table `items` (PostgreSQL: readable by the
group role `bench_reader`), and the statements that the broker's role and OpenBao's role both
run.

`shared(plugin)` starts one per process on first use and stops it at exit (the scenario
set-ups of the broker and of OpenBao use the same server).
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from loadtests import procs

__all__ = [
    "BAO_CREATION",
    "CREATION",
    "ROLE",
    "TABLE_GRANT",
    "Database",
    "bao_setup",
    "broker_setup",
    "shared",
]

ROLE = "bench"
# PostgreSQL: membership in a group role holding the privilege (GRANT SELECT ON a table to
# each user grows the table's ACL until "row is too big" after ~1,700 live users, for both).
CREATION = {
    "postgresql": "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} "
    "VALID UNTIL {{expiration}};\nGRANT bench_reader TO {{name}};",
    "mysql": "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}};\n"
    "GRANT SELECT ON app.items TO {{name}}@'%';",
}
# The original shape, kept for comparison (python -m loadtests.dbcreds --grant table):
# concurrent GRANTs on one table collide ("tuple concurrently updated") and grow its ACL.
TABLE_GRANT = {
    "broker": "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} "
    "VALID UNTIL {{expiration}};\nGRANT SELECT ON items TO {{name}};",
    "openbao": "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
    "VALID UNTIL '{{expiration}}'; GRANT SELECT ON items TO \"{{name}}\";",
}
BAO_CREATION = {
    "postgresql": "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
    "VALID UNTIL '{{expiration}}'; GRANT bench_reader TO \"{{name}}\";",
    "mysql": "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'; "
    "GRANT SELECT ON app.items TO '{{name}}'@'%';",
}


class Database:
    """A throwaway PostgreSQL cluster or MariaDB server with database `app`, table `items`."""

    def __init__(self, plugin: str) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        self.plugin = plugin
        if plugin == "postgresql":
            from tests.fixtures.postgres import start_cluster

            self.pg = start_cluster()
            self.pg.psql("CREATE DATABASE app")
            self.pg.psql("CREATE TABLE items (id int); INSERT INTO items VALUES (1)", "app")
            self.pg.psql(
                "CREATE ROLE bench_reader NOLOGIN; GRANT SELECT ON items TO bench_reader", "app"
            )
            self.host, self.port = self.pg.host, self.pg.port
            self.user = self.pg.superuser
            self.password = self.pg.password
            self.data_dir = self.pg.data_dir
        else:
            from tests.fixtures.mariadb import start_mariadb

            self.my = start_mariadb()
            self.my.sql("CREATE DATABASE app")
            self.my.sql("CREATE TABLE app.items (id int)")
            self.host, self.port = self.my.host, self.my.port
            self.user = "root"
            self.password = self.my.root_password
            self.data_dir = self.my.base_dir / "data"

    @property
    def dsn(self) -> str:
        scheme = "postgresql" if self.plugin == "postgresql" else "mysql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/app"

    def users(self, prefix: str) -> int:
        """How many users' names start with `prefix` (letters, digits, '_' and '-' only)."""
        assert all(c.isalnum() or c in "_-" for c in prefix)
        if self.plugin == "postgresql":
            out = self.pg.psql(
                f"SELECT count(*) FROM pg_roles WHERE left(rolname, {len(prefix)}) = '{prefix}'"
            )
            return int(out.strip())
        rows = self.my.sql(
            "SELECT count(*) FROM mysql.user WHERE LEFT(User, %s) = %s", len(prefix), prefix
        )
        return int(rows[0][0])

    def pids(self) -> list[int]:
        """The server's processes (PostgreSQL: postmaster and every backend)."""
        if self.plugin == "postgresql":
            pid = int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])
            return procs.process_tree(pid)
        assert self.my.process is not None
        return [self.my.process.pid]

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids())

    def stop(self) -> None:
        if self.plugin == "postgresql":
            self.pg.stop()
        else:
            self.my.stop()


_SHARED: dict[str, Database] = {}


def shared(plugin: str) -> Database:
    """The process's throwaway server for `plugin`, started on first use."""
    if plugin not in _SHARED:
        db = Database(plugin)
        _SHARED[plugin] = db
        atexit.register(db.stop)
    return _SHARED[plugin]


def broker_setup(plugin: str, call: Any, creation: str | None = None) -> None:
    """Connection `bench` and role `bench` on the broker (operator identity), unless there."""
    from broker.api._proto import database_pb2

    db = shared(plugin)
    path = "/broker.v1.Database/"
    try:
        call(
            path + "GetRole",
            database_pb2.DatabaseRole,
            database_pb2.GetRoleRequest(name=ROLE).SerializeToString(),
        )
        return
    except Exception:
        pass
    call(
        path + "AddConnection",
        database_pb2.DatabaseConnection,
        database_pb2.AddConnectionRequest(
            name="bench", plugin=plugin, dsn=db.dsn, password=db.password
        ).SerializeToString(),
    )
    call(
        path + "AddRole",
        database_pb2.DatabaseRole,
        database_pb2.AddRoleRequest(
            role=database_pb2.DatabaseRole(
                name=ROLE,
                connection="bench",
                creation_statements=creation or CREATION[plugin],
                default_ttl_seconds=3600,
                max_ttl_seconds=86400,
            )
        ).SerializeToString(),
    )


def bao_setup(plugin: str, bao: Any, creation: str | None = None) -> None:
    """OpenBao's database engine on the same server, the same statements, TTL 1 h."""
    db = shared(plugin)
    bao._cli("secrets", "enable", "database")
    if plugin == "postgresql":
        url = f"postgresql://{{{{username}}}}:{{{{password}}}}@{db.host}:{db.port}/app"
        plugin_name = "postgresql-database-plugin"
    else:
        url = f"{{{{username}}}}:{{{{password}}}}@tcp({db.host}:{db.port})/"
        plugin_name = "mysql-database-plugin"
    bao._cli(
        "write",
        "database/config/bench",
        f"plugin_name={plugin_name}",
        f"connection_url={url}",
        f"username={db.user}",
        f"password={db.password}",
        f"allowed_roles={ROLE}",
    )
    bao._cli(
        "write",
        f"database/roles/{ROLE}",
        "db_name=bench",
        f"creation_statements={creation or BAO_CREATION[plugin]}",
        "default_ttl=1h",
        "max_ttl=24h",
    )
    bao.setup_notes["database"] = {"plugin": plugin_name, "role": ROLE, "ttl": "1h"}
