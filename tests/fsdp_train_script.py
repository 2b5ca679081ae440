"""Run under ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ...`` by tests/test_fsdp.py.

usage: fsdp_train_script.py PLAN.json

PLAN.json is a list of runs, trained one after another in the same 2 processes (one process start-up for
all of them): ``{"name", "recipe", "overrides": [...], "resume": null | path, "allow": [keys], "fsdp": bool,
"out": dir}`` (``allow``: configuration changes accepted at the resume).
``fsdp: false`` clears ``ACCELERATE_USE_FSDP`` for that run, which then takes the trainer's DDP path (its
own broadcast + gradient all-reduce) — the reference the FSDP runs are compared with.

Per run, OUT/<name>/ gets ``losses-rank<r>.json`` (every iteration's ``loss/*`` and ``grad_norm/*``),
``weights-rank<r>.safetensors`` (the method's full checkpoint state; gathered from the shards under FSDP)
and ``info-rank<r>.json`` (sharded or not, the sharding plan, the parameter / EMA shadow types).

Also defines ``toy-gan``: two networks with two losses stepping in the same iteration (a generator
whose loss reaches the discriminator, a discriminator on detached samples), a frozen target copy of the
generator updated with ``ema_update_`` and used in the generator loss, and an ``EMA`` of the generator.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import toy_method  # noqa: E402,F401  (registers "toy")
from fastgen.trainers.engine.ema import EMA, ema_update_  # noqa: E402
from fastgen.trainers.method import Method, StepOutput, register_method  # noqa: E402
from toy_method import ToyDataset  # noqa: E402


@dataclass
class ToyGanConfig:
    dim_in: int = 6
    hidden: int = 16
    dim_out: int = 3
    num_items: int = 48
    input_noise: float = 0.05
    data_seed: int = 1234
    target_decay: float = 0.9
    ema_decay: float = 0.8
    adv_weight: float = 0.1
    #: the discriminator steps every ``disc_every``-th iteration (both groups step together then)
    disc_every: int = 1
    image_size: int = 8


@register_method
class ToyGan(Method):
    name = "toy-gan"
    config_class = ToyGanConfig

    def __init__(self, config: ToyGanConfig, **shared):
        super().__init__(config, **shared)
        c = config
        self.gen = torch.nn.Sequential(torch.nn.Linear(c.dim_in, c.hidden), torch.nn.Tanh(), torch.nn.Linear(c.hidden, c.dim_out))
        self.disc = torch.nn.Sequential(torch.nn.Linear(c.dim_out, c.hidden), torch.nn.Tanh(), torch.nn.Linear(c.hidden, 1))
        self.target = copy.deepcopy(self.gen).requires_grad_(False)
        self.ema = EMA(self.gen, decay=c.ema_decay)
        g = torch.Generator().manual_seed(c.data_seed)
        self.register_buffer("data_x", torch.randn(c.num_items, c.dim_in, generator=g), persistent=False)
        w = torch.randn(c.dim_in, c.dim_out, generator=g)
        self.register_buffer("data_y", torch.tanh(self.data_x @ w), persistent=False)

    def parameter_groups(self):
        return {"gen": list(self.gen.parameters()), "disc": list(self.disc.parameters())}

    def optimizers_to_step(self, step: int) -> list[str]:
        return ["gen", "disc"] if step % self.config.disc_every == 0 else ["gen"]

    def train_step(self, batch, step: int) -> StepOutput:
        c = self.config
        x = batch["x"] + c.input_noise * torch.randn_like(batch["x"])
        fake = self.gen(x)
        with torch.no_grad():
            anchor = self.target(x)
        mse = torch.nn.functional.mse_loss(fake, batch["y"])
        gen_loss = mse + 0.1 * torch.nn.functional.mse_loss(fake, anchor) + c.adv_weight * torch.nn.functional.softplus(-self.disc(fake)).mean()
        disc_loss = torch.nn.functional.softplus(self.disc(fake.detach())).mean() + torch.nn.functional.softplus(-self.disc(batch["y"])).mean()
        return StepOutput(losses={"gen": gen_loss, "disc": disc_loss}, logs={"mse": float(mse.detach())})

    def after_optimizer_step(self, name: str, step: int) -> None:
        if name == "gen":
            ema_update_(self.target.parameters(), self.gen.parameters(), self.config.target_decay)
            self.ema.update()

    def train_dataset(self):
        return ToyDataset(self.data_x.cpu(), self.data_y.cpu())

    def checkpoint_state_dict(self):
        out = {f"gen.{k}": v for k, v in self.gen.state_dict().items()}
        out.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
        out.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        out.update(self.ema.state_dict("ema."))
        return out

    def load_checkpoint_state_dict(self, state):
        for name in ("gen", "disc", "target"):
            getattr(self, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        self.ema.load_state_dict(state, "ema.")

    @torch.no_grad()
    def sample(self, prompts, num_steps, generator):
        n, s = len(prompts), self.config.image_size
        z = torch.randn(n, self.config.dim_in, generator=generator, device=generator.device)
        out = self.target(z)[:, :3]
        return torch.sigmoid(out[:, :, None, None] * torch.ones(1, 1, s, s, device=out.device))

    def evaluation_plan(self):
        return None


def run_one(spec: dict) -> None:
    from safetensors.torch import save_file

    from fastgen.trainers.engine import sharding
    from fastgen.trainers.engine.run import prepare_run

    if spec.get("fsdp", True):
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    trainer, _ = prepare_run(spec["recipe"], spec.get("overrides", []), spec.get("resume"),
                             allow_config_change=spec.get("allow", []))
    rows: list[dict] = []
    inner = trainer._iteration

    def recording(data_iter):
        info = inner(data_iter)
        rows.append({k: v for k, v in info.items() if k.startswith(("loss/", "grad_norm/"))})
        return info

    trainer._iteration = recording
    summary = trainer.train(resume=spec.get("resume"))
    rank = trainer.rank
    out = os.path.join(spec["out"], spec["name"])
    os.makedirs(out, exist_ok=True)
    state = trainer.method.checkpoint_state_dict()
    types = sorted({type(v).__name__ for v in state.values()})
    state = sharding.full_state_dict(state)  # every rank takes part (a no-op without DTensors)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, os.path.join(out, f"weights-rank{rank}.safetensors"))
    params = {n: type(p).__name__ for n, p in trainer.method.named_parameters()}
    info = {
        "rank": rank, "world_size": trainer.world_size, "step": summary["step"],
        "sharded": trainer.sharding is not None,
        "plan": trainer.sharding.describe() if trainer.sharding is not None else "",
        "param_types": params, "state_types": types,
        "fsdp_classes": sorted({type(m).__name__ for m in trainer.method.modules() if type(m).__name__.startswith("FSDP")}),
    }
    with open(os.path.join(out, f"losses-rank{rank}.json"), "w") as fh:
        json.dump(rows, fh)
    with open(os.path.join(out, f"info-rank{rank}.json"), "w") as fh:
        json.dump(info, fh)
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    with open(sys.argv[1]) as fh:
        plan = json.load(fh)
    for spec in plan:
        run_one(spec)


if __name__ == "__main__":
    main()
