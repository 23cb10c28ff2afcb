"""Packaging: one version string, a licence, bounds on the libraries whose private APIs lit_sft uses, and a wheel
that carries the configs and the tiny data so that ``lit_sft fit --config pkg://lit_sft/configs/tiny_cpu.yaml`` works
from any folder. The clean-venv install and training run is ``scripts/check_wheel.sh`` (too slow for CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from conftest import ROOT

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement(name: str, requirements: list[str]) -> str:
    return next(r for r in requirements if re.match(rf"{re.escape(name)}(\[|[<>=!~ ]|$)", r))


def test_one_version_string_and_a_licence():
    import lit_sft
    from setuptools.config.expand import read_attr

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lit_sft.__version__"}
    assert read_attr("lit_sft.__version__", root_dir=ROOT) == lit_sft.__version__  # what setuptools writes
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.read(200)


def test_dependency_bounds():
    """Upper bounds where lit_sft touches private APIs; the torch floor of the varlen path."""
    project = _pyproject()["project"]
    deps, extras = project["dependencies"], project["optional-dependencies"]
    for name in ("lightning", "transformers", "datasets", "jsonargparse"):
        assert "<" in _requirement(name, deps), name
    assert "<" in _requirement("deepspeed", extras["deepspeed"])
    assert "<" in _requirement("liger-kernel", extras["liger"])
    assert "<5" in _requirement("jsonargparse", deps)
    assert _requirement("torch", deps) == "torch>=2.11"
    assert "flash-attn" in extras and "tensorboard" in extras
    # the varlen path calls varlen_attn with scale= and window_size=, which torch 2.11 added (2.10 takes neither)
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    assert {"scale", "window_size"} <= set(inspect.signature(varlen.varlen_attn).parameters)


def test_shipped_config_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    """``pkg://lit_sft/configs/tiny_cpu.yaml`` and the tiny data it names resolve inside the package, from a folder
    that is not the repository."""
    from lit_sft.cli import main
    from lit_sft.data.loading import resolve_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "pkg://lit_sft/configs/tiny_cpu.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]["dataset_name"]
    assert data.startswith("pkg://lit_sft/")
    assert os.path.isfile(resolve_path(data))
    with open(os.path.join(ROOT, "data", "tiny_math.jsonl")) as a, open(resolve_path(data)) as b:
        assert a.read() == b.read()  # the repository's file, one copy


@pytest.mark.slow
def test_wheel_carries_configs_data_licence_and_bounds(tmp_path):
    """``pip wheel`` on a copy of the checkout (offline: the installed setuptools) gives a wheel with the configs,
    the tiny data, the licence, the version and the dependency bounds."""
    import lit_sft

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "outputs", "__pycache__", "*.egg-info", "build", "lightning_logs", "wandb", ".whl",
        ".device-data", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("lit_sft-*.whl"))
    assert wheel.name.startswith(f"lit_sft-{lit_sft.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for config in os.listdir(os.path.join(ROOT, "configs")):
        assert f"lit_sft/configs/{config}" in names, config
    assert "lit_sft/data/tiny_math.jsonl" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Requires-Dist: torch>=2.11" in meta
    assert re.search(r"Requires-Dist: lightning<2\.7", meta) and 'extra == "flash-attn"' in meta
