"""LoRA adapters through peft: the base weights stay frozen and only low-rank updates train.

    W x  ->  W x + (alpha / r) · B A x,    A: [r, in], B: [out, r], B = 0 at the start

so a model with fresh adapters computes exactly what its base does. Adapters are injected *in place* into the
model a stage already holds (a causal LM, or a reward model's `backbone`, whose head then trains in full): the
same object samples, trains, checkpoints and saves, and `adapters_off` runs it as its frozen base, which is how
PPO's reference costs no second copy of the weights. peft's wrapper (kept here, by model) does the bookkeeping:
switching adapters off, saving them alone, merging them into the base weights.

With `model.lora.r=0` (the default) every function here leaves the model as it is.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rlhf_cli.config.schemas import LoraConfig
from rlhf_cli.errors import ConfigError

_PEFT: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def body(model: torch.nn.Module) -> torch.nn.Module:
    """Where adapters go: a reward model's transformer body (its head trains in full), else the model itself."""
    return getattr(model, "backbone", model)


def add_adapters(model: torch.nn.Module, cfg: LoraConfig, seed: int,
                 base_dtype: torch.dtype | None = None) -> None:
    """Inject LoRA adapters (fp32) into `model`'s linear layers named by cfg.target_modules (`all-linear`: every
    linear layer of the attention and MLP blocks, never the LM head) and freeze its base weights; r = 0: nothing.
    A is drawn from `seed` (the caller's RNG is left as it was), so a run is reproducible and every rank starts
    from the same adapters; B = 0. `base_dtype`: hold the frozen base weights in that dtype (bf16 halves their
    memory; they never see a gradient). A ConfigError when target_modules names no module of the model."""
    if cfg.r == 0:
        return
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    try:
        with quiet(), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            handle = get_peft_model(body(model), peft_cfg)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.lora.target_modules={list(cfg.target_modules)}: {first}",
                          hint="name linear layers of this model (e.g. [q_proj,v_proj]) or use [all-linear]") from exc
    _PEFT[model] = handle
    if base_dtype is not None:
        for p in body(model).parameters():
            if not p.requires_grad:
                p.data = p.data.to(base_dtype)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """peft reads a property transformers 5 deprecates (a FutureWarning on every call), and says that it saves the
    embeddings with the adapters when a pad token was added (load_causal_lm resized them): not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
        yield


def structure_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (its adapters and peft's bookkeeping of them included) whose parameters are empty tensors
    on the meta device: the same names, shapes, dtypes and tied weights, no memory. It takes a full state dict with
    `load_state_dict(state, assign=True)` and is then a plain model to merge and save (engine/fsdp.py). Buffers and
    other attributes are copied as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    replica, handle = copy.deepcopy((model, _PEFT.get(model)), memo)
    if handle is not None:
        _PEFT[replica] = handle
    return replica


def has_adapters(model: torch.nn.Module) -> bool:
    return model in _PEFT


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trained parameters, all parameters) of a model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: torch.nn.Module) -> str:
    """'1.23M of 124.44M parameters trained (LoRA)' / '124.44M parameters, all trained'."""
    trained, total = counts(model)
    if trained == total:
        return f"{total / 1e6:.2f}M parameters, all trained"
    return f"{trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained ({'LoRA' if has_adapters(model) else 'frozen'})"


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` as its base inside this context (exactly the base's outputs); no-op without adapters."""
    handle = _PEFT.get(model)
    if handle is None:
        yield
        return
    with handle.disable_adapter():
        yield


class BaseView:
    """A model with adapters, called as its frozen base: `BaseView(policy)(**batch)` is the reference's forward
    pass, with the policy's own weights (no copy). Only calls are forwarded; nothing here trains or moves."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if not p.requires_grad)


def frozen_base(model: torch.nn.Module, load_copy: Callable[[], torch.nn.Module]):
    """PPO's reference: the policy with its adapters off when it has adapters, else `load_copy()`, a separate
    frozen copy of the same weights."""
    return BaseView(model) if has_adapters(model) else load_copy()


def adapter_writer(model: torch.nn.Module) -> Callable[[Path], None] | None:
    """What writes the adapters alone into a directory, as peft saves them (adapter_config.json,
    adapter_model.safetensors: they load onto the base with `peft.PeftModel.from_pretrained(base, directory)`);
    None for a model without adapters."""
    handle = _PEFT.get(model)
    if handle is None:
        return None
    def write(directory: Path) -> None:
        with quiet():
            handle.save_pretrained(str(directory), safe_serialization=True)

    return write


def merged(model: torch.nn.Module, reload: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """`model` with its adapters merged into its base weights (W + (alpha / r) B A) and peft's layers gone: a
    plain model to `save_pretrained`. Merged in place when the base weights are fp32; a base held in another dtype
    (bf16) is not merged into, but `reload()` (a fresh fp32 copy of the base) takes the adapters, so the saved
    weights are the base's own plus the update. Without adapters: `model` itself."""
    handle = _PEFT.pop(model, None)
    if handle is None:
        return model
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base_dtypes = {p.dtype for p in body(model).parameters() if not p.requires_grad}
    with quiet():
        if base_dtypes <= {torch.float32} or reload is None:
            handle.merge_and_unload()
            return model
        fresh = reload()
        fresh_handle = get_peft_model(body(fresh), handle.peft_config["default"])
        adapters = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(handle).items()}
        set_peft_model_state_dict(fresh_handle, adapters)
        fresh_handle.merge_and_unload()
    return fresh
