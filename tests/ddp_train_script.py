"""Run under `accelerate launch --multi_gpu --num_processes 2 ...` by tests/test_trainer.py.

usage: ddp_train_script.py RECIPE OUT_DIR [key=value ...]

Trains the toy method through fastgen.trainers.engine.run.prepare_run + Trainer.train, then every rank
writes its final weights (OUT_DIR/weights-rank<r>.safetensors) and the dataset indices it saw
(OUT_DIR/seen-rank<r>.json).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_method  # noqa: E402,F401  (registers "toy")
from safetensors.torch import save_file  # noqa: E402

from fastgen.trainers.engine.run import prepare_run  # noqa: E402


def main() -> None:
    recipe, out_dir, *overrides = sys.argv[1:]
    trainer, _ = prepare_run(recipe, overrides)
    summary = trainer.train()
    rank = trainer.rank
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in trainer.method.checkpoint_state_dict().items()}
    save_file(state, os.path.join(out_dir, f"weights-rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"seen-rank{rank}.json"), "w") as fh:
        json.dump({"seen": trainer.method.seen, "world_size": trainer.world_size, "step": summary["step"]}, fh)


if __name__ == "__main__":
    main()
