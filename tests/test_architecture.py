"""The package's boundaries, enforced: who may import whom (see README's reading order)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_offload"


def imports_of(path: Path) -> set[str]:
    """Package-internal modules imported by a file, as dotted names relative to moe_offload."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("moe_offload"):
                module = node.module.removeprefix("moe_offload").lstrip(".")
            else:
                continue
            found.add(module)
            found.update(f"{module}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("moe_offload.") for a in node.names if a.name.startswith("moe_offload"))
    return found


def files(sub: str = "") -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_model_knows_nothing_of_offloading_or_quantization():
    for name in ("model.py", "kv_cache.py", "config.py"):
        bad = {m for m in imports_of(PACKAGE / name) if m.split(".")[0] in ("offload", "quant", "kernels", "engine")}
        assert not bad, (name, bad)


def test_offload_imports_neither_model_nor_quant():
    for path in files("offload"):
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("model", "quant", "kernels", "engine", "weights")}
        assert not bad, (path.name, bad)


def test_quant_and_kernels_do_not_import_model_or_offload():
    for path in files("quant") + files("kernels"):
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("model", "offload", "engine")}
        assert not bad, (path.name, bad)


def test_loading_never_imports_offload():
    assert not {m for m in imports_of(PACKAGE / "loading.py") if m.startswith("offload")}


def test_cli_is_the_only_rich_user():
    for path in files():
        if path.name != "cli.py":
            assert "rich" not in {n.split(".")[0] for n in _external(path)}, path.name


def _external(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names
