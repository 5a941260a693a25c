"""Imported once by `engine.launch`'s server before it forks stage processes: what every stage process would
import again (third-party first, then the layers below the stages). Importing is all it does: no tensor is made,
no thread pool or accelerator started, so a process forked after it computes what a fresh one computes. A module
that fails to import here (an optional one, or a broken install) is left to the stage, which reports it as usual.
"""

import importlib

MODULES = (
    "torch", "safetensors.torch", "transformers", "transformers.modeling_utils", "transformers.generation",
    "transformers.masking_utils", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama", "transformers.tokenization_utils_tokenizers", "hydra", "omegaconf",
    "matplotlib.figure", "matplotlib.backends.backend_agg",
    "rlhf_cli.cli", "rlhf_cli.engine.train", "rlhf_cli.models.loading", "rlhf_cli.models.reward", "rlhf_cli.charts",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - see the docstring
        pass
