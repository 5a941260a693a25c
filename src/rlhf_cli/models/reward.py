"""The reward model: a pretrained transformer that maps a text to one scalar score.

Two forms, one interface (`model(input_ids, attention_mask)` -> [B] scores):
- backbone + head: a body (`AutoModel`) and a linear head on one pooled hidden state: the last real token for
  causal LMs (the only position that has attended to the whole text), the first token for encoders with a [CLS]
  token, or the mean over real tokens. PPO's value model is this form, read at every position (`per_token`).
- classifier: a whole `AutoModelForSequenceClassification` of an encoder (BERT, RoBERTa, DeBERTa, ...), whose own
  classification head (pooler, dense, classifier: each architecture has its own) reads [CLS].
Dropout is switched off everywhere: a stochastic reward makes training targets and PPO scores noisy.

On disk a reward model is, where its pooling follows the architecture's sequence-classification convention (last
token on a causal LM, [CLS] through the architecture's head on an encoder), a plain Hugging Face
`<Arch>ForSequenceClassification` with one label, so `AutoModelForSequenceClassification.from_pretrained(dir)`
gives the same scores and the model works in TRL, OpenRLHF or any evaluation harness; otherwise (mean pooling, or
first-token pooling on a causal LM) the backbone directory plus `reward_head.safetensors`. Both carry
`reward_config.json` (pooling, pad id, encoder or not, score statistics on held-out data). `from_pretrained` reads
both, the layout of earlier versions (backbone + a head with a bias), and any `AutoModelForSequenceClassification`
checkpoint with one label, ours or not (TRL's RewardTrainer writes them), from a directory or a hub id. A causal
classifier from elsewhere is read where transformers reads it: at the rightmost token that is not its pad id (with
pad == EOS, before a trailing EOS).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models.loading import check_source, no_dropout
from rlhf_cli.rl.masks import position_ids_from_mask
from rlhf_cli.rl.reward import pool

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
SEQ_CLS = "sequence_classification"   # reward_config.json "layout": an HF <Arch>ForSequenceClassification directory
BACKBONE_AND_HEAD = "backbone_and_head"
ENSEMBLE_FILE = "ensemble.json"      # in the model/ of a `reward.ensemble=K` artifact: its members, in order
# Model types that are bidirectional encoders: they see the whole text at every position.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                 "camembert", "mpnet", "modernbert", "mobilebert", "ernie", "longformer", "big_bird"}


def auto_pooling(model_type: str, tokenizer) -> str:
    if model_type not in ENCODER_TYPES:
        return "last"
    return "first" if getattr(tokenizer, "cls_token", None) is not None else "mean"


def seq_cls_class(config):
    """The architecture's `<Arch>ForSequenceClassification` class, or None when it has none."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification._model_mapping.get(type(config), None)


class RewardModel(torch.nn.Module):
    """score(x) = w · pool(backbone(x)) (+ b on encoders and earlier layouts), or an encoder classifier's logit."""

    def __init__(self, backbone, pooling: str, pad_token_id: int, is_encoder: bool, score_stats: dict | None = None,
                 *, bias: bool | None = None, classifier=None):
        """backbone + a fresh head (no bias on causal LMs, as their <Arch>ForSequenceClassification has none;
        `bias` overrides), or `classifier`, a whole encoder AutoModelForSequenceClassification (backbone None)."""
        super().__init__()
        if classifier is not None:
            self.classifier = classifier
        else:
            self.backbone = backbone
            hidden = backbone.config.hidden_size
            self.head = torch.nn.Linear(hidden, 1)  # with its bias drawn: the same RNG use either way
            torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
            torch.nn.init.zeros_(self.head.bias)
            if not (is_encoder if bias is None else bias):
                self.head.register_parameter("bias", None)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.is_encoder = is_encoder
        self.score_stats = score_stats or {}
        # Last-token pooling passes over this id (None: reads the attention mask's last token). A causal classifier
        # from elsewhere sets its config's pad id: transformers reads "the rightmost token that is not pad", so
        # where pad == EOS a text's trailing EOS is not read, and it was trained (e.g. by TRL) that way.
        self.skip_token_id: int | None = None

    def __getattr__(self, name: str):
        # A classifier's body is its `backbone` too: where LoRA adapters and gradient checkpointing go.
        if name == "backbone" and "classifier" in self._modules:
            return self._modules["classifier"].base_model
        return super().__getattr__(name)

    @property
    def gives_values(self) -> bool:
        """Can it be PPO's value model (a causal body read at every position, `per_token`)? Not an encoder, which
        sees the tokens whose return it would predict, nor a whole classifier, which reads one position."""
        return not self.is_encoder and "classifier" not in self._modules

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, per_token: bool = False,
                positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                ends: torch.Tensor | None = None) -> torch.Tensor:
        """One score per sequence [B] read at the pooled position, or (per_token=True, PPO's value model on a causal
        backbone) the head applied at every position [B, L], or at sequence positions `positions` only [B, n].

        Packed (data.collate_packed_pairs, `packable` models): one row [1, T] of sequences whose `position_ids`
        restart at 0 each, no attention mask; the score of each sequence is read at its last token, `ends` [n]."""
        if ends is not None:
            if not self.packable:
                raise ValueError("only a causal reward model read at its last token scores packed sequences")
            hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return scores_of(self.head(hidden[0, ends].to(self.head.weight.dtype)))
        if "classifier" in self._modules:
            if per_token:
                raise ValueError("an encoder's classifier gives one score per text, not per-token values")
            return scores_of(self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits[:, :1])
        kwargs = {}
        if not self.is_encoder:  # padded and unpadded sequences get the same positions
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if per_token:
            hidden = hidden if positions is None else hidden[:, positions]
            return scores_of(self.head(hidden.to(self.head.weight.dtype)))
        pooled = pool(hidden, readable(input_ids, attention_mask, self.skip_token_id, self.pooling), self.pooling)
        return scores_of(self.head(pooled.to(self.head.weight.dtype)))

    @property
    def packable(self) -> bool:
        """Can it score padding-free packed rows (data.packing)? A causal backbone read at each sequence's last
        token: not an encoder (its attention is bidirectional), not a whole classifier, no pad-is-EOS reading."""
        return "classifier" not in self._modules and not self.is_encoder and self.pooling == "last" and \
            self.skip_token_id is None

    @classmethod
    def from_backbone(cls, path: str, tokenizer, *, pooling: str = "auto", revision: str | None = None,
                      trust_remote_code: bool = False, key: str = "model.name_or_path") -> "RewardModel":
        """A new reward model from the pretrained model at `path`: a causal LM's body (without its LM head) and a
        fresh head, or, for an encoder read at [CLS], the architecture's own AutoModelForSequenceClassification
        with one label (its classification head freshly initialised). `key`: the config key that named `path`."""
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        check_source(path, key, revision)
        try:
            config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
            no_dropout(config)
            is_encoder = config.model_type in ENCODER_TYPES
            pooling = auto_pooling(config.model_type, tokenizer) if pooling == "auto" else pooling
            own_head = is_encoder and pooling == "first" and seq_cls_class(config) is not None
            kwargs = dict(revision=revision, use_safetensors=True, trust_remote_code=trust_remote_code,
                          dtype=torch.float32)
            if own_head:
                config.num_labels = 1
                net = AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
            else:
                net = AutoModel.from_pretrained(path, config=config, **kwargs)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"could not load a reward-model backbone from '{path}': {first}",
                              hint=f"{key} must be a local Hugging Face model directory, a run "
                                   "directory with a finished artifact, or a reachable hub id") from exc
        if len(tokenizer) > net.get_input_embeddings().weight.shape[0]:
            net.resize_token_embeddings(len(tokenizer))  # a pad token was added
        if own_head:
            net.config.pad_token_id = tokenizer.pad_token_id
            return cls(None, pooling, tokenizer.pad_token_id, True, classifier=net)
        return cls(net, pooling, tokenizer.pad_token_id, is_encoder)

    def add_head_bias(self) -> "RewardModel":
        """A trainable bias (0, so no score changes) on a head without one: PPO's value model learns the level of
        the returns with it, as TRL's value head does. Its layout is then backbone + head."""
        if "classifier" not in self._modules and self.head.bias is None:
            self.head.bias = torch.nn.Parameter(torch.zeros(1, dtype=self.head.weight.dtype,
                                                            device=self.head.weight.device))
        return self

    def layout(self) -> str:
        """How `save_pretrained` writes this model: as the architecture's AutoModelForSequenceClassification when
        that gives the same scores, else as backbone + reward_head.safetensors."""
        if "classifier" in self._modules:
            return SEQ_CLS
        hf_convention = (not self.is_encoder and self.pooling == "last" and self.head.bias is None
                         and seq_cls_class(self.backbone.config) is not None)
        return SEQ_CLS if hf_convention else BACKBONE_AND_HEAD

    def save_pretrained(self, directory: Path, tokenizer=None) -> None:
        directory = Path(directory)
        layout = self.layout()
        if "classifier" in self._modules:
            self.classifier.save_pretrained(directory, safe_serialization=True)
        elif layout == SEQ_CLS:
            save_seq_cls(self.backbone, self.head, self.pad_token_id, directory)
        else:
            self.backbone.save_pretrained(directory, safe_serialization=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      str(directory / HEAD_FILE))
        meta = {"layout": layout, "pooling": self.pooling, "pad_token_id": self.pad_token_id,
                "is_encoder": self.is_encoder, "hidden_size": self.config.hidden_size, "score_stats": self.score_stats}
        if self.skip_token_id is not None:  # a classifier from elsewhere, re-saved: still read as transformers reads it
            meta["skip_token_id"] = self.skip_token_id
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory, trust_remote_code: bool = False, key: str = "model.reward") -> "RewardModel":
        """Load a reward model: the `model/` of a reward artifact (either layout, or the layout of earlier versions),
        or any Hugging Face AutoModelForSequenceClassification directory or hub id with one label. `key`: the
        config key that named it, for errors."""
        from transformers import AutoConfig, AutoModel

        path = str(directory)
        check_source(path, key)
        meta_file = side_file(path, CONFIG_FILE)
        meta = json.loads(Path(meta_file).read_text()) if meta_file else None
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"could not read a reward model from '{path}': {first}",
                                hint="point at the model/ directory or run directory of a finished `rlhf reward` run, "
                                     "or at an AutoModelForSequenceClassification directory or hub id") from exc
        no_dropout(config)
        if meta is None or meta.get("layout") == SEQ_CLS:
            model = from_seq_cls(path, config, meta, trust_remote_code)
        else:  # backbone + head (this layout, and that of earlier versions)
            backbone = AutoModel.from_pretrained(path, config=config, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, dtype=torch.float32)
            head_file = side_file(path, HEAD_FILE)
            if head_file is None:
                raise ArtifactError(f"{path} has {CONFIG_FILE} but no {HEAD_FILE}: an unfinished reward artifact",
                                    hint="re-run `rlhf reward`, or point at a finished artifact's model/ directory")
            head = load_file(head_file)
            model = cls(backbone, meta["pooling"], meta["pad_token_id"], meta["is_encoder"], bias="bias" in head)
            model.head.load_state_dict(head)
        if meta is not None:
            model.score_stats = meta.get("score_stats") or {}
            model.skip_token_id = meta.get("skip_token_id")
        return model


def readable(input_ids: torch.Tensor, attention_mask: torch.Tensor, skip_token_id: int | None,
             pooling: str) -> torch.Tensor:
    """The mask last-token pooling reads: the attention mask, less the tokens equal to `skip_token_id` (transformers'
    <Arch>ForSequenceClassification reads the rightmost token that is not its pad id). Unchanged otherwise."""
    if skip_token_id is None or pooling != "last":
        return attention_mask
    return attention_mask.bool() & (input_ids != skip_token_id)


def side_file(path: str, name: str) -> str | None:
    """The local path of file `name` of a model directory or hub id (downloaded or from the hub cache), or None when
    it has none or the hub cannot be reached (then loading the model itself says why)."""
    local = Path(path)
    if local.is_dir():
        return str(local / name) if (local / name).is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None


def save_seq_cls(backbone, head: torch.nn.Linear, pad_token_id: int, directory: Path) -> None:
    """backbone + a bias-free head as the architecture's <Arch>ForSequenceClassification with one label: its config
    (num_labels 1, our pad id, which it reads the last non-pad token with) and its weights named as it names them
    (<base_model_prefix>.* and score.weight). Written directly: no second copy of the weights in memory."""
    seq_cls = seq_cls_class(backbone.config)
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.architectures = [seq_cls.__name__]
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    prefix = seq_cls.base_model_prefix
    weights = {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    weights["score.weight"] = head.weight.detach().contiguous().cpu()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


def from_seq_cls(path: str, config, meta: dict | None, trust_remote_code: bool) -> RewardModel:
    """A RewardModel from an AutoModelForSequenceClassification checkpoint with one label: on a causal LM, its body
    and its `score` layer as backbone + head, read at the last real token (the scores AutoModelForSequenceClassification
    gives on unpadded or right-padded text, under any padding here); on an encoder, the whole classifier."""
    from transformers import AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ArtifactError(f"{path} is not a reward model: neither one of ours (no {CONFIG_FILE}) nor a sequence "
                            f"classifier (architectures: {', '.join(archs) or 'none'})",
                            hint="point at the model/ directory of a finished `rlhf reward` run, or at an "
                                 "AutoModelForSequenceClassification checkpoint with one label")
    if config.num_labels != 1:
        raise ArtifactError(f"{path} is a sequence classifier with {config.num_labels} labels; a reward model has one "
                            f"(a scalar score)", hint="use a reward model trained with one output, e.g. by TRL's "
                                                      "RewardTrainer or `rlhf reward`")
    try:
        net = AutoModelForSequenceClassification.from_pretrained(path, config=config, use_safetensors=True,
                                                                 trust_remote_code=trust_remote_code,
                                                                 dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"could not load the sequence classifier at '{path}': {first}",
                            hint="it must hold safetensors weights") from exc
    pad = meta["pad_token_id"] if meta else config.pad_token_id
    is_encoder = config.model_type in ENCODER_TYPES
    score = getattr(net, "score", None)
    if is_encoder or not isinstance(score, torch.nn.Linear) or score.out_features != 1:
        return RewardModel(None, "first" if is_encoder else "last", pad, is_encoder, classifier=net)
    model = RewardModel(getattr(net, net.base_model_prefix), "last", pad, False, bias=score.bias is not None)
    model.head.load_state_dict(score.state_dict())
    if meta is None:  # read where transformers reads it (ours are read by the mask: our pad never is a real token)
        model.skip_token_id = config.pad_token_id
    return model


def ensemble_members(path: str) -> list[str] | None:
    """The member directories of an ensemble artifact (the model/ of a `reward.ensemble=K` run: ensemble.json and
    one complete reward-model directory per member, each loadable on its own), in order; None for anything else."""
    listing = Path(path) / ENSEMBLE_FILE
    if not listing.is_file():
        return None
    members = json.loads(listing.read_text())["members"]
    missing = [m for m in members if not (Path(path) / m).is_dir()]
    if missing:
        raise ArtifactError(f"the reward ensemble at {path} lists members that are not there: {', '.join(missing)}",
                            hint="re-run `rlhf reward ... overwrite=true`")
    return [str(Path(path) / m) for m in members]


ADAPTER_DIR = "adapter"  # in a LoRA-trained ensemble member's directory: its adapters (peft) and head alone


def shared_base(path: str) -> str | None:
    """The base model an ensemble artifact's members share when they were trained as LoRA adapters on it (each
    member's adapter/ holds its adapters and head), if that base and every member's adapters are still there; else
    None: its members load as the complete models they also are."""
    listing = Path(path) / ENSEMBLE_FILE
    if not listing.is_file():
        return None
    info = json.loads(listing.read_text())
    base = info.get("shared_base")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    adapters = [Path(path) / m / ADAPTER_DIR for m in info["members"]]
    return base if all((a / "adapter_config.json").is_file() and (a / HEAD_FILE).is_file() for a in adapters) else None


class LoraEnsemble(torch.nn.Module):
    """K reward models that are LoRA adapters and heads on one frozen base, scored together: each micro-batch is
    repeated K times and the k-th copy runs through the base with member k's adapters (peft's mixed-adapter
    batches), so the base's weights are held and read once for all K. Scores [B, K]."""

    def __init__(self, handle, names: list[str], heads: list[dict], meta: dict, member_stats: list[dict]):
        super().__init__()
        self.handle = handle  # peft.PeftModel over the base body, one adapter per member
        self.names = names
        self.weight = torch.nn.Parameter(torch.cat([h["weight"] for h in heads]), requires_grad=False)  # [K, H]
        biased = all("bias" in h for h in heads)
        self.bias = torch.nn.Parameter(torch.cat([h["bias"] for h in heads]), requires_grad=False) if biased else None
        self.pooling, self.pad_token_id, self.is_encoder = meta["pooling"], meta["pad_token_id"], meta["is_encoder"]
        self.skip_token_id = meta.get("skip_token_id")
        self.member_stats = member_stats
        self.score_stats = member_stats[0]

    @property
    def config(self):
        return self.handle.get_base_model().config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """score_k(x) = w_k · pool(base + adapters_k (x)) (+ b_k) for every member k, [B, K]."""
        k, b = len(self.names), input_ids.shape[0]
        ids, mask = input_ids.repeat(k, 1), attention_mask.repeat(k, 1)
        kwargs = {} if self.is_encoder else {"position_ids": position_ids_from_mask(mask)}
        hidden = self.handle(input_ids=ids, attention_mask=mask, adapter_names=[n for n in self.names for _ in
                                                                                 range(b)], **kwargs).last_hidden_state
        pooled = pool(hidden, readable(ids, mask, self.skip_token_id, self.pooling), self.pooling)
        scores = torch.einsum("kbh,kh->kb", pooled.view(k, b, -1).to(self.weight.dtype), self.weight)
        return (scores + self.bias[:, None] if self.bias is not None else scores).T.contiguous()


def load_lora_ensemble(path: str, trust_remote_code: bool = False) -> LoraEnsemble:
    """The LoraEnsemble of an ensemble artifact whose members share a base (`shared_base`), in fp32."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel

    from rlhf_cli.models import lora

    base, members = shared_base(path), ensemble_members(path)
    meta = json.loads((Path(members[0]) / CONFIG_FILE).read_text())
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    no_dropout(config)
    body = AutoModel.from_pretrained(base, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
                                     dtype=torch.float32)
    names = [f"member_{k}" for k in range(len(members))]
    with lora.quiet():
        handle = PeftModel.from_pretrained(body, str(Path(members[0]) / ADAPTER_DIR), adapter_name=names[0])
        for name, member in zip(names[1:], members[1:]):
            handle.load_adapter(str(Path(member) / ADAPTER_DIR), adapter_name=name)
    heads = [load_file(str(Path(m) / ADAPTER_DIR / HEAD_FILE)) for m in members]
    stats = [json.loads((Path(m) / CONFIG_FILE).read_text()).get("score_stats") or {} for m in members]
    return LoraEnsemble(handle, names, heads, meta, stats)


def write_ensemble(directory: Path, members: list[str], info: dict) -> None:
    """ensemble.json of an ensemble artifact's model/: the member directories (relative to it) and what the
    reward stage measured of them."""
    (Path(directory) / ENSEMBLE_FILE).write_text(json.dumps({"members": members, **info}, indent=2) + "\n")


def load_reward_model(path: str, trust_remote_code: bool = False,
                      key: str = "model.reward") -> tuple[RewardModel, object]:
    """(reward model, its tokenizer) for scoring: `RewardModel.from_pretrained` and the tokenizer beside it. A
    tokenizer without a pad token (Llama reward models) pads with the model's pad id, else EOS, without adding a
    token (the embeddings stay as trained): the attention mask, not the pad id, says where a text ends."""
    model = RewardModel.from_pretrained(path, trust_remote_code, key)
    tokenizer = reward_tokenizer(path, model.pad_token_id, trust_remote_code)
    if model.pad_token_id is None:
        model.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_tokenizer(path: str, pad_token_id: int | None, trust_remote_code: bool = False):
    """The tokenizer beside a reward model, padding with the model's pad id (else EOS) when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"no tokenizer beside the reward model at '{path}'",
                            hint="save the tokenizer with the model (tokenizer.save_pretrained(dir))") from exc
    if tokenizer.pad_token_id is None:
        pad = pad_token_id if pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ArtifactError(f"the reward model at '{path}' has neither a pad token nor an EOS token to pad with",
                                hint="set pad_token_id in its config.json")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return tokenizer


def load_frozen_reward_model(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                             key: str = "model.reward") -> tuple[RewardModel, object]:
    """(reward model, its tokenizer) that only scores (PPO's reward, eval's judge): `load_reward_model`, moved to
    `device` in `dtype`, in eval mode, with no parameter requiring a gradient."""
    if shared_base(path) is not None:  # a LoRA ensemble on one base: its members scored together
        model = load_lora_ensemble(path, trust_remote_code)
        tokenizer = reward_tokenizer(ensemble_members(path)[0], model.pad_token_id, trust_remote_code)
    else:
        model, tokenizer = load_reward_model(path, trust_remote_code, key)
    return model.to(device, dtype).eval().requires_grad_(False), tokenizer


# ---- scoring ---------------------------------------------------------------------------------------------------

def score_pairs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each [B] float32, of B tokenized pairs collated by data.preference.collate_pairs, in
    one forward pass: rows 0..B-1 chosen and B..2B-1 rejected (`input_ids`, `attention_mask`), or, packed, one
    padding-free row read at each sequence's last token (`input_ids`, `position_ids`, `ends`). `model`: a
    RewardModel, or one wrapped for training (DDP, FSDP, torch.compile)."""
    if "ends" in batch:
        r = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], ends=batch["ends"]).float()
    else:
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    n = r.shape[0] // 2
    return r[:n], r[n:]


def score_padded(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, micro: int) -> torch.Tensor:
    """The score of each row of a padded batch [N, L] (left, right or both), [N] float32, `micro` rows per
    forward pass."""
    return torch.cat([model(input_ids[i:i + micro], attention_mask[i:i + micro]).float()
                      for i in range(0, input_ids.shape[0], micro)])


def score_sequences(model, sequences: list[list[int]], pad_id: int, device: torch.device, micro: int) -> torch.Tensor:
    """The score of each token sequence (e.g. data.preference.tokenize_responses' input_ids), [N] float32: `micro`
    sequences per forward pass, each micro-batch right-padded with `pad_id` to its own longest sequence."""
    from rlhf_cli.data.preference import pad_right

    scores = []
    for i in range(0, len(sequences), micro):
        input_ids, attention_mask = pad_right(sequences[i:i + micro], pad_id)
        scores.append(model(input_ids.to(device), attention_mask.to(device)).float())
    return torch.cat(scores)


def scores_of(head_output: torch.Tensor) -> torch.Tensor:
    """[..., 1] -> [...]: the head's one output per position, as a tensor of its own rather than a view (the same
    numbers). FSDP2 warns on every forward of a sharded module that returns a view, since an in-place op on it
    would skip the all-gather; a reward or value model under FSDP would print that warning every step."""
    return head_output.squeeze(-1).clone()
