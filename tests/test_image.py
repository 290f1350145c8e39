"""The production image (Dockerfile) holds everything `pip install .` needs and everything the
system reads at run time. (No Docker engine here: this reads the files, as a build would.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copied() -> set[str]:
    """The paths the Dockerfile's COPY lines bring into the image."""
    paths: set[str] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            paths.update(p.rstrip("/") for p in words[1:-1] if not p.startswith("--"))
    return paths


def test_the_image_copies_every_package_module_and_file_the_install_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {p.split(".")[0] for p in setuptools["packages"]}
    needed |= {f"{m}.py" for m in setuptools["py-modules"]}
    needed |= {project["project"]["readme"], *project["project"]["license-files"], "pyproject.toml"}
    needed |= {"sql", "data"}  # read at run time: the migrations, the shipped catalog
    assert needed <= copied(), f"the Dockerfile does not copy {sorted(needed - copied())}"
    assert all((ROOT / p).exists() for p in copied()), "the Dockerfile copies something that is not there"


def test_every_top_level_package_is_installed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__init__.py")}
    on_disk = {p for p in on_disk if not p.startswith(("tests", ".venv", "build"))}
    assert on_disk <= packages, f"packages not installed: {sorted(on_disk - packages)}"
