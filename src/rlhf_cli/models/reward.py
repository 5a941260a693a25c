"""The reward model: a pretrained backbone (`AutoModel`) and a linear head from one pooled hidden state to a scalar.

Pooling picks the hidden state that summarises a sequence: the last real token for causal LMs (the only position
that has attended to the whole text), the first token for encoders with a [CLS] token, or the mean over real
tokens. Dropout is switched off in the backbone: a stochastic reward makes training targets and PPO scores noisy.

On disk (`save_pretrained`) a reward model is a plain Hugging Face backbone directory (config.json,
model.safetensors, tokenizer files) plus `reward_head.safetensors` and `reward_config.json` (pooling, pad id,
encoder or not, score statistics on held-out data), so `RewardModel.from_pretrained(dir)` gives back the same
scores and the backbone alone still loads with `AutoModel.from_pretrained(dir)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models.loading import no_dropout
from rlhf_cli.rl.masks import position_ids_from_mask
from rlhf_cli.rl.reward import pool

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
# Model types that are bidirectional encoders: they see the whole text at every position.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                 "camembert", "mpnet", "modernbert", "mobilebert", "ernie", "longformer", "big_bird"}


def auto_pooling(model_type: str, tokenizer) -> str:
    if model_type not in ENCODER_TYPES:
        return "last"
    return "first" if getattr(tokenizer, "cls_token", None) is not None else "mean"


class RewardModel(torch.nn.Module):
    """score(x) = w · pool(backbone(x)) + b, one scalar per sequence."""

    def __init__(self, backbone, pooling: str, pad_token_id: int, is_encoder: bool, score_stats: dict | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.head.bias)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.is_encoder = is_encoder
        self.score_stats = score_stats or {}

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """One score per sequence [B] read at the pooled position, or (per_token=True, PPO's value model on a causal
        backbone) the head applied at every position [B, L]."""
        kwargs = {}
        if not self.is_encoder:  # padded and unpadded sequences get the same positions
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if per_token:
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    @classmethod
    def from_backbone(cls, path: str, tokenizer, *, pooling: str = "auto", revision: str | None = None,
                      trust_remote_code: bool = False) -> "RewardModel":
        """A new reward model: pretrained backbone from `path` (a causal LM's body is taken without its LM head),
        freshly initialised head."""
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
            no_dropout(config)
            backbone = AutoModel.from_pretrained(path, config=config, revision=revision, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"could not load a reward-model backbone from '{path}': {first}",
                              hint="model.name_or_path must be a local Hugging Face model directory, a run "
                                   "directory with a finished artifact, or a reachable hub id") from exc
        if pooling == "auto":
            pooling = auto_pooling(config.model_type, tokenizer)
        if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
            backbone.resize_token_embeddings(len(tokenizer))  # a pad token was added
        return cls(backbone, pooling, tokenizer.pad_token_id, config.model_type in ENCODER_TYPES)

    def save_pretrained(self, directory: Path, tokenizer=None) -> None:
        directory = Path(directory)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(directory / HEAD_FILE))
        meta = {"pooling": self.pooling, "pad_token_id": self.pad_token_id, "is_encoder": self.is_encoder,
                "hidden_size": self.backbone.config.hidden_size, "score_stats": self.score_stats}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory, trust_remote_code: bool = False) -> "RewardModel":
        """Load a saved reward model (the `model/` of a reward artifact)."""
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ArtifactError(f"{directory} is not a reward model (no {CONFIG_FILE})",
                                hint="point at the model/ directory of a finished `rlhf reward` run")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        no_dropout(config)
        backbone = AutoModel.from_pretrained(directory, config=config, use_safetensors=True,
                                             trust_remote_code=trust_remote_code, dtype=torch.float32)
        model = cls(backbone, meta["pooling"], meta["pad_token_id"], meta["is_encoder"], meta.get("score_stats"))
        model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return model
