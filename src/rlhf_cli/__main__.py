"""`python -m rlhf_cli <stage> ...` (also what torchrun launches: `torchrun ... -m rlhf_cli sft ...`)."""

from rlhf_cli.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
