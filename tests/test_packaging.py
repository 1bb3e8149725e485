"""The built distribution: molscale installs as ``molscale.datasets``/``molscale.trainer``/``molscale.evals`` and
nothing else, so a distribution named ``datasets`` (Hugging Face's, here a stand-in) installs beside it, in
either order, untouched; the checkout commands keep working.

Offline throughout: the wheels are built with this venv's setuptools (``pip wheel --no-build-isolation
--no-index``) and installed with ``--no-deps --no-index`` into fresh venvs made from the base interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

SOURCE_DIRS = ("datasets", "trainer", "evals")
STANDIN_INIT = '"""Stand-in for a third-party distribution named datasets."""\nSTANDIN = True\n'
TIMEOUT = 300


def run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)
    shown = " ".join(str(c) if len(str(c)) < 200 else str(c)[:60] + "..." for c in cmd)
    assert proc.returncode == 0, f"{shown} (cwd {cwd}) exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def base_python() -> str:
    """The interpreter this venv was made from: a venv made with it sees none of this venv's packages
    (molscale is installed editable here)."""
    exe = getattr(sys, "_base_executable", None)
    if exe and os.path.exists(exe):
        return exe
    return shutil.which("python3")


def build_wheel(src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", out, src], cwd=out)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def molscale_wheel(tmp_path_factory) -> Path:
    """A wheel of the checkout, built from a copy of it: an in-tree build would write build/ and *.egg-info
    into the working tree."""
    tmp = tmp_path_factory.mktemp("molscale-wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "data", "runs", "wandb", "out",
        ".pytest_cache", ".ruff_cache"))
    return build_wheel(src, tmp / "dist")


@pytest.fixture(scope="module")
def standin_wheel(tmp_path_factory) -> Path:
    """A distribution named ``datasets`` 9.9, one module ``datasets/__init__.py`` with ``STANDIN = True``."""
    tmp = tmp_path_factory.mktemp("standin")
    src = tmp / "src"
    (src / "datasets").mkdir(parents=True)
    (src / "datasets" / "__init__.py").write_text(STANDIN_INIT)
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "datasets"
        version = "9.9"

        [tool.setuptools]
        packages = ["datasets"]
        """))
    return build_wheel(src, tmp / "dist")


def test_wheel_contents(molscale_wheel):
    names = zipfile.ZipFile(molscale_wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"molscale", "molscale-0.1.0.dist-info"}, f"top-level entries of {molscale_wheel.name}: {tops}"
    for d in SOURCE_DIRS:
        assert not [n for n in names if n.startswith(f"{d}/")], f"top-level {d}/ in the wheel"
        assert f"molscale/{d}/__init__.py" in names
    assert "molscale/datasets/cli.py" in names
    assert "molscale/datasets/__main__.py" in names
    assert "molscale/__init__.py" not in names  # molscale is a namespace package
    # every module of the source folders made it in: a subpackage missing from [tool.setuptools] packages
    # would otherwise be left out silently
    expected = {f"molscale/{p.relative_to(ROOT).as_posix()}"
                for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(expected - set(names))
    assert not missing, f"source files not in the wheel (add their package to [tool.setuptools] packages): {missing}"


CHECK = textwrap.dedent("""\
    import base64, hashlib, importlib.metadata as md, importlib.util, json, os, sysconfig
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    import datasets
    assert datasets.STANDIN is True, datasets.__file__
    assert os.path.realpath(datasets.__file__) == os.path.join(site, "datasets", "__init__.py"), datasets.__file__
    import molscale.datasets.chemistry.elements
    import molscale.datasets
    where = os.path.realpath(molscale.datasets.__file__)
    assert where == os.path.join(site, "molscale", "datasets", "__init__.py"), where
    assert os.path.realpath(molscale.datasets.chemistry.elements.__file__).startswith(
        os.path.join(site, "molscale", "datasets") + os.sep)
    assert importlib.util.find_spec("trainer") is None, importlib.util.find_spec("trainer")
    assert importlib.util.find_spec("evals") is None, importlib.util.find_spec("evals")
    assert importlib.util.find_spec("molscale.trainer.main") is not None
    assert importlib.util.find_spec("molscale.evals.generate") is not None
    files = {}
    for name in ("datasets", "molscale"):
        dist = md.distribution(name)
        files[name] = sorted(str(f) for f in dist.files)
        for f in dist.files:  # every installed file still has the content its RECORD says
            if f.hash:
                digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, f.read_binary()).digest())
                assert digest.rstrip(b"=").decode() == f.hash.value, f"{name}: {f} changed since install"
    print(json.dumps({"standin_version": md.version("datasets"), "files": files,
                      "standin_init": open(datasets.__file__).read()}))
    """)


@pytest.mark.parametrize("order", [("standin", "molscale"), ("molscale", "standin")], ids=["standin-first",
                                                                                           "molscale-first"])
def test_installs_beside_a_datasets_distribution(order, molscale_wheel, standin_wheel, tmp_path):
    venv = tmp_path / "venv"
    run([base_python(), "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    wheels = {"standin": standin_wheel, "molscale": molscale_wheel}
    for which in order:
        run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheels[which]], cwd=tmp_path)

    neutral = tmp_path / "cwd"  # not the checkout: nothing named datasets/trainer/evals next to it
    neutral.mkdir()
    out = json.loads(run([py, "-c", CHECK], cwd=neutral).stdout)
    assert out["standin_version"] == "9.9"
    assert out["standin_init"] == STANDIN_INIT
    assert out["files"]["datasets"] and all(
        f.startswith(("datasets/", "datasets-9.9.dist-info/")) for f in out["files"]["datasets"]), out["files"]
    ms = out["files"]["molscale"]
    assert "molscale/datasets/cli.py" in ms
    assert not [f for f in ms if f.split("/")[0] in SOURCE_DIRS], "molscale installed top-level source folders"
    assert not set(ms) & set(out["files"]["datasets"])

    show = run([py, "-m", "pip", "show", "-f", "datasets"], cwd=neutral).stdout
    assert "Version: 9.9" in show and "datasets/__init__.py" in show
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([py, "-c", purelib], cwd=neutral).stdout.strip())
    assert (site / "datasets" / "__init__.py").read_text() == STANDIN_INIT
    assert sorted(p.name for p in (site / "datasets").iterdir() if p.name != "__pycache__") == ["__init__.py"]
    assert not (site / "trainer").exists() and not (site / "evals").exists()

    # removing molscale leaves the stand-in whole
    run([py, "-m", "pip", "uninstall", "-y", "-q", "molscale"], cwd=neutral)
    assert (site / "datasets" / "__init__.py").read_text() == STANDIN_INIT
    assert not [p for p in (site / "molscale").rglob("*") if p.is_file()]  # pip leaves the empty namespace dir
    run([py, "-c", "import datasets, importlib.util; assert datasets.STANDIN is True; "
                   "assert importlib.util.find_spec('molscale.datasets') is None"], cwd=neutral)


def test_dev_install_exposes_only_molscale(tmp_path):
    """The editable install in this venv maps molscale.* to the checkout and adds no top-level names."""
    code = textwrap.dedent(f"""\
        import importlib.util, os
        for name in ("datasets", "trainer", "evals"):
            spec = importlib.util.find_spec(name)
            assert spec is None or not (spec.origin or "").startswith({str(ROOT) + os.sep!r}), (name, spec)
        import molscale.datasets
        assert os.path.realpath(molscale.datasets.__file__) == {str((ROOT / "datasets" / "__init__.py").resolve())!r}
        """)
    run([sys.executable, "-c", code], cwd=tmp_path)


def test_checkout_command_python_m_datasets():
    """`python -m datasets --help`, run in the checkout as README says, reaches molscale.datasets.cli."""
    proc = run([sys.executable, "-m", "datasets", "--help"], cwd=ROOT)
    assert proc.stdout.startswith("usage: python -m datasets"), proc.stdout
    assert "{build,inspect,bench}" in proc.stdout


def test_entry_points_run_from_a_checkout_that_was_not_installed(tmp_path):
    """`python -S` skips site-packages' .pth files (so the editable molscale is not there) while the dependencies
    stay importable: the entry points then serve molscale from the checkout itself."""
    import site
    runner = textwrap.dedent(f"""
        import runpy, sys
        sys.path.append({site.getsitepackages()[0]!r})
        import importlib.util
        assert importlib.util.find_spec("molscale") is None, "molscale is importable without the checkout"
        sys.argv = ["trainer/main.py", "--config", "cluster/geom_64gpu.json", "--dry-run"]
        try:
            runpy.run_path("trainer/main.py", run_name="__main__")
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        import molscale
        print("served from", list(molscale.__path__))
    """)
    r = subprocess.run([sys.executable, "-S", "-c", runner], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world_size                 64" in r.stdout and f"served from ['{ROOT}']" in r.stdout


def test_console_scripts_run_the_entry_points_from_anywhere(tmp_path):
    """[project.scripts]: each names a main(argv) -> int, and the installed script answers --help outside the
    checkout (make test installs molscale editable into this venv)."""
    import importlib
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"molscale-data", "molscale-train", "molscale-generate", "molscale-predict",
                            "molscale-export"}
    bin_dir = Path(sys.executable).parent
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        script = bin_dir / name
        if not script.exists():
            pytest.skip(f"{name} is not installed in this environment (pip install -e . installs it)")
        out = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (name, out.stderr[-2000:])
