"""The wheels the lent GPU machine needs, and what travels to it.

The lent machine (kind ``nvidia-h200``) runs the image's ``python3`` (3.12, torch 2.11, triton 3.6,
transformers 5.17, ...; ``image_packages.txt`` beside this file) and reaches no package index, so what
the GPU steps import that the image lacks travels as wheels, in the call's ``carry``:

    python benchmarks/gpu/bundle.py build              # = make gpu-bundle: wheels of bundle.txt -> benchmarks/gpu/bundle/
    python benchmarks/gpu/bundle.py build --python 3.11 --dest DIR       # the same for another Python (PY=3.11)
    python benchmarks/gpu/bundle.py twin               # = make gpu-bundle TWIN=1: the image's torch & co. for a local check
    python benchmarks/gpu/bundle.py check              # every requirement of every bundled wheel: bundled or on the image
    python benchmarks/gpu/bundle.py size               # the travelling tree against the 60 MiB budget

``build`` runs ``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux..._x86_64`` once per line of ``bundle.txt`` (exact versions), removes any other
wheel from the folder (two versions of one package stop the install there), checks the requirement
closure and writes ``bundle_manifest.json`` (committed: file, size, sha256, Requires-Dist of each
wheel, so that the closure and size checks also run where the git-ignored folder is absent).

What travels, counted as the device tool counts it: the files git tracks, the untracked files git
does not ignore, ``shared/`` inside the checkout, and the carried paths, by their apparent sizes
(``lstat``; a symbolic link travels as a link). The tool refuses more than 64 MiB; this project keeps
the total under 60 MiB (:data:`BUDGET_BYTES`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "bundle.txt"
TWIN_REQUIREMENTS = HERE / "image_twin.txt"
IMAGE_PACKAGES = HERE / "image_packages.txt"
MANIFEST = HERE / "bundle_manifest.json"
BUNDLE_DIR = HERE / "bundle"
TWIN_DIR = HERE / "image-twin"
#: The bundle's path relative to the repository root, as the device call's ``carry`` names it.
CARRY = "benchmarks/gpu/bundle"

DEVICE_PYTHON = "3.12"
#: Platform tags pip may match for the device (x86-64, glibc; pip matches each N exactly).
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64",
)
MIB = 2**20
#: The device tool's limit on what travels, and this project's budget under it.
TOOL_LIMIT_BYTES = 64 * MIB
BUDGET_BYTES = 60 * MIB


# =========================================================================== names, lists, wheels


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = REQUIREMENTS) -> dict[str, tuple[str, str]]:
    """``canonical name -> (name as written, version)`` of a file of ``name==version`` lines (``#`` comments)."""
    pins: dict[str, tuple[str, str]] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path}: expected 'name==version', got {raw!r}")
        key = canonical(m.group(1))
        if key in pins:
            raise ValueError(f"{path}: {m.group(1)} pinned twice")
        pins[key] = (m.group(1), m.group(2))
    return pins


def read_image_packages(path: Path = IMAGE_PACKAGES) -> tuple[dict[str, str | None], str]:
    """``(canonical name -> version or None, python version)`` from ``image_packages.txt``."""
    packages: dict[str, str | None] = {}
    python = DEVICE_PYTHON
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if canonical(name) == "python":
            python = version.strip()
            continue
        packages[canonical(name.strip())] = version.strip() or None
    return packages, python


def wheel_info(path: Path) -> dict[str, Any]:
    """Name, version, tags, Requires-Python, Requires-Dist, size and sha256 of a wheel file."""
    path = Path(path)
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {path.name}")
    with zipfile.ZipFile(path) as zf:
        meta_name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if meta_name is None:
            raise ValueError(f"{path.name}: no .dist-info/METADATA")
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    py_tags, abi_tags, plat_tags = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    return {
        "file": path.name,
        "name": meta["Name"],
        "version": meta["Version"],
        "tags": {"python": py_tags, "abi": abi_tags, "platform": plat_tags},
        "pure": plat_tags == ["any"] and abi_tags == ["none"],
        "requires_python": meta.get("Requires-Python"),
        "requires_dist": list(meta.get_all("Requires-Dist") or []),
        "bytes": path.stat().st_size,
        "sha256": digest,
    }


def bundle_wheels(folder: Path = BUNDLE_DIR) -> list[dict[str, Any]]:
    return [wheel_info(p) for p in sorted(Path(folder).glob("*.whl"))]


# =========================================================================== the requirement closure


def _packaging():
    try:
        from packaging.markers import Marker
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]
    return Marker, Requirement, SpecifierSet, Version


def marker_environment(python_full: str) -> dict[str, str]:
    """PEP 508 marker values of the device: CPython ``python_full`` on Linux x86-64, no extras."""
    major_minor = ".".join(python_full.split(".")[:2])
    return {
        "implementation_name": "cpython", "implementation_version": python_full, "os_name": "posix",
        "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
        "platform_system": "Linux", "platform_version": "", "python_full_version": python_full,
        "python_version": major_minor, "sys_platform": "linux", "extra": "",
    }


def tags_fit(tags: dict[str, list[str]], python: str = DEVICE_PYTHON) -> bool:
    """Whether a wheel's tags install on CPython ``python`` (``3.12``), Linux x86-64 (glibc)."""
    nodot = python.replace(".", "")
    py_ok = any(t in (f"cp{nodot}", f"py{nodot}", "py3", f"py{nodot[0]}") or
                (t.startswith("cp3") and t in ("cp39", "cp310", "cp311", "cp312") and "abi3" in tags["abi"]
                 and int(t[3:]) <= int(nodot[1:]))
                for t in tags["python"])
    abi_ok = any(a in ("none", "abi3", f"cp{nodot}") for a in tags["abi"])
    plat_ok = any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in tags["platform"])
    return py_ok and abi_ok and plat_ok


def closure_report(wheels: Iterable[dict[str, Any]], image: dict[str, str | None], python_full: str,
                   python: str | None = None) -> tuple[list[str], list[str]]:
    """Check the bundle against the image: ``(problems, notes)``.

    Problems: a wheel that does not install on the device's Python (tags, Requires-Python); two wheels of
    one project; a requirement (Requires-Dist whose marker holds on the device; ``extra`` requirements are
    skipped) that is neither bundled nor on the image, or whose bundled or recorded image version is outside
    its specifier. Notes: requirements met by an image package whose version nobody recorded (name only)."""
    Marker, Requirement, SpecifierSet, Version = _packaging()
    env = marker_environment(python_full)
    python = python or ".".join(python_full.split(".")[:2])
    wheels = list(wheels)
    problems: list[str] = []
    notes: list[str] = []
    bundled: dict[str, str] = {}
    for w in wheels:
        key = canonical(w["name"])
        if key in bundled:
            problems.append(f"two wheels of {w['name']}: {bundled[key]} and {w['version']} (the install there stops)")
        bundled[key] = w["version"]
        if not tags_fit(w["tags"], python):
            problems.append(f"{w['file']} does not install on CPython {python} manylinux x86_64")
        if w.get("requires_python") and Version(python_full) not in SpecifierSet(w["requires_python"]):
            problems.append(f"{w['file']} requires Python {w['requires_python']}, the device has {python_full}")
    for w in wheels:
        for text in w.get("requires_dist", []):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # another Python/platform, or an extra
            key = canonical(req.name)
            where = f"{w['name']} {w['version']} requires {text!s}"
            if key in bundled:
                if not req.specifier.contains(bundled[key], prereleases=True):
                    problems.append(f"{where}: the bundle carries {req.name} {bundled[key]}")
            elif key in image:
                have = image[key]
                if have is None:
                    if str(req.specifier):
                        notes.append(f"{where}: on the image at an unrecorded version")
                elif not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{where}: the image has {req.name} {have}; bundle a matching version")
            else:
                problems.append(f"{where}: neither bundled nor on the image; add it to benchmarks/gpu/bundle.txt")
    return problems, notes


# =========================================================================== what travels


def travelling_files(root: Path = ROOT, carry: Iterable[str] = ()) -> dict[str, int]:
    """``relative path -> bytes`` of what a device call sends: tracked files, untracked files git does not
    ignore, ``shared/`` inside the checkout and the ``carry`` paths (files under them), by ``lstat`` size."""
    root = Path(root)
    out = subprocess.run(["git", "-C", os.fspath(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode("utf-8", "surrogateescape")
    files: dict[str, int] = {}
    for rel in filter(None, out.split("\0")):
        path = root / rel
        try:
            st = path.lstat()
        except FileNotFoundError:  # tracked but deleted in the work tree: nothing travels
            continue
        if not path.is_dir() or path.is_symlink():  # a submodule (a folder) travels without its files
            files[rel] = st.st_size
    extra = [root / "shared"] if (root / "shared").is_dir() else []
    extra += [root / c for c in carry]
    for top in extra:
        if not os.path.lexists(top):
            continue
        if top.is_file() or top.is_symlink():
            files[os.path.relpath(top, root)] = top.lstat().st_size
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = Path(dirpath) / name
                files[os.path.relpath(p, root)] = p.lstat().st_size
    return files


def size_report(root: Path = ROOT, bundle: Path = BUNDLE_DIR, manifest: Path = MANIFEST) -> dict[str, Any]:
    """Bytes that travel with the documented device call (the bundle carried): the tree without the
    bundle, the bundle (its folder, or the manifest's ``bundle_bytes`` when the folder is absent), the sum."""
    tree = travelling_files(root)
    bundle = Path(bundle)
    rel = os.path.relpath(bundle, root)
    tree_bytes = sum(v for k, v in tree.items() if not (k == rel or k.startswith(rel + os.sep)))
    wheels = sorted(bundle.glob("*.whl")) if bundle.is_dir() else []
    if wheels:
        bundle_bytes, source = sum(p.lstat().st_size for p in bundle.rglob("*") if p.is_file()), f"folder {rel}"
    else:
        bundle_bytes, source = int(json.loads(Path(manifest).read_text())["bundle_bytes"]), f"manifest {manifest.name}"
    return {"tree_bytes": tree_bytes, "bundle_bytes": bundle_bytes, "bundle_source": source,
            "total_bytes": tree_bytes + bundle_bytes, "budget_bytes": BUDGET_BYTES, "tool_limit_bytes": TOOL_LIMIT_BYTES}


# =========================================================================== downloads


def pip_download(pins: dict[str, tuple[str, str]], dest: Path, python: str, platforms: Iterable[str] = PLATFORMS,
                 pip: list[str] | None = None) -> list[Path]:
    """One ``pip download --no-deps --only-binary=:all:`` per pin into ``dest``; other wheels there are removed."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pip = pip or [sys.executable, "-m", "pip"]
    for name, version in pins.values():
        cmd = [*pip, "download", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp"]
        for plat in platforms:
            cmd += ["--platform", plat]
        cmd += ["-d", os.fspath(dest), f"{name}=={version}"]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    keep: list[Path] = []
    for path in sorted(dest.glob("*.whl")):
        info = wheel_info(path)
        pin = pins.get(canonical(info["name"]))
        if pin is None or pin[1] != info["version"]:
            print(f"removing {path.name} (not in the pins)", flush=True)
            path.unlink()
        else:
            keep.append(path)
    missing = set(pins) - {canonical(wheel_info(p)["name"]) for p in keep}
    if missing:
        raise SystemExit(f"no wheel downloaded for {sorted(missing)}")
    return keep


def write_manifest(wheels: list[dict[str, Any]], path: Path, python: str, python_full: str) -> dict[str, Any]:
    manifest = {
        "what": "wheels carried to the lent GPU machine (benchmarks/gpu/bundle/, made by `make gpu-bundle`); "
                "written by benchmarks/gpu/bundle.py build, read by tests/test_gpu_bundle.py",
        "python": python,
        "python_full": python_full,
        "platforms": list(PLATFORMS),
        "carry": CARRY,
        "bundle_bytes": sum(w["bytes"] for w in wheels),
        "wheels": [{k: w[k] for k in ("file", "name", "version", "bytes", "sha256", "pure", "requires_python",
                                      "requires_dist")} | {"tags": w["tags"]} for w in wheels],
    }
    Path(path).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def cmd_build(args) -> int:
    pins = read_pins(Path(args.requirements))
    image, python_full = read_image_packages()
    dest = Path(args.dest)
    if args.python != DEVICE_PYTHON:
        python_full = f"{args.python}.0"
    pip_download(pins, dest, args.python)
    wheels = bundle_wheels(dest)
    problems, notes = closure_report(wheels, image, python_full, args.python)
    for n in notes:
        print(f"note: {n}")
    if problems:
        print("\n".join(["bundle requirements not met:"] + [f"  - {p}" for p in problems]), file=sys.stderr)
        return 1
    manifest_path = Path(args.manifest) if args.manifest else (
        MANIFEST if (args.python == DEVICE_PYTHON and dest.resolve() == BUNDLE_DIR.resolve()) else dest / "manifest.json")
    manifest = write_manifest(wheels, manifest_path, args.python, python_full)
    print(f"{len(wheels)} wheels, {manifest['bundle_bytes'] / MIB:.2f} MiB in {dest}; manifest {manifest_path}")
    for w in wheels:
        print(f"  {w['file']}  {w['bytes'] / MIB:.2f} MiB")
    report = size_report(bundle=dest, manifest=manifest_path)
    print(f"travelling tree with the bundle: {report['total_bytes'] / MIB:.2f} MiB "
          f"(budget {BUDGET_BYTES / MIB:.0f} MiB, tool limit {TOOL_LIMIT_BYTES / MIB:.0f} MiB)")
    return 0 if report["total_bytes"] <= BUDGET_BYTES else 1


def cmd_twin(args) -> int:
    """The image's torch, triton, torchvision, transformers, huggingface_hub (+ httpx) for THIS Python,
    installed into ``image-twin/site`` for the dry run (never carried)."""
    pins = read_pins(TWIN_REQUIREMENTS)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels_dir, site = Path(args.dest) / "wheels", Path(args.dest) / "site"
    pip_download(pins, wheels_dir, py, ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                        "manylinux2014_x86_64"))
    tmp = Path(tempfile.mkdtemp(prefix="site-", dir=args.dest))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--target", os.fspath(tmp), *map(os.fspath, sorted(wheels_dir.glob("*.whl")))]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    print(f"image twin installed in {site}: " + ", ".join(f"{n}=={v}" for n, v in pins.values()))
    return 0


def cmd_check(args) -> int:
    image, python_full = read_image_packages()
    dest = Path(args.dest)
    if any(dest.glob("*.whl")):
        wheels, source = bundle_wheels(dest), os.fspath(dest)
    else:
        wheels, source = json.loads(MANIFEST.read_text())["wheels"], os.fspath(MANIFEST)
    problems, notes = closure_report(wheels, image, python_full)
    print(f"{len(wheels)} wheels from {source}; {len(problems)} problem(s)")
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def cmd_size(args) -> int:
    r = size_report(bundle=Path(args.dest))
    print(f"tree {r['tree_bytes'] / MIB:.2f} MiB + bundle {r['bundle_bytes'] / MIB:.2f} MiB ({r['bundle_source']}) = "
          f"{r['total_bytes'] / MIB:.2f} MiB; budget {BUDGET_BYTES / MIB:.0f} MiB, tool limit {TOOL_LIMIT_BYTES / MIB:.0f} MiB")
    return 0 if r["total_bytes"] <= BUDGET_BYTES else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the bundle's wheels, check them, write the manifest")
    b.add_argument("--python", default=DEVICE_PYTHON, help="target Python (default 3.12, the device's)")
    b.add_argument("--dest", default=os.fspath(BUNDLE_DIR))
    b.add_argument("--requirements", default=os.fspath(REQUIREMENTS))
    b.add_argument("--manifest", default=None, help="default: bundle_manifest.json for the device's bundle, else DEST/manifest.json")
    t = sub.add_parser("twin", help="download and install the image's torch & co. for this Python (local dry run only)")
    t.add_argument("--dest", default=os.fspath(TWIN_DIR))
    c = sub.add_parser("check", help="the requirement closure of the bundle (folder, else manifest)")
    c.add_argument("--dest", default=os.fspath(BUNDLE_DIR))
    s = sub.add_parser("size", help="the travelling tree plus the bundle against the budget")
    s.add_argument("--dest", default=os.fspath(BUNDLE_DIR))
    args = ap.parse_args(argv)
    return {"build": cmd_build, "twin": cmd_twin, "check": cmd_check, "size": cmd_size}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
