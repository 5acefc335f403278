"""The package layout: imports run one way, and only the backbone files know backbone types.

Every import in the library (lazy ones inside functions included) is parsed and checked against
the layer order below: a module may import its own layer or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "unime_jax"

# Low to high. Each entry is a top-level module or package of unime_jax.
LAYERS = [
    {"config", "sharding", "atomic", "cli_errors", "progress"},
    {"models"},
    {"processing"},
    {"backbones"},
    {"model_io", "tokenizer"},
    {"conversion"},
    {"embedder"},
    {"data"},
    {"training"},
    {"eval"},
    {"demo"},
    {"runs"},
    # The CLIs ("" = the package's __init__) and the adapters to other libraries' interfaces.
    {"", "cli_args", "encode", "encode_io", "mine", "teacher", "train", "integrations"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Beyond the order: processing stays generic, numpy/PIL over shared pieces (the rule).
FORBIDDEN = {("processing", "models")}


def _unit(module: str) -> str:
    """The unime_jax top-level module or package a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module))
    return found


def test_every_package_has_a_layer():
    units = {_unit(_module_name(p)) for p in LIBRARY.rglob("*.py")}
    assert units - set(LAYER) == set(), "place new top-level modules in LAYERS"


def test_imports_run_one_way():
    violations = []
    for path in sorted(LIBRARY.rglob("*.py")):
        source = _unit(_module_name(path))
        for line, module in _imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {module}"
            if module == "convert" or module.startswith("convert."):
                violations.append(f"{where}: the library never imports the convert CLI")
            if not module.startswith("unime_jax.") and module != "unime_jax":
                continue
            target = _unit(module)
            if target == source:
                continue
            if LAYER[target] > LAYER[source] or (source, target) in FORBIDDEN:
                violations.append(f"{where}: {source or 'unime_jax'} may not import {target or 'unime_jax'}")
    assert violations == []


def test_only_backbone_files_branch_on_a_model_type():
    """Generic code asks the backbone spec; comparing a `model_type` with a name is the backbones' job."""
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.is_relative_to(LIBRARY / "backbones"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names_type = any(
                (isinstance(s, ast.Attribute) and s.attr == "model_type")
                or (isinstance(s, ast.Name) and s.id == "model_type")
                or (
                    isinstance(s, ast.Subscript)
                    and isinstance(s.slice, ast.Constant)
                    and s.slice.value == "model_type"
                )
                for s in sides
            )
            names_value = any(
                isinstance(s, ast.Constant | ast.Tuple | ast.List | ast.Set) and not isinstance(s, ast.Name)
                for s in sides
            )
            if names_type and names_value:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_the_embedder_loads_no_training_code():
    """``import unime_jax.embedder`` brings in neither grain nor unime_jax.training, nor optax beyond
    what flax.nnx itself imports (nnx's own optimizer module imports optax unconditionally)."""
    script = (
        "import sys\n"
        "import flax.nnx\n"
        "before = set(sys.modules)\n"
        "import unime_jax.embedder\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in ('optax', 'grain') or m.startswith('unime_jax.training')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
