"""Run under `accelerate launch --multi_gpu --num_processes 2 ...` by tests/test_lcd_e2e.py.

usage: lcd_ddp_script.py OUT_DIR RECIPE [key=value ...]

Builds the LCD run exactly as ``fastgen train`` does (``fastgen.trainers.engine.run.prepare_run``: config,
run folder, method seeded with train.seed, Trainer with the parameter broadcast from rank 0), then
every rank writes the method's checkpoint state (student + EMA target) before and after training:
OUT_DIR/initial-rank<r>.safetensors and OUT_DIR/rank<r>.safetensors, plus OUT_DIR/info-rank<r>.json.
(``fastgen.workflows.train.main`` returns only an exit code, and only rank 0 writes checkpoints, so the
trainer object is needed to read every rank's own weights.)
"""

import json
import os
import sys

from safetensors.torch import save_file

from fastgen.trainers.engine.run import prepare_run


def _state(trainer) -> dict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in trainer.method.checkpoint_state_dict().items()}


def main() -> None:
    out_dir, recipe, *overrides = sys.argv[1:]
    trainer, _ = prepare_run(recipe, overrides)
    rank = trainer.rank
    os.makedirs(out_dir, exist_ok=True)
    save_file(_state(trainer), os.path.join(out_dir, f"initial-rank{rank}.safetensors"))
    summary = trainer.train()
    save_file(_state(trainer), os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"info-rank{rank}.json"), "w") as fh:
        json.dump({"world_size": trainer.world_size, "rank": rank, "step": summary["step"],
                   "data_position": trainer.data_position}, fh)


if __name__ == "__main__":
    main()
