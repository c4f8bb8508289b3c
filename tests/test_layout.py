"""The code's layout: the library stays free of Ray and Redis, and `services/` is sorted by what it holds."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_no_ray_no_redis_and_no_services():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"ray", "redis", "services"})
        for p in (ROOT / "editstream").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_services_holds_sub_packages_only_and_actors_are_called_through_typed_clients():
    services = ROOT / "services"
    assert sorted(p.name for p in services.glob("*.py")) == ["__init__.py"]
    packages = sorted(p.name for p in services.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["bench", "cli", "http", "transport", "wiring", "workers"]
    for path in services.rglob("*.py"):
        if path.name != "clients.py":
            assert ".call.remote(" not in path.read_text(), path
