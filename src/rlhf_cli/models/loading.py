"""Loading causal LMs and their tokenizers, real or built-in, always through `from_pretrained`.

- `model.name_or_path` is a hub id, a local directory, or `builtin:tiny` (built on first use and cached, then loaded
  from its directory like any model). Every load first checks that what it names is there (`check_source`): a
  local path that does not exist, or a hub id that is not in the local cache while offline, is one ConfigError
  naming the stage's key, not a hub connection failure.
- Frozen roles (PPO's reference and reward model, eval's judge) load through `load_frozen_lm` and
  `models.reward.load_frozen_reward_model`.
- Weights load from safetensors only; `trust_remote_code` stays off unless the user turns it on.
- A pad token distinct from EOS is guaranteed: pad == EOS silently corrupts attention masks and last-token pooling,
  so when a tokenizer lacks one (or reuses EOS) `<|pad|>` is added and the embeddings are resized.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlhf_cli.config.schemas import BUILTIN_TINY, ModelConfig
from rlhf_cli.errors import ConfigError

PAD_TOKEN = "<|pad|>"


def quiet_transformers() -> None:
    """Our own progress bar and tables report progress; silence transformers' bars and info chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve(cfg: ModelConfig, key: str = "model.name_or_path") -> str:
    """Where from_pretrained should look: the cached built-in model's directory, or name_or_path itself, checked
    to be there (`check_source`; `key` is the config key that set it, named in errors)."""
    if cfg.name_or_path == BUILTIN_TINY:
        from rlhf_cli.models.tiny import tiny_model_path

        t = cfg.tiny
        return str(tiny_model_path(hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                                   intermediate_size=t.intermediate_size,
                                   max_position_embeddings=t.max_position_embeddings, seed=t.seed))
    if cfg.name_or_path.startswith("builtin:"):
        raise ConfigError(f"{key}={cfg.name_or_path}: the only built-in model is {BUILTIN_TINY}")
    check_source(cfg.name_or_path, key, cfg.revision)
    return cfg.name_or_path


def check_source(name: str, key: str = "model.name_or_path", revision: str | None = None) -> None:
    """Refuse, before anything loads, a model that cannot be there (ConfigError naming `key`, the config key the
    user set, with a hint):

    - a local path (absolute, starting with `.` or `~`, or not shaped like a hub id) that does not exist;
    - a hub id (`name` or `namespace/name`) while offline (HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1) that is not
      in the local Hugging Face cache: nothing could download it.

    An existing path, a `builtin:` name and, online, any hub id pass (from_pretrained then says what is wrong)."""
    if name.startswith("builtin:") or Path(name).expanduser().exists():
        return
    if not is_hub_id(name):
        raise ConfigError(f"{key}: the path {name} does not exist",
                          hint=f"check the path for a typo (a relative path is read from {os.getcwd()}); "
                               "or pass a finished run directory, a model directory, a hub id or builtin:tiny")
    if offline() and not in_hub_cache(name, revision):
        from huggingface_hub import constants

        raise ConfigError(f"{key}: {name} is neither a local directory nor in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}), and the hub is off (HF_HUB_OFFLINE=1)",
                          hint=f"on a machine with network run `hf download {name}` (older huggingface_hub: "
                               f"`huggingface-cli download {name}`) and copy its cache here, or set HF_HOME to a "
                               f"cache that has it, or pass a local model directory; or unset HF_HUB_OFFLINE to "
                               f"download it now")


def is_hub_id(name: str) -> bool:
    """Shaped like a Hugging Face repo id (`name` or `namespace/name`: letters, digits, `-`, `_`, `.`), rather than a
    local path (absolute, `.`/`~`-relative, or with more than one `/`)."""
    if name.startswith((".", "~", "/")) or os.sep in name.replace("/", "", 1):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """Is the Hugging Face hub switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)?"""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Does the local hub cache hold model `repo_id` (its config.json at `revision`, or, for a repo without one,
    any file of a snapshot)?"""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return True
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(p.is_file() for p in snapshots.rglob("*"))


def _load_error(what: str, name: str, exc: Exception, key: str = "model.name_or_path") -> ConfigError:
    local = Path(name).exists()
    hint = ("check that the directory holds a Hugging Face model (config.json, *.safetensors, tokenizer files)"
            if local else
            f"{key} must be a local directory or a hub id reachable from here "
            "(offline? download it elsewhere and pass its local path)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"could not load the {what} from '{name}': {first}", hint=hint)


def load_tokenizer(cfg: ModelConfig, path: str | None = None, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    path = path or resolve(cfg, key)
    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", path, exc, key) from exc


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids: same vocabulary (token -> id), same EOS id, same pad id.

    Token ids pass straight from one model to another without decoding and re-encoding (the policy's rollout ids
    into the reward and value models; per-token log-probs compared with the reference's for the KL) only when this
    holds; otherwise the ids mean other tokens, and text must be re-tokenised or the pair refused. EOS and pad
    matter as well as the vocabulary: they mark where a response ends and which positions are padding.
    """
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


def no_dropout(config) -> None:
    """Zero every dropout probability in a transformers config (hidden, attention, classifier, ...), in place:
    PPO's policy and reference and every reward model must be deterministic."""
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


def ensure_pad_token(tokenizer, model=None, require_eos: bool = True) -> bool:
    """Give the tokenizer a pad token distinct from EOS (resizing the model's embeddings); True if one was added.
    A policy needs an EOS to stop; an encoder reward model does not (require_eos=False)."""
    if require_eos and tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, so responses could never end",
                          hint="use a tokenizer with an eos_token")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return True


def load_causal_lm(cfg: ModelConfig, device: torch.device, dropout: bool = True, key: str = "model.name_or_path"):
    """(model, tokenizer, info) for a causal LM; fp32 master weights (bf16 autocast is applied by the engine).
    dropout=False zeroes every dropout probability (PPO's policy and reference must be deterministic). `key`: the
    config key that named the model, for errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = resolve(cfg, key)
    tokenizer = load_tokenizer(cfg, path, key)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        if not dropout:
            no_dropout(config)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True, dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise _load_error("model", path, exc, key) from exc
    added_pad = ensure_pad_token(tokenizer, model)
    model.to(device)
    info = {
        "path": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "added_pad_token": added_pad,
    }
    return model, tokenizer, info


def load_frozen_lm(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                   key: str = "model.name_or_path"):
    """(model, tokenizer) of a causal LM that is read, never trained (PPO's reference, eval's reference and
    policies): loaded by `load_causal_lm` with dropout off onto `device`, then cast to `dtype`, in eval mode, with
    no parameter requiring a gradient."""
    model, tokenizer, _ = load_causal_lm(ModelConfig(name_or_path=path, trust_remote_code=trust_remote_code), device,
                                         dropout=False, key=key)
    return model.to(dtype).eval().requires_grad_(False), tokenizer


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient (activation) checkpointing on a causal LM, or on a reward model's backbone (its head
    is one linear layer): each layer's activations are recomputed in the backward pass, in training mode only.
    Non-reentrant, so it composes with DDP's no_sync. A ConfigError for an architecture without it."""
    hf_model = getattr(model, "backbone", model)
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing=true, but {type(hf_model).__name__} does not support "
                          f"gradient checkpointing", hint="set train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def bare(model):
    """The module a wrapper runs: inside DDP/FSDP (`.module`), torch.compile (`._orig_mod`) and lora.BaseView
    (`.model` of a non-module view)."""
    while True:
        if isinstance(model, torch.nn.Module) and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not isinstance(model, torch.nn.Module) and hasattr(model, "model"):
            model = model.model
        else:
            return model


def logits_at(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """A causal LM's logits at sequence positions `positions` (1-D, the same for every row) only: [B, len, V].

    The LM head runs on those positions' hidden states alone (transformers' `logits_to_keep` given as an index
    tensor): at a 32k-150k vocabulary the head is most of a small model's FLOPs, and the logits of a prompt, or
    of padding, are never used. A model whose forward has no `logits_to_keep` computes every position's logits,
    and the asked ones are selected from them. No KV cache is built (`use_cache=False` for transformers models:
    a cache also hides packed rows' example boundaries from transformers' masks)."""
    from transformers import PreTrainedModel

    inner = bare(model)
    if isinstance(inner, PreTrainedModel):
        inputs.setdefault("use_cache", False)
    if _keeps_logits(type(inner)):
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]


_KEEPS: dict[type, bool] = {}


def _keeps_logits(cls: type) -> bool:
    if cls not in _KEEPS:
        import inspect

        _KEEPS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _KEEPS[cls]


def check_packing(model: torch.nn.Module, name: str) -> None:
    """Refuse (ConfigError) a model that lets packed examples see each other (data.packing=true)."""
    if (why := packing_refusal(model, name)) is not None:
        raise ConfigError(f"data.packing=true, but {why}", hint="set data.packing=false (or auto)")


def packing_refusal(model: torch.nn.Module, name: str) -> str | None:
    """Why `model` cannot train on packed rows, or None when it can: two short sequences packed into one row,
    positions restarting at the second, must give the second the outputs it gets alone. A transformers model reads
    such rows through its attention masks; one that does not would silently train on attention across examples.
    Uses no global random state (the run's numbers do not depend on whether this ran)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 200, (1, 6), generator=g), torch.randint(3, 200, (1, 5), generator=g)
    packed = torch.cat([first, second], 1).to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = _outputs(model(input_ids=second.to(device), use_cache=False))
            both = _outputs(model(input_ids=packed, position_ids=positions, use_cache=False))[:, 6:]
    except (TypeError, ValueError, RuntimeError) as exc:  # a model that takes no position_ids, say
        return f"{name} ({type(bare(model)).__name__}) cannot read a packed row ({type(exc).__name__}: {exc})"
    finally:
        model.train(training)
    gap = float((both.float() - alone.float()).abs().max())
    if not gap <= 1e-3 * (1.0 + float(alone.float().abs().max())):
        return (f"{name} ({type(bare(model)).__name__}) does not keep packed examples apart: an example's outputs "
                f"change when another precedes it in the row (max difference {gap:.3g})")
    return None


def _outputs(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
