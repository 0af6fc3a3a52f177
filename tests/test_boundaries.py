"""The house's walls: the library (`topoopt`, outside `topoopt/lab`) never imports the research
harness (`topoopt.lab`), not even lazily, so that `pip install topoopt` users never pull in the
command line, the training runs or the studies. Checked on the source, by walking every import."""

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
