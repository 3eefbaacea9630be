"""Install the bundle's wheels into a --target directory layered on the host's Python, offline,
then check that every requirement of flockserve is met by that layer or by the host.

    python3 install_wheels.py WHEEL_DIR TARGET

Uses `pip install --no-index --no-deps --target` when the host Python has pip; otherwise unpacks
the wheels itself (a wheel is a zip laid out as site-packages; only .data/purelib|platlib need
moving). Only the standard library and, if present, `packaging` are used. Exit status 1 with a
list of what is missing when the layer plus the host cannot run flockserve.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def say(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


def wheel_ok_here(name: str) -> bool:
    # name-version-(build-)?pytag-abitag-plattag.whl
    tags = name[:-4].split("-")[-3:]
    py, abi, plat = tags
    mine = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pys = py.split(".")
    py_ok = mine in pys or any(p in ("py3", f"py{sys.version_info.major}{sys.version_info.minor}") for p in pys)
    abi_ok = abi in ("none", "abi3", mine)
    return py_ok and abi_ok and (plat == "any" or "x86_64" in plat)


def unpack(whl: Path, target: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                for p in (data / sub).iterdir():
                    shutil.move(str(p), target / p.name)
        shutil.rmtree(data)


def install(wheels: list[Path], target: Path) -> None:
    tmp = target.with_name(target.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        say(f"installing {len(wheels)} wheels into {target} (pip, offline)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--disable-pip-version-check", "--no-compile", "--target", str(tmp), *map(str, wheels)],
                       check=True)
    else:
        say(f"installing {len(wheels)} wheels into {target} (no pip here: unpacking them)")
        for w in wheels:
            unpack(w, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def check(target: Path) -> list[str]:
    """Walk flockserve's Requires-Dist (with extras) over the layer + host; return what is unmet."""
    sys.path.insert(0, str(target))
    import importlib
    import importlib.metadata as md
    importlib.invalidate_caches()
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - every torch host has packaging (transformers needs it)
        say("packaging is not importable: checking names only")
        Requirement = None
    # Recurse only through what the layer installed; a host package counts as met when its
    # version fits (its own dependencies are the host's business).
    layer = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions(path=[str(target)])}
    problems, seen, todo = [], set(), [("flockserve", frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        for line in dist.requires or []:
            if Requirement is None:
                dep = re.split(r"[ ;<>=!~\[(]", line, 1)[0]
                if "extra ==" not in line and re.sub(r"[-_.]+", "-", dep).lower() in layer:
                    todo.append((dep, frozenset()))
                continue
            req = Requirement(line)
            envs = [dict(default_environment(), extra=e) for e in (extras or {""})]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{name} needs {req}, found {req.name} {have}")
            if re.sub(r"[-_.]+", "-", req.name).lower() in layer:
                todo.append((req.name, frozenset(req.extras)))
    return problems


def main() -> int:
    wheel_dir, target = Path(sys.argv[1]), Path(sys.argv[2])
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        say(f"no wheels in {wheel_dir}")
        return 1
    bad = [w.name for w in wheels if not wheel_ok_here(w.name)]
    if bad:
        say(f"these wheels do not fit this Python ({sys.version.split()[0]}, {sys.platform}): {', '.join(bad)}; "
            "the bundle is built for CPython 3.12 on x86_64 Linux (set FLOCK_PYTHON to such an interpreter)")
        return 1
    key = hashlib.sha256(("\n".join(w.name for w in wheels) + sys.executable).encode()).hexdigest()
    stamp = target / ".bundle-stamp"
    if stamp.is_file() and stamp.read_text() == key:
        say(f"python layer up to date ({target})")
    else:
        install(wheels, target)
        stamp.write_text(key)
    problems = check(target)
    if problems:
        say("the host Python cannot run flockserve with the bundle's wheels:\n  " + "\n  ".join(problems))
        return 1
    say("every requirement of flockserve is met (bundle wheels + host packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
