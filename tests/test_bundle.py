"""The air-gapped bundle's cheap parts (scripts/bundle): its package lists cover pyproject, the
launcher scripts parse, the offline wheel installer unpacks wheels without pip and names unmet
requirements. The full `make bundle` downloads and compiles, so it is not run here."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "scripts" / "bundle"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bundle_{name}", BUNDLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _names(path: Path) -> set[str]:
    out = set()
    for ln in path.read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            out.add(re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[ ]", ln, maxsplit=1)[0]).lower())
    return out


def test_every_pyproject_dependency_is_shipped_or_on_the_host():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[ ;]", d, maxsplit=1)[0]).lower() for d in deps}
    shipped, host = _names(BUNDLE / "wheels.txt"), _names(BUNDLE / "host-provides.txt")
    assert not shipped & host, "a package is both shipped and expected on the host"
    missing = wanted - shipped - host
    assert not missing, f"add to scripts/bundle/wheels.txt (or host-provides.txt): {sorted(missing)}"


def test_wheels_are_pinned():
    for ln in (BUNDLE / "wheels.txt").read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", ln), ln


@pytest.mark.parametrize("script", ["flock-up", "flock-down", "flockserve", "common.sh"])
def test_launcher_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BUNDLE / script)], check=True)


def _wheel(path: Path, name: str, version: str, requires: list[str], files: dict[str, str]) -> Path:
    whl = path / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(whl, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


def test_installer_unpacks_without_pip_and_names_unmet_requirements(tmp_path):
    inst = _load("install_wheels")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "flockserve", "0.1.0", ["bundledep>=1", "sqlalchemy[asyncio]>=2", "not-on-this-host-xyz>=1",
                                           "tomli; python_version < '3.0'"], {"flockfake/__init__.py": ""})
    _wheel(wheels, "bundledep", "1.2", [], {"bundledep.data/purelib/bundledep.py": "X = 1\n"})
    target = tmp_path / "layer"
    target.mkdir()
    for w in sorted(wheels.glob("*.whl")):
        inst.unpack(w, target)
    assert (target / "bundledep.py").is_file() and not list(target.glob("*.data"))
    assert inst.wheel_ok_here("x-1-py3-none-any.whl")
    assert not inst.wheel_ok_here("x-1-cp27-cp27m-manylinux1_x86_64.whl")
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('i', sys.argv[1]); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print('\\n'.join(m.check(__import__('pathlib').Path(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(BUNDLE / "install_wheels.py"), str(target)],
                         capture_output=True, text=True, check=True).stdout
    assert "not-on-this-host-xyz" in out
    assert "bundledep" not in out and "tomli" not in out
