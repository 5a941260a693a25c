"""rlhf_cli: train language models with RLHF (SFT -> reward model -> PPO) from the command line."""

__version__ = "0.1.0"
