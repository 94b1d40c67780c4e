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


_CLI_SHARED = {"clients", "inputs", "options", "refusals", "render"}
_CLI_TOP = {"__init__", "__main__", "root"}


def _cli_modules() -> dict[str, set[str]]:
    """broker/cli/*.py by stem -> the broker.cli modules it imports ("" for the package)."""
    found = {}
    for path in (ROOT / "broker" / "cli").glob("*.py"):
        found[path.stem] = {
            m.removeprefix("broker.cli").removeprefix(".")
            for m in _imports(path)
            if m == "broker.cli" or m.startswith("broker.cli.")
        }
    return found


def test_cli_feature_modules_import_only_the_shared_modules() -> None:
    """The root group (broker/cli/root.py) imports the feature modules; a feature module
    importing another, the root or the package would meet it half initialised (the cycle the
    old cli.py had, importing its command modules at its end). What features share lives in
    the shared modules, which import no feature module either."""
    modules = _cli_modules()
    features = set(modules) - _CLI_SHARED - _CLI_TOP
    assert features, "no feature modules found under broker/cli"
    offenders = [
        f"broker/cli/{name}.py imports broker.cli{'.' + m if m else ''}"
        for name in sorted(features | _CLI_SHARED)
        for m in sorted(modules[name])
        if m not in _CLI_SHARED
    ]
    assert not offenders


def test_nothing_in_the_cli_imports_its_entry_points() -> None:
    """`python -m broker.cli` runs __main__; importing it (or, from a feature, the root)
    would run the CLI or re-enter the package."""
    offenders = [
        f"broker/cli/{name}.py: {m}"
        for name, imported in _cli_modules().items()
        for m in imported
        if m == "__main__" or (m == "root" and name not in {"__init__", "__main__"})
    ]
    assert not offenders


def test_only_the_cli_clients_module_imports_the_client_sdk() -> None:
    """Every client the CLI uses comes through broker/cli/clients.py (the `Clients` seam), so
    the client package can move by rewriting one module."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _modules("broker/cli")
        if path.stem != "clients"
        for module in _imports(path)
        if module.startswith("broker.api")
    ]
    assert not offenders


def _graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (at any depth in the file, so imports
    deferred into functions count too)."""
    dotted = package.replace("/", ".")
    graph: dict[str, set[str]] = {}
    for path in _modules(package):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        graph[name] = {m for m in _imports(path) if m.startswith(dotted + ".")}
    return graph


def test_key_custody_has_no_import_cycle() -> None:
    """ca.keys.uri opens backends by scheme, so it imports them; backends share their checks
    through ca.keys.backend and never import uri (issue 17: that cycle is gone)."""
    graph = _graph("ca/keys")
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, set()) - {"ca.keys"}:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles
    importers_of_uri = sorted(m for m, deps in graph.items() if "ca.keys.uri" in deps)
    assert importers_of_uri == ["ca.keys"]  # the package's public surface, never a backend


def test_ca_library_provisions_no_tokens() -> None:
    """Making SoftHSM2 tokens is dev mode's job (broker.softhsm), not the CA library's."""
    assert not (ROOT / "ca" / "keys" / "softhsm.py").exists()
    offenders = [str(p.relative_to(ROOT)) for p in _modules("ca") if "subprocess" in _imports(p)]
    assert not offenders


def test_grpc_tools_is_needed_only_to_regenerate_code() -> None:
    """grpcio-tools is a dev dependency: only the code generator may import it."""
    codegen = ROOT / "broker" / "api" / "codegen.py"
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("ca", "broker", "loadtests")
        for path in _modules(package)
        if path != codegen and any(m.split(".")[0] == "grpc_tools" for m in _imports(path))
    ]
    assert not offenders
    assert "grpc_tools" in {m.split(".")[0] for m in _imports(codegen)}


def test_storage_backend_seam_is_a_leaf() -> None:
    """The feature repositories and the `Storage` protocol all import the dialect seam; it
    importing any of them back would be a cycle."""
    imported = _imports(ROOT / "broker" / "storage" / "backend.py")
    assert not {m for m in imported if m.startswith("broker")}


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
