"""The package boundaries: the engine never imports the service, serving never imports training or the benchmark.

Checked twice: by importing in a fresh interpreter (what a process actually loads) and by reading every import
statement, lazy ones inside functions included (what a code path might load later).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loaded_modules(*imports: str) -> list[str]:
    """Module names a fresh interpreter holds after importing ``imports``."""
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in imports) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names (absolute imports only: the project uses no others)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_importing_engine_loads_nothing_from_service() -> None:
    modules = loaded_modules("engine", "engine.backend", "engine.batcher", "engine.checkpoint")
    assert "engine.model" in modules  # the import really happened
    assert [m for m in modules if within(m, "service")] == []


def test_serving_loads_nothing_from_training_or_the_benchmark() -> None:
    modules = loaded_modules("service.app", "service.state", "engine.model", "engine.batcher", "engine.backend")
    assert "service.routes" in modules and "engine.layouts.bert" in modules
    assert [m for m in modules if within(m, "engine.training") or within(m, "engine.bench")] == []


def test_no_engine_module_names_service_and_no_serving_module_names_training() -> None:
    engine_files = sorted((ROOT / "engine").rglob("*.py"))
    serving_files = [
        p
        for p in engine_files
        if not any(part in ("training", "bench") for part in p.relative_to(ROOT / "engine").parts)
    ]
    # service/cli.py registers the training subcommands (engine/training/cli.py imports training lazily);
    # everything else in service/ is the serving path.
    serving_files += [p for p in sorted((ROOT / "service").rglob("*.py")) if p.name != "cli.py"]
    assert len(serving_files) > 20
    offenders = [
        f"{p.relative_to(ROOT)}: {name}" for p in engine_files for name in imported_names(p) if within(name, "service")
    ]
    offenders += [
        f"{p.relative_to(ROOT)}: {name}"
        for p in serving_files
        for name in imported_names(p)
        if within(name, "engine.training") or within(name, "engine.bench")
    ]
    assert offenders == []


def test_the_service_cli_reaches_training_only_through_its_lazy_subcommands() -> None:
    """``ultrafastbert serve`` imports service.cli, which registers the training subcommands without loading
    training itself."""
    modules = loaded_modules("service.cli")
    assert [m for m in modules if within(m, "engine.training")] == ["engine.training", "engine.training.cli"]
