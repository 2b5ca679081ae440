"""The GPU call: the wheel bundle, its requirement closure against the lent machine's image,
the size of what travels, the step modules importing as they would on the image, and run.sh's schedule,
install and dry run (benchmarks/gpu/{bundle.py,versions.py,run.sh})."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
RUN_SH = GPU / "run.sh"
MIB = 2**20
#: Packages the image lacks and the bundle does not carry: nothing the GPU steps import may need them.
ABSENT_ON_IMAGE = ("open_clip", "torch_fidelity", "webdataset", "braceexpand")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle():
    return _load("bundle")


@pytest.fixture(scope="module")
def versions():
    return _load("versions")


def _bundle_present(bundle) -> bool:
    return any(bundle.BUNDLE_DIR.glob("*.whl"))


def _wheels(bundle) -> tuple[list[dict], str]:
    """The bundle's wheels: from the folder when `make gpu-bundle` has made it, else from the manifest."""
    if _bundle_present(bundle):
        return bundle.bundle_wheels(), "folder"
    return json.loads(bundle.MANIFEST.read_text())["wheels"], "manifest"


# =========================================================================== lists and pins


def test_image_package_list(bundle):
    image, python = bundle.read_image_packages()
    assert python == "3.12.3"
    assert len(image) >= 190
    for name, version in {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
                          "accelerate": "1.15.0", "safetensors": "0.8.0", "torchmetrics": "1.9.0"}.items():
        assert image[name] == version, name
    for name in ("peft", "numpy", "pillow", "scikit-learn", "pyyaml", "tqdm", "regex", "zipp", "filelock"):
        assert name in image, name
    for name in ("diffusers", "open-clip-torch", "torch-fidelity", "webdataset", "importlib-metadata"):
        assert name not in image, name


def test_bundle_pins_follow_constraints(bundle):
    pins = bundle.read_pins()
    assert "diffusers" in pins
    constraints = bundle.read_pins(ROOT / "constraints.txt")
    image, _ = bundle.read_image_packages()
    for key, (name, version) in pins.items():
        if key in constraints:
            assert version == constraints[key][1], f"{name}: bundle.txt {version}, constraints.txt {constraints[key][1]}"
        assert image.get(key, "absent") != version, f"{name}=={version} is on the image already: do not carry it"
    manifest = json.loads(bundle.MANIFEST.read_text())
    assert {bundle.canonical(w["name"]): w["version"] for w in manifest["wheels"]} == {k: v for k, (_, v) in pins.items()}
    assert manifest["python"] == bundle.DEVICE_PYTHON and manifest["carry"] == bundle.CARRY
    assert manifest["bundle_bytes"] == sum(w["bytes"] for w in manifest["wheels"])


def test_bundle_folder_matches_the_committed_manifest(bundle):
    if not _bundle_present(bundle):
        pytest.skip("benchmarks/gpu/bundle/ is absent (git-ignored; `make gpu-bundle` makes it): the manifest stands in")
    manifest = json.loads(bundle.MANIFEST.read_text())
    have = {w["file"]: w["sha256"] for w in bundle.bundle_wheels()}
    assert have == {w["file"]: w["sha256"] for w in manifest["wheels"]}, "run `make gpu-bundle` to refresh the manifest"


def test_every_requirement_is_bundled_or_on_the_image(bundle):
    wheels, source = _wheels(bundle)
    image, python_full = bundle.read_image_packages()
    problems, notes = bundle.closure_report(wheels, image, python_full)
    assert problems == [], f"({source}) " + "\n".join(problems)
    # a requirement met by an image package of unrecorded version is reported, not hidden
    assert all("unrecorded version" in n for n in notes)


def test_bundle_is_pure_python_so_the_dry_run_installs_the_device_wheels(bundle):
    """The dry run here (Python 3.11) installs the wheels built for the device's 3.12. That is the same
    install only while every wheel is pure Python; a binary wheel needs `make gpu-bundle PY=3.11` and
    BUNDLE=benchmarks/gpu/bundle-py3.11 for the dry run."""
    wheels, _ = _wheels(bundle)
    assert wheels and all(w["pure"] for w in wheels), [w["file"] for w in wheels if not w["pure"]]
    for w in wheels:
        assert bundle.tags_fit(w["tags"], "3.12") and bundle.tags_fit(w["tags"], "3.11"), w["file"]


def test_closure_report_flags_what_would_fail_there(bundle):
    image = {"numpy": "2.5.2", "regex": None, "huggingface-hub": "1.33.0"}
    tags = {"python": ["py3"], "abi": ["none"], "platform": ["any"]}
    ok = {"file": "a-1.0-py3-none-any.whl", "name": "a", "version": "1.0", "tags": tags, "requires_python": ">=3.9",
          "requires_dist": ["numpy>=2", "regex!=2019.12.17", "b==2.0", 'tomli; python_version < "3.11"',
                            'open-clip-torch; extra == "clip"', 'pywin32; sys_platform == "win32"']}
    b = {"file": "b-2.0-py3-none-any.whl", "name": "B", "version": "2.0", "tags": tags, "requires_dist": []}
    problems, notes = bundle.closure_report([ok, b], image, "3.12.3")
    assert problems == [] and len(notes) == 1 and "regex" in notes[0]

    bad = dict(ok, requires_dist=["huggingface-hub>=2", "open-clip-torch", "b>=3", "numpy<2"])
    problems, _ = bundle.closure_report([bad, b], image, "3.12.3")
    joined = "\n".join(problems)
    assert "the image has huggingface-hub 1.33.0" in joined
    assert "open-clip-torch: neither bundled nor on the image" in joined
    assert "the bundle carries b 2.0" in joined and "the image has numpy 2.5.2" in joined

    cp311 = dict(b, file="c-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", name="c",
                 tags={"python": ["cp311"], "abi": ["cp311"], "platform": ["manylinux_2_17_x86_64"]})
    old_python = dict(b, file="d-1.0-py3-none-any.whl", name="d", requires_python=">=3.13")
    twice = dict(b, file="B-2.1-py3-none-any.whl", version="2.1")
    problems, _ = bundle.closure_report([cp311, old_python, b, twice], image, "3.12.3")
    joined = "\n".join(problems)
    assert "c-1.0-cp311" in joined and "requires Python >=3.13" in joined and "two wheels of B" in joined


# =========================================================================== what travels


def test_travelling_files_count_like_the_device_tool(bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("ignored/\n*.log\n")
    (repo / "tracked.bin").write_bytes(b"x" * 1000)
    (repo / "sub" / "gone.txt").write_text("deleted later")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    (repo / "sub" / "gone.txt").unlink()                       # tracked, deleted: nothing travels
    (repo / "untracked.txt").write_bytes(b"y" * 300)           # untracked, not ignored: travels
    (repo / "x.log").write_bytes(b"z" * 5000)                  # ignored: stays
    (repo / "ignored").mkdir()
    (repo / "ignored" / "w.whl").write_bytes(b"w" * 700)       # ignored, but carried below
    (repo / "shared").mkdir()
    (repo / "shared" / "notes.md").write_bytes(b"s" * 50)      # shared/ inside the checkout travels
    (repo / ".gitignore").write_text("ignored/\n*.log\nshared/\n")
    files = bundle.travelling_files(repo)
    assert files == {".gitignore": len("ignored/\n*.log\nshared/\n"), "tracked.bin": 1000, "untracked.txt": 300,
                     "shared/notes.md": 50}
    carried = bundle.travelling_files(repo, carry=["ignored"])
    assert carried["ignored/w.whl"] == 700 and sum(carried.values()) == sum(files.values()) + 700


def test_travelling_tree_and_bundle_within_budget(bundle):
    """Tracked + untracked-not-ignored files + the bundle (its folder, or the manifest's recorded size when
    the git-ignored folder is absent) under 60 MiB (the device tool refuses more than 64 MiB)."""
    report = bundle.size_report()
    manifest = json.loads(bundle.MANIFEST.read_text())
    if not _bundle_present(bundle):
        assert report["bundle_source"].startswith("manifest") and report["bundle_bytes"] == manifest["bundle_bytes"]
    assert report["bundle_bytes"] > 5 * MIB  # diffusers alone is ~6 MiB: a manifest of nothing would hide the check
    print(f"\ntravelling: tree {report['tree_bytes'] / MIB:.2f} MiB + bundle {report['bundle_bytes'] / MIB:.2f} MiB "
          f"({report['bundle_source']}) = {report['total_bytes'] / MIB:.2f} MiB of {bundle.BUDGET_BYTES / MIB:.0f} MiB")
    assert report["total_bytes"] <= bundle.BUDGET_BYTES < bundle.TOOL_LIMIT_BYTES, (
        f"{report['total_bytes'] / MIB:.2f} MiB travel with the bundle: over the {bundle.BUDGET_BYTES / MIB:.0f} MiB "
        "budget (fp16 safetensors for frozen zoo artefacts, or ignore what need not travel)")


# =========================================================================== imports as on the image

_SIMULATE_IMAGE = textwrap.dedent(r'''
    """Run in a fresh interpreter: the lent machine's import world, as far as it can be had on this one."""
    import importlib.abc, importlib.metadata as md, json, os, re, sys

    cfg = json.loads(os.environ["FASTGEN_IMAGE_SIM"])
    ROOT = cfg["root"]
    OURS = (os.path.join(ROOT, "fastgen") + os.sep, os.path.join(ROOT, "benchmarks") + os.sep)
    ABSENT, NOT_ON_IMAGE, VERSIONS = set(cfg["absent"]), set(cfg["not_on_image"]), cfg["versions"]
    refused = []

    def importer():
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if not (name.startswith("<frozen importlib") or f.f_globals.get("__name__", "").startswith("importlib")):
                return name
            f = f.f_back
        return ""

    class Image(importlib.abc.MetaPathFinder):
        """Packages absent there cannot be imported at all; a package of this venv that is neither on the
        image nor bundled cannot be imported by our own code (fastgen/, benchmarks/)."""
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in ABSENT or (top in NOT_ON_IMAGE and importer().startswith(OURS)):
                refused.append(f"{name} <- {importer()}")
                raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)
            return None

    sys.meta_path.insert(0, Image())
    real_version = md.version
    def version(name):  # the image's versions, for the version checks diffusers / transformers make
        return VERSIONS.get(re.sub(r"[-_.]+", "-", name).lower()) or real_version(name)
    md.version = version
    import torch, torch.torch_version
    torch.__version__ = torch.torch_version.TorchVersion(VERSIONS["torch"] + "+cu130")
    try:
        import triton
        triton.__version__ = VERSIONS["triton"]
    except ImportError:
        pass

    exec(compile(cfg["code"], cfg["code_file"], "exec"))
    print("SIM " + json.dumps({"refused": refused, "loaded_absent": sorted(ABSENT & set(sys.modules)),
                               "torch": str(torch.__version__)}))
''')


def _simulate(bundle, code: str, code_file: str, timeout: int = 300) -> tuple[int, dict, str]:
    image, _ = bundle.read_image_packages()
    carried = set(bundle.read_pins())
    not_on_image = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if module.startswith("_") or module in ("fastgen", "benchmarks", "tests"):
            continue
        if all(bundle.canonical(d) not in image and bundle.canonical(d) not in carried for d in dists):
            not_on_image.add(module)
    cfg = {"root": str(ROOT), "absent": list(ABSENT_ON_IMAGE), "not_on_image": sorted(not_on_image),
           "versions": {k: v for k, v in image.items() if v}, "code": code, "code_file": code_file}
    env = dict(os.environ, FASTGEN_IMAGE_SIM=json.dumps(cfg), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SIMULATE_IMAGE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SIM ")), None)
    return proc.returncode, json.loads(line[4:]) if line else {}, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_step_modules_import_as_on_the_image(bundle, versions):
    """Every fastgen module the GPU steps import, and the step scripts themselves, import with open_clip,
    torch-fidelity and webdataset absent, with no import by fastgen of a package neither on the image nor
    bundled, and with the image's versions (torch 2.11.0, triton 3.6.0, transformers 5.17.0, ...) seen by
    every version check: benchmarks/gpu/versions.py, the GPU run's first step, under that simulation."""
    code = "import runpy, sys\nsys.argv = ['versions.py']\nrc = runpy.run_path(%r)['main']([])\nassert rc == 0, rc\n" % str(
        GPU / "versions.py")
    rc, sim, out = _simulate(bundle, code, str(ROOT / "tests" / "_image_sim.py"))
    assert rc == 0, out
    assert sim["loaded_absent"] == [] and sim["torch"].startswith("2.11.0"), sim
    assert re.search(r"imports: (\d+)/\1 ok", out), out
    assert len(versions.step_modules()) >= 10


def test_image_simulation_refuses_what_the_image_lacks(bundle):
    """The simulation is not vacuous: an import of webdataset (absent there) fails anywhere, and our own code
    importing a venv package that is neither on the image nor bundled fails too."""
    code = textwrap.dedent('''
        for name in ("webdataset", "open_clip"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise AssertionError(name + " imported")
        import torch
        assert str(torch.__version__).startswith("2.11.0"), torch.__version__
        import importlib.metadata as md
        assert md.version("transformers") == "5.17.0"
    ''')
    rc, sim, out = _simulate(bundle, code, str(ROOT / "fastgen" / "_probe.py"), timeout=120)
    assert rc == 0, out
    assert any(r.startswith("webdataset") for r in sim["refused"]) and any(r.startswith("open_clip") for r in sim["refused"])


def test_step_module_list_covers_the_step_scripts(versions):
    mods = versions.step_modules()
    assert {"fastgen.trainers.lcd", "fastgen.attention", "fastgen.evaluation.speed", "fastgen.models.architectures",
            "fastgen.data.sources"} <= set(mods)
    text = RUN_SH.read_text()
    for rel in versions.STEP_SCRIPTS:
        assert rel in text, rel


# =========================================================================== run.sh


def _run_sh(env_extra: dict, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "STEPS", "PACK_DIR", "RESULTS", "BUDGET_S")}
    env.update(env_extra)
    return subprocess.run(["bash", str(RUN_SH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_sh_schedule_fits_one_device_call(tmp_path):
    """PLAN=1 prints the device schedule: the five steps, their shares adding up to the 510 s budget (the
    call under 9 minutes with the install and the kill grace), each GPU step on CUDA with its own budget."""
    proc = _run_sh({"PLAN": "1", "RESULTS": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = dict(re.findall(r"PLAN  (\w+): timeout \d+ s \(share (\d+) s\)", proc.stdout))
    assert list(plan) == ["versions", "sd15_speed", "clear_attention", "flux_clear_speed", "train_lcd"]
    total = sum(int(v) for v in plan.values())
    assert total <= 510 and re.search(r"shares add up to 510 s of BUDGET_S=510", proc.stdout)
    assert 510 + 10 + 5 < 9 * 60  # budget + kill grace + packing
    cmds = dict(re.findall(r"PLAN  (\w+): timeout \d+ s \(share \d+ s\): (.*)", proc.stdout))
    for step in ("sd15_speed", "clear_attention", "flux_clear_speed", "train_lcd"):
        assert "--device cuda" in cmds[step] and re.search(r"--budget-s \d+", cmds[step]), cmds[step]
    train = cmds["train_lcd"]
    for flag in ("--study ladder", "--teachers sd15-arch", "--modes full", "--sd15-latent 64",
                 "--rungs reference,cache,batched_cfg,fused_adamw,bf16_teacher,channels_last,compile,bf16_autocast"):
        assert flag in train, flag
    assert "--tiny" not in " ".join(cmds.values())
    # the README's device call: this script, the bundle carried, the tool's longest timeout
    device_call = 'run(command="PACK_DIR=$OUT bash benchmarks/gpu/run.sh", carry=["benchmarks/gpu/bundle"], timeout_s=600)'
    assert device_call in (ROOT / "README.md").read_text() and device_call in RUN_SH.read_text()


def test_run_sh_installs_the_bundle_and_skips_steps_out_of_budget(bundle, tmp_path):
    """DRY_RUN=1 with only flux_clear_speed asked for and no budget left for it: the bundle goes into an
    empty target with --no-index, versions imports diffusers from there and fastgen from this checkout,
    the step is skipped for lack of budget (not a failure), and the packed folder holds <= 8 files."""
    if not _bundle_present(bundle):
        pytest.skip("benchmarks/gpu/bundle/ is absent: run `make gpu-bundle` (needs a package index)")
    site, results, pack = tmp_path / "site", tmp_path / "results", tmp_path / "pack"
    site.mkdir()
    (site / "stale.txt").write_text("the target is emptied first")
    proc = _run_sh({"DRY_RUN": "1", "TWIN": "0", "SITE": str(site), "RESULTS": str(results), "PACK_DIR": str(pack),
                    "STEPS": "flux_clear_speed", "MIN_STEP_S": "100000"}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "installed 3 wheels" in out and not (site / "stale.txt").exists()
    assert re.search(r"SKIP  flux_clear_speed \(budget", out) and "SKIP  sd15_speed (not in STEPS" in out
    info = json.loads((results / "versions.json").read_text())
    assert info["packages"]["diffusers"]["file"].startswith(str(site)), info["packages"]["diffusers"]
    assert info["fastgen"]["file"].startswith(str(ROOT / "fastgen")) and info["problems"] == []
    packed = sorted(p.name for p in pack.iterdir())
    assert packed == ["gpu_results.tar.gz", "run_log.txt", "summary.md"] and len(packed) <= 8


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(bundle, tmp_path):
    """The acceptance run: `DRY_RUN=1 bash benchmarks/gpu/run.sh` (about 2 minutes on the venv, 4 on the image
    twin with cold compile caches): the bundle installed into an empty target, every step's CPU path, results
    without errors; on the image twin (`make gpu-bundle TWIN=1`) torch 2.11 / transformers 5.17 ran them."""
    if not _bundle_present(bundle):
        pytest.skip("benchmarks/gpu/bundle/ is absent: run `make gpu-bundle` (needs a package index)")
    results, pack = tmp_path / "results", tmp_path / "pack"
    proc = _run_sh({"DRY_RUN": "1", "SITE": str(tmp_path / "site"), "RESULTS": str(results), "PACK_DIR": str(pack)},
                   timeout=1700)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "all steps finished" in out
    info = json.loads((results / "versions.json").read_text())
    assert info["packages"]["diffusers"]["file"].startswith(str(tmp_path / "site"))
    if (GPU / "image-twin" / "site").is_dir():
        assert info["packages"]["torch"]["version"].startswith("2.11.0"), info["packages"]["torch"]
        assert info["packages"]["transformers"]["version"] == "5.17.0"
    for name in ("sd15_speed", "flux_clear_speed", "train_throughput", "clear_attention_quick"):
        data = json.loads((results / f"{name}.json").read_text())
        assert data["rows"] and not data.get("errors"), name
    train = json.loads((results / "train_throughput.json").read_text())
    names = [r["variant"] for r in train["rows"]]
    assert names[:8] == ["reference", "cache", "batched_cfg", "fused_adamw", "bf16_teacher", "channels_last", "compile",
                         "bf16_autocast"] and names[8:] in ([], ["optimised"])
    assert train["summary"] and train["skipped"] == []
