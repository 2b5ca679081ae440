"""Recipe smoke matrix: every shipped recipe (``fastgen/recipes/*.yaml``) trains for 3 steps with its own
method, exports, and the export loads and samples with stock ``diffusers.DiffusionPipeline.from_pretrained``
in a fresh process.

The recipes for released teachers (SD1.5, SD2.1-v, SDXL, FLUX.1-dev) run on stand-ins from
``tests/tiny_models.py`` that keep the released layout (block types and order, attention layout, prediction
type, scheduler config, text encoders, added conditioning, guidance embedding) at a few tens of thousands
of parameters; the digits recipes run on the shipped digits teachers as written. Each recipe's own data source
kind is kept and pointed at a tiny instance built here (webdataset shards, a prompt file, teacher samples);
every other key stays as the recipe writes it, except:

* :data:`COMMON`: 3 steps, batch 2, no sample grids, evaluation, trackers or progress bars;
* the stand-in's resolution (16 px) and the paths of teacher, data and run;
* the few per-recipe overrides in :data:`CASES`, each with its reason (a schedule fitted into 3 steps, a
  CPU-only limitation).

Parametrised from the directory listing: a new recipe gets a case by existing, and fails loudly until
:data:`CASES` says which stand-in it runs on. Loading in a fresh process: one loader process imports torch
and diffusers once (never fastgen), then forks a child per export, which imports fastgen only when the
export's ``model_index.json`` names a fastgen class (and must not import it otherwise).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import (
    TOKENIZER_CORPUS,
    make_tiny_flux_dev,
    make_tiny_sd15,
    make_tiny_sd21_v,
    make_tiny_sdxl,
    pattern_card,
    tiny_open_clip_configs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = ROOT / "fastgen" / "recipes"
RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
SHIPPED = ("digits-sd", "digits-flux")
STANDIN_PX = 16  # the stand-ins' VAE factor is 2 and their UNets downsample once: 16 px -> 8x8 latents
TINY_HPS = "fastgen-smoke-tiny-hps"

#: every run: 3 steps of batch 2, nothing but training (the final checkpoint is always written)
COMMON = (
    "train.max_steps=3",
    "train.batch_size=2",
    "train.sample_every=0",
    "train.eval_every=0",
    "train.log_with=none",
    "train.progress=false",
    "sample.eval_samples=0",
)

#: long captions: the data of the released-teacher recipes has captions that fill CLIP's 77 tokens
CAPTIONS = (*TOKENIZER_CORPUS, " ".join(TOKENIZER_CORPUS) + ", " + " ".join(TOKENIZER_CORPUS))


@dataclass(frozen=True)
class Case:
    """How a recipe runs here.

    Attributes:
        teacher: a key of :data:`STANDINS` (a stand-in of the released teacher the recipe names), or
            ``"shipped"`` (the recipe's own digits-world alias, as written).
        overrides: recipe-specific ``key=value`` overrides beyond :data:`COMMON`, data and paths; each needs a
            reason in the comment beside it.
        lrm: ``"cli"``: the recipe reads a pre-trained latent reward model for the stand-in, built with
            ``fastgen lrm pretrain --teacher <stand-in> --data <captioned folder>``; ``"digits"``: pre-trained by
            the run itself (``lrm_pretrain_if_missing``), shortened.
        hps: the recipe's expert is HPSv2.1; a tiny random open_clip checkpoint stands in for it.
        resolution: the stand-in's training resolution (a stand-in only).
    """

    teacher: str
    overrides: tuple[str, ...] = ()
    lrm: str | None = None
    hps: bool = False
    resolution: int = STANDIN_PX


#: disback in 3 iterations: 1 stage-1 iteration (one path node), then 2 generator updates (1 on the node, 1 on the teacher)
DISBACK_FIT = ("disback.path_nodes=1", "disback.degradation_steps=1", "disback.interval=1")

#: recipe -> how it runs. Must cover the listing (test_every_recipe_has_a_case).
CASES: dict[str, Case] = {
    "boot-digits": Case("shipped"),
    "boot-sd15": Case("sd15"),
    "clear-digits": Case("shipped"),
    "clear-digits-r1": Case("shipped"),
    # FlexAttention has no backward on CPU: train with the dense reference backend (same mask). 128 px: a 32x32
    # token grid, so that the recipe's radius 16 is a local window (it must not exceed the grid)
    "clear-flux-dev": Case("flux-dev", ("clear.backend=reference",), resolution=128),
    "disback-digits": Case("shipped", DISBACK_FIT),
    # the generator steps every 5th iteration in the recipe: 1:1 so that it steps within 3 iterations
    "disback-sdxl": Case("sdxl", (*DISBACK_FIT, "disback.fake_updates_per_generator_update=1")),
    "dmd-digits": Case("shipped"),
    "lcd-digits": Case("shipped"),
    "lcd-flux-dev": Case("flux-dev"),
    "lcd-flux-digits": Case("shipped"),
    "lcd-lora-digits": Case("shipped"),
    "lcd-lora-sdxl": Case("sdxl"),
    "lcd-sd15": Case("sd15"),
    "lcd-sd21-v": Case("sd21-v"),
    "rg-lcd-digits-direct": Case("shipped"),
    "rg-lcd-digits-lrm": Case("shipped", lrm="digits"),
    "rg-lcd-sd21-hps": Case("sd21-v", lrm="cli", hps=True),
    # the adversarial term starts at step 100 in the recipe: from step 1, so that the discriminator trains
    "scott-digits": Case("shipped", ("scott.adv_start_step=1",)),
    "scott-sd15": Case("sd15"),
}

#: stand-in name -> (builder, the teacher.path values of recipes it stands in for)
STANDINS = {
    "sd15": (make_tiny_sd15, ("models/stable-diffusion-v1-5",)),
    "sd21-v": (make_tiny_sd21_v, ("models/stable-diffusion-2-1",)),
    "sdxl": (make_tiny_sdxl, ("models/stable-diffusion-xl-base-1.0",)),
    "flux-dev": (make_tiny_flux_dev, ("models/FLUX.1-dev",)),
}


def read_recipe(name: str) -> dict:
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- fixtures: stand-ins, data, loader


class StandIns:
    """Stand-in teacher folders, built once per session on first use."""

    def __init__(self, root: Path):
        self.root, self.folders = root, {}

    def __call__(self, name: str) -> Path:
        if name not in self.folders:
            self.folders[name] = STANDINS[name][0](self.root / name)
        return self.folders[name]


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("standins"))


class SmokeData:
    """Tiny data sources of each kind, built once per session on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._shards: str | None = None
        self._folder: Path | None = None
        self._prompts: Path | None = None

    def shards(self) -> str:
        """Two webdataset shards of 3 captioned 16 px images, as a brace pattern (the recipes' form)."""
        if self._shards is None:
            from fastgen.data.shards import write_shards

            out = self.root / "shards"
            items = [(pattern_card(STANDIN_PX, STANDIN_PX, checker=2 + i), CAPTIONS[i % len(CAPTIONS)]) for i in range(6)]
            paths = write_shards(items, out, per_shard=3, prefix="data")
            assert len(paths) == 2
            self._shards = str(out / "data-{000000..000001}.tar")
        return self._shards

    def folder(self) -> Path:
        """An image-caption folder (``img.png`` + ``img.txt``) with full-length captions."""
        if self._folder is None:
            out = self.root / "folder"
            out.mkdir()
            for i, caption in enumerate(CAPTIONS):
                pattern_card(STANDIN_PX, STANDIN_PX, checker=2 + i).save(out / f"{i:03d}.png")
                (out / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
            self._folder = out
        return self._folder

    def prompts(self) -> Path:
        if self._prompts is None:
            self._prompts = self.root / "prompts.txt"
            self._prompts.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
        return self._prompts


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> SmokeData:
    return SmokeData(tmp_path_factory.mktemp("smoke-data"))


# The loader: imports torch and stock diffusers once, then forks one child per request, so every export is
# loaded by a process that never trained, never imported fastgen unless the export names a fastgen class,
# and pays no import time. Requests and answers are JSON lines; a child writes its result to a file.
LOADER = r'''
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import diffusers
from diffusers import DiffusionPipeline, LCMScheduler
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline  # warm the lazy imports

def names_fastgen(folder):
    index = json.load(open(os.path.join(folder, "model_index.json")))
    return any(isinstance(v, list) and v and v[0] == "fastgen" for v in index.values())

def load_and_sample(req):
    folder = req["folder"]
    info = json.load(open(os.path.join(folder, "fastgen_export.json")))
    ours = False
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        ours = names_fastgen(folder)
        if ours:
            import fastgen  # noqa: F401  (registers the export's own classes)
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        kind = "pipeline"
    else:  # LoRA export: stock base pipeline + LCMScheduler + load_lora_weights
        base = info["base_model_path"]
        pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
        own = os.path.join(folder, "scheduler_config.json")
        pipe.scheduler = LCMScheduler.from_config(json.load(open(own)) if os.path.isfile(own) else pipe.scheduler.config)
        pipe.load_lora_weights(folder)
        kind = "lora"
    pipe.set_progress_bar_config(disable=True)
    size = int(info.get("resolution") or req["size"])
    kwargs = dict(num_inference_steps=req["steps"], height=size, width=size, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    if info.get("guidance_scale") is not None:
        kwargs["guidance_scale"] = float(info["guidance_scale"])
    if info.get("max_sequence_length"):
        kwargs["max_sequence_length"] = int(info["max_sequence_length"])
    if float(info.get("true_cfg_scale") or 1.0) > 1.0:
        kwargs["true_cfg_scale"] = float(info["true_cfg_scale"])
        kwargs["negative_prompt"] = [info.get("negative_prompt") or ""]
    torch.manual_seed(0)  # FlowMatchLCMScheduler re-noises from the global generator
    images = pipe([req["prompt"]], **kwargs).images
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return {"kind": kind, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "network": type(net).__name__, "shape": list(images.shape), "finite": bool(torch.isfinite(images).all()),
            "std": float(images.float().std()), "names_fastgen": ours,
            "fastgen_imported": any(m == "fastgen" or m.startswith("fastgen.") for m in sys.modules)}

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(req["result"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            result = load_and_sample(req)
        except BaseException:
            result = {"error": traceback.format_exc()}
        with open(req["result"], "w") as fh:
            json.dump(result, fh)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    print(json.dumps({"done": req["result"]}), flush=True)
'''


class Loader:
    """The fresh-process loader (see :data:`LOADER`); started when the session first needs it, so that
    its imports overlap with the first training run."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, "-c", LOADER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=str(ROOT), env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = False
        self.output: list[str] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _answer(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the loader process gave no answer in {timeout:.0f} s; its output:\n" + "".join(self.output[-50:]))
            if not line:
                raise AssertionError(f"the loader process exited ({self.proc.poll()}); its output:\n" + "".join(self.output[-50:]))
            try:
                msg = json.loads(line)
            except ValueError:
                self.output.append(line)
                continue
            if isinstance(msg, dict):
                return msg
            self.output.append(line)

    def wait_ready(self, timeout: float = 120) -> None:
        if not self.ready:
            assert self._answer(timeout).get("ready"), "the loader process did not start"
            self.ready = True

    def load_and_sample(self, folder: Path, steps: int, size: int, work: Path, timeout: float = 120) -> dict:
        self.wait_ready(timeout)
        result = work / "loaded.json"
        request = {"folder": str(folder), "steps": steps, "size": size, "prompt": CAPTIONS[1], "result": str(result)}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        assert self._answer(timeout).get("done") == str(result)
        log = Path(str(result) + ".log")
        if not result.is_file():
            raise AssertionError(f"the loader's child wrote no result for {folder}; its output:\n{log.read_text()[-4000:] if log.is_file() else ''}")
        out = json.loads(result.read_text())
        if "error" in out:
            raise AssertionError(f"stock DiffusionPipeline.from_pretrained('{folder}') failed in a fresh process:\n{out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:  # idle between requests: nothing to finish
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def loader():
    """The loader process, ready; while it imports, this process imports the training side (both are one-off
    costs of the session, kept out of the first case's duration)."""
    lo = Loader()
    import diffusers  # noqa: F401
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

    import fastgen.cli  # noqa: F401
    import fastgen.workflows.export  # noqa: F401
    import fastgen.workflows.train  # noqa: F401

    lo.wait_ready()
    yield lo
    lo.close()


@pytest.fixture
def fresh_accelerate():
    """Each `fastgen train` is a fresh process; here the runs share accelerate's process-wide state, which refuses
    a second ``Accelerator`` with another mixed precision. Forget it before and after each case (the other test
    modules of the session build their own accelerators)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------- the matrix


def test_every_recipe_has_a_case():
    """A recipe without a case (or a case without its recipe) fails here, naming it."""
    missing = [r for r in RECIPES if r not in CASES]
    stale = [c for c in CASES if c not in RECIPES]
    assert not missing, f"recipes without a smoke case: {missing}; add them to CASES in {__file__} (which stand-in they run on)"
    assert not stale, f"smoke cases of recipes that no longer exist: {stale}; remove them from CASES"
    for name, case in CASES.items():
        recipe = read_recipe(name)
        path = (recipe.get("teacher") or {}).get("path")
        if case.teacher == "shipped":
            assert path in SHIPPED, f"{name}: teacher.path {path!r} is not a shipped alias; give the case a stand-in"
        else:
            assert case.teacher in STANDINS, f"{name}: unknown stand-in {case.teacher!r}"
            assert path in STANDINS[case.teacher][1], f"{name}: teacher.path {path!r} is not what stand-in {case.teacher!r} stands in for"


def data_overrides(recipe: dict, smoke_data: SmokeData, tmp_path: Path) -> list[str]:
    """The recipe's own data source kind, pointed at a tiny instance."""
    data = recipe.get("data") or {}
    source = str(data.get("source", "digits"))
    out = [f"data.cache_dir={tmp_path / 'cache'}"]
    if source == "digits":
        return out
    if source in ("prompts", "teacher-samples"):
        if data.get("prompts"):
            out.append(f"data.prompts={smoke_data.prompts()}")
        out.append("data.num_samples=4")
        if source == "teacher-samples":
            out += ["data.teacher_steps=2", "data.teacher_batch_size=4"]
        return out
    if source.endswith(".tar") or "{" in source:
        return [*out, f"data.source={smoke_data.shards()}"]
    return [*out, f"data.source={smoke_data.folder()}"]


def cli(*argv: str) -> None:
    """``fastgen ARGV`` in this process, with tracebacks (``--debug``)."""
    from fastgen.cli import main

    code = main(["--debug", *map(str, argv)])
    assert code == 0, f"fastgen {' '.join(map(str, argv))} exited with {code}"


def pretrain_lrm_for_standin(teacher: Path, smoke_data: SmokeData, out: Path) -> Path:
    """``fastgen lrm pretrain --teacher <stand-in> --data <captioned folder>``: an LRM for the stand-in's latents
    that reads full-length (77-token) captions (the ``tiny`` preset: the architecture kinds of the default, at
    55 k parameters instead of 38 M)."""
    from fastgen.cli import main

    argv = ["lrm", "pretrain", "--teacher", str(teacher), "--data", str(smoke_data.folder()), "--out", str(out),
            "preset=tiny", "steps=2", "batch_size=4", "log_every=1"]
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        try:
            code = main(argv)
        except SystemExit as exc:  # an argparse error outside fastgen's parser class
            code = exc.code
    if code != 0:
        pytest.fail(
            f"`fastgen {' '.join(argv)}` exited with {code}: building a latent reward model for a non-digits teacher "
            f"from a captioned image folder is not available yet (rg-lcd-sd21-hps needs one for SD2.1 latents and "
            f"full-length captions). fastgen said:\n{said.getvalue()[-2000:]}",
            pytrace=False,
        )
    from fastgen.rewards.latent_proxy import LatentRewardModel

    lrm = LatentRewardModel.from_pretrained(out)
    assert tuple(lrm.latent_shape) == (4, STANDIN_PX // 2, STANDIN_PX // 2), lrm.latent_shape
    assert lrm.config.text_max_length >= 77, f"the LRM reads {lrm.config.text_max_length} caption tokens, not CLIP's 77"
    return out


def hps_checkpoint_path(tmp_path: Path) -> Path:
    """A random tiny open_clip model saved as ``HPS_v2.1_compressed.pt`` (architecture :data:`TINY_HPS`)."""
    import open_clip

    from fastgen.evaluation.hps import HPS_VERSIONS

    path = tmp_path / "hps" / HPS_VERSIONS["v2.1"]
    path.parent.mkdir()
    with tiny_open_clip_configs(TINY_HPS, TINY_HPS + "-clip"):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_HPS, pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_smoke(name, standins, smoke_data, loader, fresh_accelerate, tmp_path):
    """``fastgen train <recipe>`` (3 steps on its stand-in) -> ``fastgen export`` -> stock diffusers loads and samples
    the export in a fresh process, as ``fastgen_export.json`` describes it (pipeline and scheduler class, size)."""
    case = CASES.get(name)
    if case is None:
        pytest.fail(f"recipe '{name}' has no smoke case; add it to CASES in {__file__} (which stand-in it runs on)", pytrace=False)
    recipe = read_recipe(name)
    run_dir, out_dir = tmp_path / "run", tmp_path / "export"
    overrides = [*COMMON, f"output_dir={run_dir}", *data_overrides(recipe, smoke_data, tmp_path), *case.overrides]
    if case.teacher != "shipped":
        overrides += [f"teacher.path={standins(case.teacher)}", f"teacher.resolution={case.resolution}"]
    if case.lrm == "digits":
        overrides += [f"rg_lcd.lrm_path={tmp_path / 'lrm'}", "rg_lcd.lrm_pretrain={steps: 2, batch_size: 8, train_sources: 1}"]
    elif case.lrm == "cli":
        lrm = pretrain_lrm_for_standin(standins(case.teacher), smoke_data, tmp_path / "lrm")
        overrides.append(f"rg_lcd.lrm_path={lrm}")
    if case.hps:
        reward = dict(recipe["rg_lcd"]["reward"])
        reward.update(checkpoint=str(hps_checkpoint_path(tmp_path)), model_name=TINY_HPS)
        overrides.append("rg_lcd.reward=" + json.dumps(reward))

    # the stand-in HPS architecture is registered with open_clip for training and export (which rebuilds the method)
    with tiny_open_clip_configs(TINY_HPS, TINY_HPS + "-clip") if case.hps else contextlib.nullcontext():
        cli("train", str(RECIPE_DIR / f"{name}.yaml"), *overrides)
        cli("export", run_dir, out_dir)

    from fastgen.trainers.engine import checkpoint as ckpt

    assert ckpt.find_checkpoint(run_dir, "latest").name == ckpt.checkpoint_name(3)
    info = json.loads((out_dir / "fastgen_export.json").read_text())
    steps = min(2, int(info.get("num_inference_steps") or 1))
    got = loader.load_and_sample(out_dir, steps, STANDIN_PX, tmp_path)
    size = int(info.get("resolution") or STANDIN_PX)
    assert got["shape"] == [1, 3, size, size] and got["finite"] and got["std"] > 0, got
    assert got["pipeline"] == info.get("pipeline_class", info["teacher_pipeline_class"]), (got, info)
    if info.get("scheduler"):
        assert got["scheduler"] == info["scheduler"], (got, info)
    assert got["kind"] == ("lora" if info.get("export") == "lora" else "pipeline"), (got, info)
    assert got["fastgen_imported"] == got["names_fastgen"], f"fastgen imported by a stock load: {got}"
