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
