"""A tiny registered Method (``toy``) for trainer tests.

A small MLP with dropout regresses a fixed random target from a fixed set of inputs; every
training step adds input noise, so the global RNG, the data order and the dropout masks all matter
for exact resume. Options make it misbehave on purpose (NaN losses at chosen steps), slow it down
(``step_sleep``, so a test can kill it between checkpoints), record what it saw, or split it into
two alternating optimizer groups. ``toy-prompts`` is the same model on prompt-only data (no image
data set: ``data.source: prompts``), the shape of a data-free method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastgen.data.sources import build_dataset
from fastgen.trainers.engine.ema import EMA
from fastgen.trainers.engine.optim import OptimizerSpec
from fastgen.trainers.method import Method, StepOutput, register_method


@dataclass
class ToyConfig:
    dim_in: int = 6
    hidden: int = 16
    dim_out: int = 3
    num_items: int = 48
    dropout: float = 0.1
    input_noise: float = 0.05
    data_seed: int = 1234
    #: iterations whose loss is multiplied by NaN
    nan_steps: list[int] = field(default_factory=list)
    #: seconds to sleep in each train_step (lets a test kill the process between checkpoints)
    step_sleep: float = 0.0
    ema_decay: float = 0.9
    #: record weights before each step and the dataset indices seen (in memory)
    record: bool = False
    #: two optimizers: "body" steps every ``body_every``-th iteration only, "head" at every iteration
    two_groups: bool = False
    body_every: int = 2
    image_size: int = 8


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i, "prompt": f"item {i}"}


@register_method
class ToyMethod(Method):
    name = "toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig, **shared):
        super().__init__(config, **shared)
        c = config
        self.body = torch.nn.Sequential(torch.nn.Linear(c.dim_in, c.hidden), torch.nn.Tanh(), torch.nn.Dropout(c.dropout))
        self.head = torch.nn.Linear(c.hidden, c.dim_out)
        self.ema = EMA(self, decay=c.ema_decay)
        g = torch.Generator().manual_seed(c.data_seed)
        self.register_buffer("data_x", torch.randn(c.num_items, c.dim_in, generator=g), persistent=False)
        w = torch.randn(c.dim_in, c.dim_out, generator=g)
        self.register_buffer("data_y", torch.tanh(self.data_x @ w), persistent=False)
        self.weight_history: list[torch.Tensor] = []
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def flat_weights(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone()

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self):
        if self.config.two_groups:
            return {"body": list(self.body.parameters()), "head": list(self.head.parameters())}
        return {"model": list(self.body.parameters()) + list(self.head.parameters())}

    def optimizers_to_step(self, step: int) -> list[str]:
        if self.config.two_groups:
            return ["body", "head"] if step % self.config.body_every == 0 else ["head"]
        return ["model"]

    def train_step(self, batch, step: int) -> StepOutput:
        c = self.config
        if c.record:
            self.weight_history.append(self.flat_weights())
            self.seen.append([int(i) for i in batch["index"]])
        if c.step_sleep:
            time.sleep(c.step_sleep)
        x = batch["x"] + c.input_noise * torch.randn_like(batch["x"])
        loss = torch.nn.functional.mse_loss(self(x), batch["y"])
        if step in c.nan_steps:
            loss = loss * float("nan")
        if c.two_groups:
            head_loss = loss + 0.01 * self.head.weight.pow(2).sum()
            return StepOutput(losses={"body": loss, "head": head_loss}, logs={"mse": float(loss.detach())})
        return StepOutput(losses={"model": loss}, logs={"mse": float(loss.detach())})

    def after_optimizer_step(self, name: str, step: int) -> None:
        if name in ("model", "head"):
            self.ema.update()

    # ---- data ----------------------------------------------------------------------------------
    def train_dataset(self):
        return ToyDataset(self.data_x.cpu(), self.data_y.cpu())

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_state_dict(self):
        out = {f"body.{k}": v for k, v in self.body.state_dict().items()}
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        out.update(self.ema.state_dict("ema."))
        return out

    def load_checkpoint_state_dict(self, state):
        self.body.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("body.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        self.ema.load_state_dict(state, "ema.")

    # ---- use ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts, num_steps, generator):
        n, s = len(prompts), self.config.image_size
        z = torch.randn(n, self.config.dim_in, generator=generator, device=generator.device)
        out = self(z)[:, :3]
        pattern = torch.randn(n, 1, s, s, generator=generator, device=generator.device)
        return torch.sigmoid(out[:, :, None, None] * pattern * num_steps)

    def evaluation_plan(self):
        return {"world": "toy"}


@torch.no_grad()
def toy_evaluator(method, step: int) -> dict:
    """The tests' evaluator (the trainer takes its evaluator from outside)."""
    return {"eval_mse": float(torch.nn.functional.mse_loss(method(method.data_x), method.data_y))}


def prompt_features(prompts: list[str], dim: int) -> torch.Tensor:
    """A fixed featurisation of prompt text: letter counts folded into ``dim`` bins, normalised."""
    out = torch.zeros(len(prompts), dim)
    for i, p in enumerate(prompts):
        for ch in p:
            out[i, ord(ch) % dim] += 1.0
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-6)


@register_method
class ToyPromptMethod(ToyMethod):
    """The toy model trained on prompts only: input = features of the prompt text, target = a fixed map of it."""

    name = "toy-prompts"
    config_class = ToyConfig
    default_data_source = "prompts"

    def __init__(self, config: ToyConfig, **shared):
        super().__init__(config, **shared)
        g = torch.Generator().manual_seed(config.data_seed + 1)
        self.register_buffer("target_map", torch.randn(config.dim_in, config.dim_out, generator=g), persistent=False)

    def train_dataset(self):
        return build_dataset(self.data_config, resolution=0, accepts=("prompts",))

    def train_step(self, batch, step: int) -> StepOutput:
        c = self.config
        prompts = list(batch["caption"])
        if c.record:
            self.weight_history.append(self.flat_weights())
            self.seen.append([int(i) for i in batch["index"]])
        x = prompt_features(prompts, c.dim_in).to(self.target_map.device)
        y = torch.tanh(x @ self.target_map)
        x = x + c.input_noise * torch.randn_like(x)
        loss = torch.nn.functional.mse_loss(self(x), y)
        return StepOutput(losses={"model": loss}, logs={"mse": float(loss.detach())})
