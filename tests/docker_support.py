"""docker/rehearse.py loaded as a module (docker/ is not a package: a package named ``docker`` would shadow the
Docker SDK), for the tests that read the Dockerfile with its parser."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REHEARSE_SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "rehearse.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_rehearse", REHEARSE_SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


rehearse = sys.modules.get("docker_rehearse") or _load()
