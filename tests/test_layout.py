"""The package's shape (DESIGN.md): imports point one way, no private name crosses packages."""

import ast
import pathlib

import hbjax

PACKAGE = pathlib.Path(hbjax.__file__).parent
#: What each subpackage may import of hbjax's others: cli -> counts/io -> parallel -> vi.
ALLOWED = {
    "vi": set(),
    "parallel": {"vi"},
    "io": set(),
    "counts": {"vi", "parallel", "io"},
    "cli": {"vi", "parallel", "io", "counts"},
}
#: Modules of the package root every subpackage may use (private types, optional imports).
ROOT_MODULES = {"_types", "_lazy", "extras", ""}


def _imports(path: pathlib.Path):
    """``(subpackage imported, names)`` of every relative import in ``path``."""
    package = path.relative_to(PACKAGE).parts[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level == 1:
                target = package if path.parent != PACKAGE else (node.module or "")
            else:
                target = node.module or ""
            yield target.split(".")[0], [alias.name for alias in node.names]


def test_imports_point_one_way_and_private_names_stay_home():
    crossings, private = [], []
    for path in PACKAGE.rglob("*.py"):
        package = path.relative_to(PACKAGE).parts[0]
        if package not in ALLOWED:
            continue
        for target, names in _imports(path):
            if target in (package, *ROOT_MODULES):
                continue
            if target not in ALLOWED[package]:
                crossings.append(f"{path.relative_to(PACKAGE)} imports {target}")
            private += [
                f"{path.relative_to(PACKAGE)} imports {target}.{n}"
                for n in names
                if n.startswith("_")
            ]
    assert not crossings, crossings
    assert not private, private


def test_the_public_api_is_small_and_every_name_is_defined_once():
    assert len(hbjax.__all__) <= 35
    defined: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    # methods are not at module level; a public function or class is written once
    assert not twice, twice
