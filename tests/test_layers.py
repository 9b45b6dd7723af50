"""The imports go one way (docs/architecture.md draws the same picture): a module may import its
own layer and the layers below, never one above. Read from the source with `ast`, so a new module
or an import tucked inside a function is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "audit", "releases", "environments", "access", "evidence", "edge", "portal")

# Lowest first. A module belongs to the first layer whose patterns match its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernel", ("core", "core.*")),
    ("audit chain", ("audit.models", "audit.chain", "audit.seal", "audit.actors", "audit.services", "audit.triggers")),
    ("domain models", ("releases.models", "environments.models", "access.models")),
    ("rules", ("environments.policy",)),
    ("services", ("*.services", "*.selectors", "environments.metrics", "audit.field_history")),
    ("engine and evidence", ("environments.deploy", "environments.notifications", "environments.cluster",
                             "environments.demo_app.*", "evidence", "evidence.*")),
    ("edges", ("*.admin", "*.api", "*.tasks", "*.broker", "*.apps", "*.middleware", "*.downloads", "*.management",
               "edge", "edge.*", "*.templatetags")),
    ("assembly", ("portal", "portal.*")),
]


def matches(module: str, pattern: str) -> bool:
    """`a.b` exactly; `a.*` anything under a; `*.b` a module named b in any package, or anything under it."""
    if pattern.startswith("*."):
        return module.endswith(pattern[1:]) or f"{pattern[1:]}." in module
    if pattern.endswith(".*"):
        return module.startswith(pattern[:-1])
    return module == pattern


def layer_of(module: str) -> int | None:
    for index, (_name, patterns) in enumerate(LAYERS):
        if any(matches(module, pattern) for pattern in patterns):
            return index
    return None


def modules():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield dotted.removesuffix(".__init__"), path


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative import
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                yield ".".join([*base, node.module]), node.lineno
            else:
                for alias in node.names:  # `from environments import services` names a module
                    yield f"{node.module}.{alias.name}", node.lineno


def resolve(name: str, known: set[str]) -> str | None:
    """The portal module an import refers to (the longest known prefix), or None for a library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in modules() if layer_of(m) is None and not m.endswith("__init__")]
    unplaced = [m for m in unplaced if m not in PACKAGES]
    assert unplaced == [], f"place these modules in a layer (tests/test_layers.py): {unplaced}"


def test_imports_go_one_way():
    found = dict(modules())
    known = set(found)
    wrong = []
    for module, path in found.items():
        own = layer_of(module)
        if own is None:
            continue
        for name, line in imports_of(path, module):
            target = resolve(name, known)
            if target is None or target in PACKAGES:
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} {module} ({LAYERS[own][0]}) imports {target} "
                             f"({LAYERS[theirs][0]})")
    assert wrong == [], "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_inside_a_function_except_app_wiring():
    """An import inside a function hides a cycle. AppConfig.ready is where Django wants app wiring."""
    inside = []
    for module, path in modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not (
                module.endswith(".apps") and node.name == "ready"
            ):
                for child in ast.walk(node):
                    if isinstance(child, ast.Import | ast.ImportFrom):
                        inside.append(f"{path.relative_to(ROOT)}:{child.lineno} in {node.name}()")
    assert inside == [], "imports inside functions:\n" + "\n".join(inside)


def test_the_audit_chain_imports_no_app():
    chain_layer = LAYERS[1][1]
    for module in chain_layer:
        path = ROOT / (module.replace(".", "/") + ".py")
        for name, line in imports_of(path, module):
            assert not name.startswith(("releases", "environments", "access", "evidence", "edge", "portal")), (
                f"{module}:{line} imports {name}")
