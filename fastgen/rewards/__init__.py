"""fastgen.rewards: differentiable reward models (images in [0,1] + prompts -> reward per image)."""

from fastgen.rewards.base import (
    REWARDS,
    DigitsReward,
    RewardModel,
    WeightedReward,
    load_reward,
    parse_digits_prompt,
    register_reward,
)
from fastgen.rewards import experts as _experts  # noqa: F401,E402 - registers hpsv2, pickscore, clip
from fastgen.rewards import imagereward as _imagereward  # noqa: F401,E402 - registers imagereward

__all__ = ["REWARDS", "DigitsReward", "RewardModel", "WeightedReward", "load_reward", "parse_digits_prompt", "register_reward"]
