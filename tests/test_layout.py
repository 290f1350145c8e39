"""The layout the README describes, checked: the core imports no I/O, the API no Ray, and the
tree has the modules the README's "Inside" names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("ray", "nats", "psycopg", "psycopg_pool", "starlette", "uvicorn", "httpx", "prometheus_client")


def imported_by(modules: list[str]) -> set[str]:
    """Top-level packages in sys.modules after a fresh interpreter imports `modules`."""
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_the_core_imports_no_io_client() -> None:
    core = sorted(f"system.core.{p.stem}" for p in (ROOT / "system" / "core").glob("*.py") if p.stem != "__init__")
    assert "system.core.policy" in core and "system.core.recount" in core
    loaded = imported_by(core)
    assert "numpy" in loaded  # the check sees what was imported
    assert not loaded & set(ADAPTERS), loaded & set(ADAPTERS)


def test_the_api_never_imports_ray() -> None:
    api = sorted(f"api.{p.stem}" for p in (ROOT / "api").glob("*.py") if p.stem != "__init__")
    loaded = imported_by(api)
    assert "starlette" in loaded and "ray" not in loaded


def test_the_readme_names_the_modules_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Inside", 1)[1].split("\n## ", 1)[0]
    named = {
        word.strip("`") for word in section.split() if word.startswith("`") and word.rstrip("`,.;:)").endswith(".py")
    }
    named = {n.rstrip("`,.;:)") for n in named}
    assert len(named) >= 15, named
    ours = [ROOT / "supervisor.py", ROOT / "cli.py"] + [
        p for d in ("system", "actors", "api", "bench", "sim", "tests") for p in (ROOT / d).rglob("*.py")
    ]
    missing = [n for n in named if not any(str(p).endswith(f"/{n}") for p in ours)]
    assert not missing, f"the README names modules that do not exist: {missing}"
