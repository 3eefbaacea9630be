"""`make bundle`: one archive with everything a stock CUDA PyTorch host lacks to run Flock offline.

    python scripts/bundle/build.py [--out dist/flock-bundle.tar.xz] [--work build/bundle]
                                   [--source head|worktree] [--part-sizes]

Parts (each cached under --work, rebuilt only when its inputs change):
  java/     jlink runtime of the modules the broker needs (JDK on this machine), native libs stripped
  kafka/    the Kafka broker classpath fetched by scripts/services (scripts/kafka/pom.xml) without
            netty and reload4j, slf4j-simple as the logging binding, zstd-jni and snappy-java cut to
            linux x86_64, every jar re-stored uncompressed so xz compresses the classes
  pg/       PostgreSQL 15 built from Debian's source package, without ICU/LLVM/LDAP/GSSAPI/SSL/
            readline/zlib so it needs only glibc; initdb, pg_ctl, postgres, psql, pg_isready, libpq,
            the loadable modules initdb needs, its own time-zone data; relocatable ($ORIGIN rpath)
  wheels/   cp312 manylinux x86_64 wheels of scripts/bundle/wheels.txt + flockserve itself (also
            re-stored uncompressed); every Requires-Dist is checked against the wheels and
            scripts/bundle/host-provides.txt
  bin/      flock-up, flock-down, flockserve (scripts/bundle/), scripts/services (the same script as
            in the repo) and scripts/kafka/pom.xml
The archive must stay <= 60 MiB (--max-mib).
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent

JAVA_MODULES = ["java.base", "java.management", "java.naming", "java.security.jgss", "java.security.sasl",
                "jdk.unsupported", "java.xml", "java.logging", "jdk.management", "java.sql", "jdk.crypto.ec"]
SLF4J_SIMPLE = "org.slf4j:slf4j-simple:1.7.36"
# Jars the KRaft broker does not load: netty (ZooKeeper TLS client only), reload4j + its binding.
DROP_JARS = re.compile(r"^(netty-.*|reload4j-.*|slf4j-reload4j-.*)\.jar$")
# Native libraries kept in jars that carry one per platform.
KEEP_NATIVE = {
    "zstd-jni": (re.compile(r"^(linux|darwin|win|freebsd|aix|sunos)/"), re.compile(r"^linux/amd64/")),
    "snappy-java": (re.compile(r"^org/xerial/snappy/native/"), re.compile(r"^org/xerial/snappy/native/Linux/x86_64/")),
}
PG_DEB_VERSION = "15.18-0+deb12u1"
PG_CONFIGURE = ["--without-icu", "--without-readline", "--without-zlib", "--without-llvm", "--without-ldap",
                "--without-gssapi", "--without-openssl", "--without-pam", "--without-libxml", "--without-lz4",
                "--without-zstd", "--without-systemd", "--without-perl", "--without-python", "--without-tcl"]
PG_BINARIES = ["postgres", "initdb", "pg_ctl", "psql", "pg_isready"]
# Loadable modules initdb and a plain server load (PL/pgSQL, text search, logical/physical
# replication plumbing); encoding conversions (*_and_*.so) are kept too, they are small.
PG_MODULES = re.compile(r"^(plpgsql|dict_snowball|libpqwalreceiver|pgoutput|\w+_and_\w+)\.so$")
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[bundle {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def stamp_ok(d: Path, key: str) -> bool:
    return (d / ".stamp").is_file() and (d / ".stamp").read_text() == key


def write_stamp(d: Path, key: str) -> None:
    (d / ".stamp").write_text(key)


def restore_zip(src: Path, dst: Path, keep=lambda name: True) -> None:
    """Copy a jar/wheel with every member stored (no deflate): the archive's xz then sees the raw
    bytes, which compress much better than deflated ones. Contents and RECORD hashes unchanged."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not keep(info.filename):
                continue
            data = zin.read(info)
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_STORED
            zout.writestr(out, data)


# ---------------------------------------------------------------- java
def build_java(work: Path) -> Path:
    out = work / "parts" / "java"
    jlink = shutil.which("jlink") or die("jlink not found: a JDK 17+ is needed to build the bundle")
    jver = run([jlink, "--version"], capture_output=True, text=True).stdout.strip()
    key = json.dumps([jver, JAVA_MODULES, 2])
    if stamp_ok(out, key):
        say(f"java: cached ({mib(du(out))})")
        return out
    say(f"java: jlink {jver} with {len(JAVA_MODULES)} modules")
    shutil.rmtree(out, ignore_errors=True)
    # --compress=0: the archive's xz does better than jlink's zip on the modules image.
    run([jlink, "--add-modules", ",".join(JAVA_MODULES), "--strip-debug", "--no-man-pages",
         "--no-header-files", "--compress=0", "--output", out])
    for so in out.rglob("*.so"):
        run(["strip", "--strip-unneeded", so])
    (out / "bin" / "keytool").unlink(missing_ok=True)
    write_stamp(out, key)
    say(f"java: {mib(du(out))}")
    return out


# ---------------------------------------------------------------- kafka
def build_kafka(work: Path) -> Path:
    state = work / "kafka-fetch"
    libs = state / "kafka" / "libs"
    say("kafka: fetching the broker classpath through scripts/services fetch (cached)")
    env = dict(os.environ, FLOCK_STATE_DIR=str(state))
    env.pop("FLOCK_KAFKA_LIBS", None)
    run([ROOT / "scripts" / "services", "fetch"], env=env)
    extra = work / "kafka-extra"
    jar = extra / ("slf4j-simple-" + SLF4J_SIMPLE.rsplit(":", 1)[1] + ".jar")
    if not jar.is_file():
        say(f"kafka: fetching {SLF4J_SIMPLE}")
        extra.mkdir(parents=True, exist_ok=True)
        run(["mvn", "-B", "-q", "-ntp", "dependency:copy", f"-Dartifact={SLF4J_SIMPLE}", f"-DoutputDirectory={extra}"],
            stdout=subprocess.DEVNULL)
    jars = sorted(p for p in libs.glob("*.jar") if not DROP_JARS.match(p.name)) + [jar]
    version = (libs / ".version").read_text().strip()
    key = json.dumps([version, [p.name for p in jars], DROP_JARS.pattern, 3])
    out = work / "parts" / "kafka"
    if stamp_ok(out, key):
        say(f"kafka: cached ({mib(du(out))})")
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "libs").mkdir(parents=True)
    dropped = sorted(p.name for p in libs.glob("*.jar") if DROP_JARS.match(p.name))
    say(f"kafka: {len(jars)} jars, dropping {len(dropped)} ({', '.join(d.rsplit('-', 1)[0] for d in dropped)})")
    for p in jars:
        keep = lambda name: True  # noqa: E731
        for prefix, (native, wanted) in KEEP_NATIVE.items():
            if p.name.startswith(prefix + "-"):
                keep = lambda name, n=native, w=wanted: not n.match(name) or bool(w.match(name))  # noqa: E731
        # Signatures would no longer match re-stored/cut jars; none of these is verified anyway.
        restore_zip(p, out / "libs" / p.name,
                    lambda name, k=keep: k(name) and not re.match(r"META-INF/[^/]+\.(SF|RSA|DSA|EC)$", name))
    (out / "libs" / ".version").write_text(version + "\n")
    write_stamp(out, key)
    say(f"kafka: {mib(du(out))} of jars (stored)")
    return out


# ---------------------------------------------------------------- postgresql
def apt_opts(work: Path) -> list[str]:
    apt = work / "apt"
    return ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}"]


def fetch_pg_source(work: Path) -> Path:
    src = work / "pgsrc"
    upstream = PG_DEB_VERSION.split("-")[0]
    tarball = src / f"postgresql-15_{upstream}.orig.tar.bz2"
    if tarball.is_file():
        return tarball
    say(f"pg: fetching Debian's postgresql-15 {PG_DEB_VERSION} source package")
    apt = work / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n")
    run(["apt-get", *apt_opts(work), "-qq", "update"])
    src.mkdir(parents=True, exist_ok=True)
    run(["apt-get", *apt_opts(work), "-qq", "source", "--download-only", f"postgresql-15={PG_DEB_VERSION}"], cwd=src)
    return tarball


def build_pg(work: Path) -> Path:
    upstream = PG_DEB_VERSION.split("-")[0]
    key = json.dumps([PG_DEB_VERSION, PG_CONFIGURE, PG_BINARIES, PG_MODULES.pattern, 2])
    out = work / "parts" / "pg"
    if stamp_ok(out, key):
        say(f"pg: cached ({mib(du(out))})")
        return out
    tarball = fetch_pg_source(work)
    build = work / "pgbuild"
    srcdir = build / f"postgresql-{upstream}"
    stage = build / "stage"
    if not (build / ".installed").is_file() or (build / ".installed").read_text() != key:
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        say(f"pg: building PostgreSQL {upstream} (configure + make, a few minutes)")
        run(["tar", "xjf", tarball, "-C", build])
        logf = build / "build.log"
        with open(logf, "w") as log:
            try:
                run(["./configure", "--prefix=/opt/pgsql", *PG_CONFIGURE, "CFLAGS=-O2 -g0"], cwd=srcdir,
                    stdout=log, stderr=subprocess.STDOUT)
                # rpath $ORIGIN/../lib: bin/ and lib/ stay siblings wherever the tree is unpacked.
                jobs = str(os.cpu_count() or 2)
                run(["make", "-j", jobs, "rpathdir=$$ORIGIN/../lib"], cwd=srcdir, stdout=log, stderr=subprocess.STDOUT)
                run(["make", "rpathdir=$$ORIGIN/../lib", "install", f"DESTDIR={stage}"], cwd=srcdir, stdout=log,
                    stderr=subprocess.STDOUT)
            except subprocess.CalledProcessError:
                die(f"PostgreSQL build failed; see {logf}")
        (build / ".installed").write_text(key)
    inst = stage / "opt" / "pgsql"
    shutil.rmtree(out, ignore_errors=True)
    (out / "bin").mkdir(parents=True)
    (out / "lib").mkdir()
    for b in PG_BINARIES:
        shutil.copy2(inst / "bin" / b, out / "bin" / b)
    for p in (inst / "lib").iterdir():
        if p.name.startswith("libpq.so") or PG_MODULES.match(p.name):
            if p.is_symlink():
                os.symlink(os.readlink(p), out / "lib" / p.name)
            else:
                shutil.copy2(p, out / "lib" / p.name)
    share = out / "share"
    shutil.copytree(inst / "share", share, symlinks=True)
    for p in (share / "extension").iterdir():
        if not p.name.startswith("plpgsql"):
            p.unlink()
    for junk in ("man", "doc"):
        shutil.rmtree(share / junk, ignore_errors=True)
    for f in list((out / "bin").iterdir()) + [p for p in (out / "lib").iterdir() if not p.is_symlink()]:
        run(["strip", "--strip-unneeded", f])
    # Self-check: nothing but glibc.
    for f in [out / "bin" / b for b in PG_BINARIES]:
        deps = run(["ldd", f], capture_output=True, text=True).stdout
        bad = [ln.strip() for ln in deps.splitlines()
               if "=>" in ln and not re.search(r"lib(c|m|pq)\.so|libpthread|libdl|librt|ld-linux|linux-vdso", ln)]
        if bad or "not found" in deps:
            die(f"pg: {f.name} needs more than glibc: {bad}")
    write_stamp(out, key)
    say(f"pg: {mib(du(out))} (needs only glibc)")
    return out


# ---------------------------------------------------------------- wheels
def read_list(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_meta(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        return email.parser.Parser().parsestr(z.read(name).decode())


def check_requirements(wheels: list[Path], host_provides: list[str]) -> list[str]:
    """Every Requires-Dist (for cp312 linux x86_64, with the extras asked for) of every shipped wheel
    must be met by a shipped wheel or be named in host-provides.txt. Returns the problems."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    shipped = {}
    for w in wheels:
        m = wheel_meta(w)
        shipped[canon(m["Name"])] = (Version(m["Version"]), m.get_all("Requires-Dist") or [])
    host = {canon(n) for n in host_provides}
    problems, seen = [], set()
    todo = [(canon("flockserve"), frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in shipped:
            continue
        for line in shipped[name][1]:
            req = Requirement(line)
            envs = [dict(TARGET_ENV, extra=e) for e in (extras or {""})]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
                continue
            dep = canon(req.name)
            if dep in shipped:
                if req.specifier and not req.specifier.contains(shipped[dep][0], prereleases=True):
                    problems.append(f"{name} needs {req}, the bundle has {dep} {shipped[dep][0]}")
                todo.append((dep, frozenset(req.extras)))
            elif dep not in host:
                problems.append(f"{name} needs {req}: not in wheels.txt nor host-provides.txt")
    for n in shipped:
        if n != "flockserve" and not any(n == s for s, _ in seen):
            problems.append(f"{n} is shipped but nothing requires it")
    return problems


def build_wheels(work: Path, pip_python: str, source: str) -> Path:
    dl = work / "wheels-cp312"
    dl.mkdir(parents=True, exist_ok=True)
    reqs = read_list(HERE / "wheels.txt")
    have = {canon(wheel_meta(w)["Name"]) + "==" + wheel_meta(w)["Version"] for w in dl.glob("*.whl")}
    if not all(canon(r.split("==")[0]) + "==" + r.split("==")[1] in have for r in reqs):
        say(f"wheels: downloading {len(reqs)} cp312 manylinux x86_64 wheels")
        for w in dl.glob("*.whl"):
            w.unlink()
        run([pip_python, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", dl, *reqs])
    # flockserve itself, from the committed tree (HEAD) unless --source worktree.
    src = work / "flockserve-src"
    shutil.rmtree(src, ignore_errors=True)
    if source == "head":
        rev = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        say(f"wheels: building flockserve from git HEAD ({rev})")
        src.mkdir(parents=True)
        archive = run(["git", "-C", ROOT, "archive", "--format=tar", "HEAD"], capture_output=True).stdout
        run(["tar", "x", "-C", src], input=archive)
    else:
        rev = "worktree"
        say("wheels: building flockserve from the working tree")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".flock", "build", "dist",
                                                                 "__pycache__", "*.egg-info", "bench_out"))
    fw = work / "flockserve-wheel"
    shutil.rmtree(fw, ignore_errors=True)
    r = run([pip_python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", fw, src],
            capture_output=True, text=True, check=False)
    if r.returncode:
        die(f"building the flockserve wheel failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    shutil.rmtree(src, ignore_errors=True)
    wheels = sorted(dl.glob("*.whl")) + sorted(fw.glob("*.whl"))
    problems = check_requirements(wheels, read_list(HERE / "host-provides.txt"))
    if problems:
        die("wheels: requirements not met:\n  " + "\n  ".join(problems))
    say("wheels: every Requires-Dist is met by a shipped wheel or by host-provides.txt")
    out = work / "parts" / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for w in wheels:
        restore_zip(w, out / w.name)
    (out / "SOURCE").write_text(rev + "\n")
    say(f"wheels: {len(wheels)} wheels, {mib(du(out))} (stored)")
    return out


# ---------------------------------------------------------------- assemble
def assemble(work: Path, parts: dict[str, Path], name: str) -> Path:
    tree = work / "tree" / name
    shutil.rmtree(tree.parent, ignore_errors=True)
    tree.mkdir(parents=True)
    for sub, p in parts.items():
        shutil.copytree(p, tree / sub, symlinks=True, ignore=shutil.ignore_patterns(".stamp"))
    (tree / "bin").mkdir()
    for f in ("flock-up", "flock-down", "flockserve", "common.sh", "install_wheels.py"):
        shutil.copy2(HERE / f, tree / "bin" / f)
    (tree / "scripts" / "kafka").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "services", tree / "scripts" / "services")
    shutil.copy2(ROOT / "scripts" / "kafka" / "pom.xml", tree / "scripts" / "kafka" / "pom.xml")
    shutil.copy2(HERE / "README.bundle.md", tree / "README.md")
    return tree


def manifest(tree: Path, parts: dict[str, Path], part_sizes: dict[str, int] | None) -> str:
    lines = [f"flock-bundle built {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"flockserve source: {(tree / 'wheels' / 'SOURCE').read_text().strip()}",
             f"kafka: {(tree / 'kafka' / 'libs' / '.version').read_text().strip()}",
             "", "part      unpacked    xz"]
    for sub in list(parts) + ["bin", "scripts"]:
        xz = mib(part_sizes[sub]) if part_sizes and sub in part_sizes else "-"
        lines.append(f"{sub:8s} {mib(du(tree / sub)):>10s}  {xz}")
    lines += ["", "files:"]
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.parent.name not in ("timezone",) and "timezone/" not in str(p):
            rel = p.relative_to(tree)
            if rel.parts[0] in ("java",) and rel.parts[1] == "lib" and p.suffix not in (".so", ""):
                continue
            lines.append(f"  {p.stat().st_size:>10d}  {rel}")
    return "\n".join(lines) + "\n"


def xz_size(path: Path, level: str) -> int:
    tar = subprocess.Popen(["tar", "cf", "-", "-C", path.parent, path.name], stdout=subprocess.PIPE)
    xz = subprocess.run(["xz", level, "-T0", "-c"], stdin=tar.stdout, capture_output=True, check=True)
    tar.wait()
    return len(xz.stdout)


def die(msg: str):
    print(f"[bundle] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "flock-bundle.tar.xz")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bundle")
    ap.add_argument("--source", choices=["head", "worktree"], default=os.environ.get("FLOCK_BUNDLE_SOURCE", "head"))
    ap.add_argument("--part-sizes", action="store_true", help="Also xz each part alone to report its share.")
    ap.add_argument("--max-mib", type=float, default=60.0)
    ap.add_argument("--xz-level", default="-9")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    parts = {"java": build_java(work), "kafka": build_kafka(work), "pg": build_pg(work),
             "wheels": build_wheels(work, sys.executable, args.source)}
    name = "flock-bundle"
    tree = assemble(work, parts, name)
    sizes = None
    if args.part_sizes:
        say("measuring each part's xz size")
        sizes = {sub: xz_size(tree / sub, args.xz_level) for sub in list(parts) + ["bin", "scripts"]}
    (tree / "MANIFEST.txt").write_text(manifest(tree, parts, sizes))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"archiving {mib(du(tree))} into {out} (xz {args.xz_level})")
    tmp = out.with_suffix(".tmp")
    tar = subprocess.Popen(["tar", "cf", "-", "--owner=0", "--group=0", "--sort=name", "-C", tree.parent, name],
                           stdout=subprocess.PIPE)
    with open(tmp, "wb") as f:
        run(["xz", args.xz_level, "-T0", "-c"], stdin=tar.stdout, stdout=f)
    if tar.wait() != 0:
        die("tar failed")
    tmp.replace(out)
    size = out.stat().st_size
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    (out.parent / (out.name + ".sha256")).write_text(f"{digest}  {out.name}\n")
    print((tree / "MANIFEST.txt").read_text().split("\nfiles:")[0])
    say(f"{out}: {size} bytes = {mib(size)} (limit {args.max_mib} MiB), sha256 {digest[:16]}...")
    if size > args.max_mib * 2**20:
        die(f"the bundle is {mib(size)}, over the {args.max_mib} MiB limit")


if __name__ == "__main__":
    main()
