"""The house's walls: the library (`topoopt`, outside `topoopt/lab`) never imports the research
harness (`topoopt.lab`), not even lazily, so that `pip install topoopt` users never pull in the
command line, the training runs or the studies; and no module reaches into another's private
(underscore) names. Checked on the source, by walking every import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "topoopt"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("topoopt."):
            found.append(node.value)  # import_module("topoopt....") and lazy tables
    return found


def test_the_library_never_imports_the_harness():
    library = [path for path in PACKAGE.rglob("*.py") if "lab" not in path.relative_to(PACKAGE).parts]
    assert len(library) > 20
    offenders = {str(path.relative_to(PACKAGE)): name for path in library for name in _imports(path)
                 if name == "topoopt.lab" or name.startswith("topoopt.lab.")}
    assert offenders == {}


def test_the_harness_holds_the_command_line_runs_data_and_studies():
    lab = {path.stem for path in (PACKAGE / "lab").glob("*.py")}
    assert {"cli", "training", "loop", "data", "models", "sweep", "progress", "report", "run_lock"} <= lab
    assert (PACKAGE / "lab" / "studies" / "steer.py").exists()
    assert not any((PACKAGE / f"{name}.py").exists() for name in ("cli", "training", "loop", "data", "models"))


def _private_reaches(path: Path) -> list[str]:
    """Underscore names a module takes from another topoopt module: `from topoopt.x import _y`, or
    `x._y` where `x` is a topoopt module it imported. Package-private modules (`topoopt._native`,
    `_threads`, `_validation`, `_range`) are the shared internals and may be used whole."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("topoopt"):
            if node.module.split(".")[-1].startswith("_"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    if node.module == "topoopt":  # `from topoopt import _native`: a private module
                        continue
                    found.append(f"{node.module}.{alias.name}")
                elif node.module == "topoopt" or not alias.name[:1].isupper():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("topoopt.") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    offenders = {str(path.relative_to(PACKAGE)): names for path in PACKAGE.rglob("*.py")
                 if (names := _private_reaches(path))}
    assert offenders == {}
