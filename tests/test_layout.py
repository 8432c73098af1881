"""The dependency rule, read from the imports (ast), as docs/architecture.md states it:
no import cycles; qkv_core never imports evaluation, the CLI or the services; the card and codec
layers never reach a model library (transformers), directly or through what they import; the
light client imports grpc, protobuf, its stubs and the standard library only."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qkv_core", "qkv_eval", "qkvcomm_cli", "service_common", "sender_service", "receiver_service")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path, module: str) -> set[str]:
    """Every module this file imports, those for type hints only (`if TYPE_CHECKING:`) included:
    a layer never names a type from a layer above it."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import module` imports the module
                names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return names


GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(n for n in GRAPH.get(m, ()) if n in MODULES)
    return seen


def test_there_are_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if n not in MODULES or n == m:
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack[stack.index(n):] + [n]) if n in stack else n
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_the_core_never_imports_evaluation_the_cli_or_the_services():
    upper = ("qkv_eval", "qkvcomm_cli", "service_common", "sender_service", "receiver_service")
    for m, imports in GRAPH.items():
        if m.startswith("qkv_core"):
            bad = sorted(i for i in imports if i.split(".")[0] in upper)
            assert not bad, f"{m} imports {bad}"


# qkv_core's layers, top first; a module imports from its own layer or those below (the modules at
# qkv_core's top level, types, config, errors, the wire messages, sit below them all).
CORE_LAYERS = [("engine",), ("policy", "store", "facts"), ("model", "card"), ("codec",)]


def test_the_core_layers_import_only_downward():
    rank = {name: i for i, names in enumerate(CORE_LAYERS) for name in names}
    for m, imports in GRAPH.items():
        parts = m.split(".")
        if parts[0] != "qkv_core" or len(parts) < 3 or parts[1] not in rank:
            continue
        above = sorted(i for i in imports if i.startswith("qkv_core.") and len(i.split(".")) > 2
                       and rank.get(i.split(".")[1], len(CORE_LAYERS)) < rank[parts[1]])
        assert not above, f"{m} imports {above}, which sit above it"
        peers = sorted(i for i in imports if i.startswith("qkv_core.") and len(i.split(".")) > 2
                       and i.split(".")[1] != parts[1] and rank.get(i.split(".")[1]) == rank[parts[1]])
        assert not peers, f"{m} imports {peers}: layers side by side stay independent"


def test_the_card_and_codec_layers_never_reach_transformers():
    for m in MODULES:
        if m.startswith(("qkv_core.card", "qkv_core.codec")):
            reached = {i for dep in _closure(m) for i in GRAPH[dep]}
            assert not {i for i in reached if i.split(".")[0] == "transformers"}, f"{m} reaches transformers"


def test_the_light_client_imports_only_grpc_protobuf_and_the_standard_library():
    client = ROOT / "clients/python/qkvcomm_client"
    allowed = {"grpc", "google", "qkvcomm", "qkvcomm_client", *sys.stdlib_module_names}
    seen = set()
    for path in client.glob("*.py"):
        tops = {i.split(".")[0] for i in _imports(path, f"qkvcomm_client.{path.stem}")}
        assert tops <= allowed, f"{path.name} imports {sorted(tops - allowed)}"
        seen |= {i for i in _imports(path, "") if i.startswith("google.")}
    assert seen <= {"google.protobuf", "google.protobuf.json_format", "google.protobuf.message"}, seen
    assert (client / "sync.py").exists() and "grpc" in _imports(client / "sync.py", "qkvcomm_client.sync")


def test_the_rules_see_real_imports():
    """The checks above would pass vacuously on a broken reader: make sure it sees known edges."""
    assert "qkv_core.model.kv" in GRAPH["qkv_core.model.loading"]
    assert "transformers" in GRAPH["qkv_core.model.kv"]
    assert "qkv_core.card.header" in GRAPH["qkv_core.engine.sender"]
    assert "qkv_core.card.header" in _closure("qkv_core.engine.sender")
