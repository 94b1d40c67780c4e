"""The arrows of ARCHITECTURE.md, checked on the import statements themselves."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "_proto" not in p.parts]


def test_ca_is_a_library_without_grpc_or_broker() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _imports(p) if m.split(".")[0] in {"broker", "grpc", "grpc_tools"}
        )
        for p in _modules("ca")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_broker_api_imports_grpc_and_generated_code() -> None:
    offenders = []
    for path in _modules("broker"):
        if (ROOT / "broker" / "api") in path.parents:
            continue
        for module in _imports(path):
            if module.split(".")[0].startswith("grpc") or module.startswith("broker.api._proto"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders


def test_no_grab_bag_modules() -> None:
    names = {p.stem for package in ("ca", "broker") for p in _modules(package)}
    assert not names & {"utils", "util", "helpers", "misc", "common"}


def test_command_modules_do_not_import_each_other() -> None:
    """`broker.cli` imports the command modules at its end; one command module importing
    another then meets it half initialised (a cycle that broke `import broker.commands.identity`).
    What they share lives in `broker.cli` (shared options) or in a domain module."""
    offenders = []
    for path in _modules("broker/commands"):
        for module in _imports(path):
            if module.startswith("broker.commands"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders


def _absolute_imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved (`from ..client import x` in
    broker/api/server/ca.py is broker.api.client and broker.api.client.x)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _modules(package)
        for module in sorted(_absolute_imports(path))
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_server_and_the_clients_do_not_import_each_other() -> None:
    assert not _offenders("broker/api/server", ("broker.api.client", "broker.api.workload"))
    assert not _offenders("broker/api/client", ("broker.api.server", "broker.api.workload"))


def test_the_workload_endpoint_does_not_import_the_server() -> None:
    assert not _offenders("broker/api/workload", ("broker.api.server",))


def test_feature_servicers_do_not_import_the_service_registry() -> None:
    """`services.py` imports every feature servicer module; they describe their RPCs with the
    leaf `binding.py`, so the registry never meets a half-initialised feature module."""
    offenders = [
        entry
        for entry in _offenders("broker/api/server", ("broker.api.server.services",))
        if not entry.startswith(("broker/api/server/serving.py", "broker/api/server/services.py"))
    ]
    assert not offenders
    binding = _absolute_imports(ROOT / "broker/api/server/binding.py")
    assert not [m for m in binding if m.startswith("broker")]


def test_the_secrets_sdk_loads_no_grpc() -> None:
    """broker.secretfiles (grpc-free) uses the SDK; importing it must not pull in grpc."""
    for name in ("broker/api/client/__init__.py", "broker/api/client/sdk.py"):
        imports = _absolute_imports(ROOT / name)
        assert not [m for m in imports if m.split(".")[0].startswith("grpc")], name
        assert not [m for m in imports if m.startswith("broker.api.")], name
