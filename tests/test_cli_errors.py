"""Every ``fastgen`` subcommand fails the same way: one line ``error: ...`` on stderr, exit code 2, no traceback.

Each case runs the command line in a subprocess (as a user would) with a bad argument that is refused
before any model loads; ``--debug`` / ``FASTGEN_DEBUG=1`` bring the traceback back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red handwritten digit seven"


def run_fastgen(cwd: Path, *args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTGEN_DEBUG", None)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if debug_env:
        env["FASTGEN_DEBUG"] = "1"
    cmd = [sys.executable, "-c", "from fastgen.cli import main; raise SystemExit(main())", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (after checking exit code 2 and no traceback)."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working folder with a suite YAML that does not parse and an LCM export's config files (no weights:
    the refused sampling arguments are checked before anything loads)."""
    (tmp_path / "broken-suite.yaml").write_text("name: x\npipelines:\n\t- label: a\n  folder: digits-sd\n")
    (tmp_path / "broken-recipe.yaml").write_text("method: lcd\ntrain: {max_steps: 2\nlcd:\n  w_max: [\n")
    lcm = tmp_path / "lcm-export"
    (lcm / "scheduler").mkdir(parents=True)
    (lcm / "vae").mkdir()
    (lcm / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "scheduler": ["diffusers", "LCMScheduler"]}))
    (lcm / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "LCMScheduler", "num_train_timesteps": 1000, "original_inference_steps": 50}))
    (lcm / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32, 64, 64, 64]}))
    (lcm / "fastgen_export.json").write_text(json.dumps({"method": "lcd", "resolution": 64, "guidance_scale": 1.0}))
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    return tmp_path


# (subcommand, arguments, text the message must contain)
CASES = [
    ("no-subcommand", [], "required: {zoo,train,export,sample,demo,lrm,bench}"),
    ("unknown-subcommand", ["trian"], "invalid choice: 'trian'"),
    ("train", ["lcdd"], "did you mean 'lcd'?"),
    ("train", [], "fastgen train needs a method"),
    ("train", ["lcd", "--config", "missing-recipe.yaml"], "missing-recipe.yaml"),
    ("train", ["lcd", "--config", "broken-recipe.yaml"], "not valid YAML"),
    ("train", ["lcd-digits", "lcd.w_maxx=3", "output_dir=run"], "did you mean 'lcd.w_max'?"),
    ("export", ["missing-run", "out"], "missing-run"),
    ("export", ["missing-run"], "required: out_dir"),
    ("sample", ["missing-export", "--prompt", PROMPT], "'missing-export' does not exist"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--steps", "0"], "--steps must be at least 1, got 0"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--steps", "-3"], "--steps must be at least 1, got -3"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--steps", "100"], "1 to 50 steps"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--num-images", "0"], "--num-images"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--height", "15"], "multiples of 8"),
    ("sample", ["lcm-export", "--prompt", PROMPT, "--steps", "four"], "invalid int value: 'four'"),
    ("bench quality", ["broken-suite.yaml"], "not valid YAML"),
    ("bench quality", ["missing-suite.yaml"], "missing-suite"),
    ("bench quality", ["--pipeline", "a=digits-sd", "--metrics", "fidd"], "unknown metric 'fidd'; did you mean 'fid'?"),
    ("bench quality", ["--pipeline", "a=digits-sd", "--samples", "0"], "--samples: must be at least 1, got 0"),
    ("bench quality", ["--pipeline", "a=digits-sd:steps=x"], "steps='x'"),
    ("bench speed", ["--pipeline", "a=digits-sd", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
    ("bench speed", ["broken-suite.yaml"], "not valid YAML"),
    ("bench run", ["--pipeline", "a=digits-sd", "--samples", "0"], "--samples: must be at least 1"),
    ("bench run", [], "give a suite YAML"),
    ("bench score", ["--images", "missing-images", "--prompts", "prompts.txt", "--metrics", "bogus"], "unknown metric 'bogus'"),
    ("bench score", ["--images", "missing-images", "--prompts", "prompts.txt"], "missing-images"),
    ("bench hps", ["--images-root", "missing", "--prompts-dir", "missing", "--hps-checkpoint", "missing.pt"], "missing"),
    ("bench hps", ["--images-root", "x", "--prompts-dir", "x", "--per-style", "0"], "--per-style: must be at least 1"),
    ("demo", ["--root", "missing-zoo", "--out", "demo"], "missing-zoo"),
    ("demo", ["--samples", "0"], "--samples: must be at least 1"),
    ("zoo build", ["--config", "missing-build.yaml"], "missing-build.yaml"),
    ("zoo check", ["--root", "missing-zoo"], "missing-zoo"),
    ("zoo check", ["--samples", "0"], "--samples: must be at least 1"),
    ("zoo where", ["--root", "missing-zoo"], "missing-zoo"),
    ("zoo", [], "required: {build,check,where}"),
    ("lrm pretrain", ["--config", "missing-lrm.yaml"], "missing-lrm.yaml"),
    ("lrm pretrain", ["--bogus"], "fastgen lrm pretrain: unrecognized arguments: --bogus"),
    ("lrm", [], "required: {pretrain}"),
]


@pytest.mark.parametrize("command,args,expected", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_every_subcommand_refuses_bad_arguments_in_one_line(workdir, command, args, expected):
    words = command.split() if command not in ("no-subcommand", "unknown-subcommand") else []
    line = one_error_line(run_fastgen(workdir, *words, *args))
    assert expected in line, line


def test_every_subcommand_of_the_parser_has_a_case():
    from fastgen.cli import build_parser

    def leaves(parser, prefix=()):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            yield " ".join(prefix)
            return
        for name, child in subs[0].choices.items():
            yield from leaves(child, (*prefix, name))

    covered = {c[0] for c in CASES}
    assert set(leaves(build_parser())) <= covered


def test_debug_flag_and_env_show_the_traceback(workdir):
    for args, env in ((["--debug", "train", "lcdd"], False), (["train", "lcdd", "--debug"], False), (["train", "lcdd"], True)):
        r = run_fastgen(workdir, *args, debug_env=env)
        assert r.returncode != 0 and "Traceback" in r.stderr, (args, r.stderr[-2000:])
        assert "ConfigError: unknown method 'lcdd'; did you mean 'lcd'?" in r.stderr


# ---------------------------------------------------------------------------------------------- in process


def test_get_method_lists_the_builtin_methods():
    from fastgen.errors import ConfigError
    from fastgen.trainers.method import BUILTIN_METHODS, get_method

    with pytest.raises(ConfigError, match=r"unknown method 'lcdd'; did you mean 'lcd'\? available methods: .*clear.*lcd.*rg-lcd"):
        get_method("lcdd")
    with pytest.raises(ConfigError, match=r"unknown method 'zzz'; available methods: "):
        get_method("zzz")
    assert {get_method(name).name for name in BUILTIN_METHODS} == set(BUILTIN_METHODS)


def test_interrupt_is_one_line_with_exit_130(monkeypatch, capsys):
    import fastgen.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    def main(*argv: str) -> int:
        try:
            return cli.main(list(argv))
        except KeyboardInterrupt:  # would stop the whole test session
            pytest.fail("KeyboardInterrupt escaped fastgen.cli.main")

    monkeypatch.setattr(cli, "_zoo_where", interrupted)
    assert main("zoo", "where") == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: interrupted"]
    monkeypatch.setattr(cli, "_train", interrupted)
    assert main("train", "lcd") == 130
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "permission", "folder", "not-folder", "yaml", "safetensors", "value", "module"])
def test_failure_classes_become_one_line(kind, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    import yaml

    import fastgen.cli as cli

    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\x00" * 16)
    raisers = {
        "missing": lambda: open(tmp_path / "nowhere" / "file.txt"),
        "permission": lambda: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(tmp_path / "locked"))),
        "folder": lambda: (_ for _ in ()).throw(IsADirectoryError(21, "Is a directory", str(tmp_path))),
        "not-folder": lambda: (_ for _ in ()).throw(NotADirectoryError(20, "Not a directory", str(bad / "x"))),
        "yaml": lambda: yaml.safe_load("a: [1,\nb: 2\n\t"),
        "safetensors": lambda: safetensors.torch.load_file(str(bad)),
        "value": lambda: int("four"),
        "module": lambda: __import__("fastgen_package_that_is_not_installed"),
    }
    expected = {"missing": "nowhere", "permission": "locked", "folder": str(tmp_path), "not-folder": "weights.safetensors",
                "yaml": "not valid YAML", "safetensors": "safetensors", "value": "four",
                "module": "fastgen_package_that_is_not_installed"}

    def fail(args):
        raisers[kind]()

    monkeypatch.setattr(cli, "_zoo_where", fail)
    monkeypatch.delenv("FASTGEN_DEBUG", raising=False)
    assert cli.main(["zoo", "where"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected[kind] in lines[0], lines


def test_unexpected_failures_keep_their_traceback(monkeypatch):
    import fastgen.cli as cli

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_zoo_where", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["zoo", "where"])


def test_check_sampling_args_reads_the_export_before_loading(tmp_path):
    from fastgen.errors import ConfigError, ResolutionError
    from fastgen.pipelines.sampling import check_sampling_args, sampling_limits

    flux = tmp_path / "flux"
    for sub in ("scheduler", "vae", "transformer"):
        (flux / sub).mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (flux / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    (flux / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    limits = sampling_limits(flux)
    assert limits.max_steps is None and limits.size_multiple == 4
    check_sampling_args(flux, 200, height=32, width=36)
    with pytest.raises(ResolutionError, match=r"--width 30 .*multiples of 4 \(the VAE factor 2 .* x 2 for Flux.*nearest valid: 28 or 32"):
        check_sampling_args(flux, 4, height=32, width=30)
    with pytest.raises(ConfigError, match="--steps must be at least 1"):
        check_sampling_args(flux, 0)
    assert sampling_limits(tmp_path / "not-an-export").max_steps is None


def test_train_parses_allowed_config_changes():
    """`fastgen train ... --resume latest --allow-config-change KEY ...`: keys reach train(), key=value stay overrides."""
    from fastgen.cli import build_parser
    from fastgen.workflows.train import split_allowed_changes

    args, extra = build_parser().parse_known_args(
        ["train", "lcd-digits", "train.max_steps=10", "--resume", "latest", "--allow-config-change", "lcd.w_max", "train.learning_rate"]
    )
    assert extra == []
    overrides, allowed = split_allowed_changes(args)
    assert allowed == ["lcd.w_max", "train.learning_rate"] and overrides == ["train.max_steps=10"] and args.resume == "latest"
