"""Shared test helpers: tiny Hugging Face models and user reward functions."""

from pathlib import Path

# A file of user reward functions, named as `<path>:<function>` in reward configs.
USER_REWARDS = Path(__file__).with_name("user_rewards.py")
