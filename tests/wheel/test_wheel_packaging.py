"""The built wheel, installed outside the source tree with the core dependencies only, samples from a shipped recipe
and round-trips a saved pipeline (both loaders); the extras stay optional."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "src", "pipelines")
CORE = {"torch", "diffusers", "transformers", "safetensors", "huggingface-hub", "numpy", "pillow"}


def git_recipes() -> list[str]:
    return sorted(p.name for p in (ROOT / "pipelines").iterdir() if (p / "model_index.json").is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the build inputs (no build/ or egg-info left in the tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in BUILD_INPUTS:
        path = ROOT / name
        (shutil.copytree(path, source / name, ignore=skip) if path.is_dir() else shutil.copy2(path, source / name))
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, text=True)
    (built,) = tmp.glob("diffusers_repae-*.whl")
    return built


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(name).decode()
    return [Requirement(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def test_wheel_ships_every_recipe_file_and_a_light_core(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("diffusers_repae/recipe_folders/")}
    in_git = {
        "diffusers_repae/recipe_folders/" + p.relative_to(ROOT / "pipelines").as_posix()
        for p in (ROOT / "pipelines").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts  # a new kind of file needs a package_data pattern
    }
    assert in_git and shipped == in_git
    core = {canonicalize_name(r.name) for r in requirements(wheel) if not r.marker}
    assert core == CORE
    extras = {str(r.marker).split("==")[1].strip(" \"'") for r in requirements(wheel) if r.marker}
    assert {"lora", "train", "eval", "demo", "dev"} <= extras
    assert "evaluate" not in {canonicalize_name(r.name) for r in requirements(wheel)}  # listed once, never used


def core_closure(wheel: Path) -> set[str]:
    """Distributions the core needs, transitively (as installed in this environment)."""
    todo = [r for r in requirements(wheel) if not r.marker]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in metadata.distribution(name).requires or [])
        except metadata.PackageNotFoundError:  # a platform-only dependency that is not installed here
            continue
    return seen


def core_only_view(wheel: Path, site: Path, view: Path) -> None:
    """Symlinks to this environment's packages minus the extras-only distributions and this project itself."""
    optional = {canonicalize_name(r.name) for r in requirements(wheel) if r.marker} - core_closure(wheel)
    hidden = {"diffusers_repae"}
    for dist in metadata.distributions(path=[str(site)]):
        if canonicalize_name(dist.metadata["Name"]) in optional | {"diffusers-repae"}:
            hidden |= {Path(f).parts[0] for f in dist.files or []}
    view.mkdir()
    for entry in site.iterdir():
        if entry.name not in hidden and not entry.name.endswith(".pth") and not entry.name.startswith("__editable__"):
            (view / entry.name).symlink_to(entry)


def test_wheel_in_a_clean_environment_samples_and_round_trips(wheel, tmp_path):
    start = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", query], text=True).strip())
    # The core dependencies come from this environment (pip would download torch again), through a filtered view.
    core_only_view(wheel, Path(sysconfig.get_paths()["purelib"]), tmp_path / "core")
    (site / "core_dependencies.pth").write_text(str(tmp_path / "core") + "\n")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, text=True)

    smoke = tmp_path / "wheel_smoke.py"  # run from outside the tree: the tests folder is not on sys.path either
    shutil.copy2(Path(__file__).with_name("wheel_smoke.py"), smoke)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    args = json.dumps({"recipes": git_recipes(), "work": str(tmp_path / "work")})
    result = subprocess.run([python, str(smoke), args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "wheel smoke test passed" in result.stdout
    print(f"clean environment + wheel install + smoke test: {time.perf_counter() - start:.1f} s; {result.stdout}")
