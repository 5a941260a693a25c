#!/usr/bin/env python
"""DPO training throughput of `rlhf dpo`'s own training step on Anthropic HH pairs, side by side with TRL's
DPOTrainer on the same workload, and peak memory with and without precomputed reference log-probs.

    .venv/bin/python scripts/bench_dpo.py                     # ours alone, the defaults below
    BENCH_DPO_TRL_PATH=/work/trl-pkgs .venv/bin/python scripts/bench_dpo.py --trl        # + TRL's DPOTrainer
    .venv/bin/python scripts/bench_dpo.py --memory            # ours, reference precomputed vs held: peak memory

The model: a random-init Llama built by `rlhf_cli.models.tiny.tiny_model_path` (`--hidden`, `--layers`, `--heads`,
`--ffn`, default Llama's 8/3 x hidden rounded up to a multiple of 16: 688 at hidden 256) with a realistic vocabulary
(`--vocab-size`, default 32000, untied LM head: at small sizes the head dominates, and the built-in tokenizer's ~500
tokens would hide it; text still tokenizes through the built-in byte-level tokenizer). It is built once by this
process (cached in $RLHF_CLI_CACHE when set, else in a temporary directory removed at the end); both trainers load
that same directory in fp32.

The data: the first `--pairs` pairs of `--data` (default the shared HH harmless-base test file), loaded and split
into prompt / chosen / rejected by the project's loader (HH rows: the dialogue up to the last "Assistant:" is the
prompt), among those whose prompt takes at most half of `--max-len` tokens: on them both trainers keep exactly the
same tokens, `prompt response [eos]` per side with the response cut at `--max-len` (on longer prompts they part
ways: ours cuts the prompt from the left, TRL cuts the end and drops a pair whose prompt alone fills max_length).
Ours tokenizes them with the stage's `tokenize`; TRL gets the same texts as a `datasets.Dataset` of
prompt/chosen/rejected and tokenizes them itself.

Ours ("rlhf dpo"): the stage's pieces in the stage's order: `load_policy` (dropout off; `--packing` as
data.packing, default auto: one padding-free row per micro-batch where the model keeps packed sequences apart),
`tokenize`, `Reference` (its log-probs of every pair precomputed once before training, dpo.precompute_reference,
or with `--no-precompute` a frozen copy held and run every micro-batch), `train.wrap_for_training`, and per
optimizer step `batches.step_examples` + `train_step` (chosen and rejected through the policy in one forward pass,
`--batch` pairs per step in micro-batches of `--micro-batch`, default the whole step; the dpo.loss=sigmoid loss;
clipping, AdamW, the schedule), under train.precision `--precision`.

TRL: DPOTrainer in a process of its own on the same model directory, the same pairs and the same batch
(per_device_train_batch_size = --micro-batch, gradient accumulation = --batch / --micro-batch), max_length =
--max-len, beta, learning rate, AdamW betas/eps, weight decay and clip norm as ours, precompute_ref_log_probs as
ours, dropout off, bf16 only when ours runs bf16 autocast, gradient checkpointing off (TRL's default is on), no
evaluation, no logging, no checkpoints, report_to none, dataloader workers 0. TRL is not a dependency of rlhf_cli:
`pip install trl` (tested with 1.16.0), or `pip install --no-deps --target DIR trl==1.16.0` and point the script at
it with BENCH_DPO_TRL_PATH=DIR or `--trl-path DIR` (os.pathsep-separated; searched after the environment's own
packages). When TRL cannot be imported the script says so in one line and still prints ours.

Timing: `--warmup` untimed optimizer steps, then `--steps` timed ones. Ours: each step from picking its pairs to
the end of `train_step` (collation, forward, backward, optimizer). TRL: a TrainerCallback's clock between
consecutive on_step_end calls (fetching and collating the batch, forward, backward, optimizer). Precomputing the
reference log-probs happens before training on both sides and is not timed. tokens/s = non-pad tokens of the
chosen and rejected sequences processed in the timed steps / their seconds (counted from each step's pairs for ours,
from each batch's attention mask for TRL); response tokens are the share whose log-probs the loss sums.

Memory: each run is a process of its own (one after another, never in parallel), so its peak is its own: on CPU the
peak resident set (ru_maxrss; with the Python runtime, torch, transformers and, for TRL, trl/datasets/accelerate:
the runtime's RSS, measured after the imports and before any model, is shown to subtract), on CUDA
torch.cuda.max_memory_allocated. `--memory` runs ours with the reference precomputed and held (and, with `--trl`,
TRL both ways) and prints the peaks side by side; `--no-precompute` makes the plain run hold the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import rlhf_cli  # noqa: F401
except ImportError:  # a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TRL_PATH = "BENCH_DPO_TRL_PATH"  # where a TRL installed apart lives (os.pathsep-separated), searched last
TRL_MISSING = 3  # the TRL child's exit status when TRL cannot be imported (its last stderr line says why)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", "--hidden-size", dest="hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", "--intermediate-size", dest="ffn", type=int, default=None,
                   help="MLP width (default: 8/3 x --hidden rounded up to a multiple of 16)")
    p.add_argument("--vocab-size", type=int, default=32000, help="embedding and (untied) LM-head rows")
    p.add_argument("--data", default=str(HH), help="preference pairs (HH rows, or prompt/chosen/rejected)")
    p.add_argument("--pairs", type=int, default=64,
                   help="the first N pairs of --data whose prompt takes at most half of --max-len")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per forward/backward (default: --batch)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (data.max_seq_len, max_length)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--packing", choices=("auto", "true", "false"), default="auto", help="ours: data.packing")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.precision: auto = bf16 autocast on CUDA, fp32 on CPU (TRL: bf16=True alike)")
    p.add_argument("--no-precompute", dest="precompute", action="store_false",
                   help="hold the reference and run it every step (dpo.precompute_reference=false, TRL alike)")
    p.add_argument("--memory", action="store_true",
                   help="ours (and with --trl, TRL) with the reference precomputed and held: peak memory of each")
    p.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer on the same workload")
    p.add_argument("--trl-path", default=None, metavar="DIR",
                   help=f"where TRL is installed apart (default: ${TRL_PATH})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line (a list of runs) instead of a table")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one run, in its own process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # the child's model, built by the parent
    args = p.parse_args(argv)
    args.ffn = args.ffn or 16 * math.ceil(8 * args.hidden / 3 / 16)
    args.micro_batch = args.micro_batch or args.batch
    for name in ("hidden", "layers", "heads", "ffn", "vocab_size", "pairs", "batch", "micro_batch", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if args.batch % args.micro_batch:
        p.error("--batch must be a multiple of --micro-batch")
    if args.pairs < args.batch:
        p.error(f"--pairs {args.pairs} is fewer than one step's --batch {args.batch}")
    if args.max_len < 8:
        p.error("--max-len must be >= 8")
    if args.memory and not args.precompute:
        p.error("--memory runs both ways already: leave out --no-precompute")
    if args.trl_path:
        os.environ[TRL_PATH] = args.trl_path  # the children inherit it
    return args


# ---- measuring --------------------------------------------------------------------------------------------------

def rss_mib() -> float:
    """This process's resident set now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set so far (ru_maxrss, KiB on Linux), MiB: at least the resident set now."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib())


def memory_now(device) -> float:
    import torch

    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()


def memory_peak(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_pairs(args, tokenizer):
    """(rows, their Source): the first --pairs rows of --data, normalised to prompt/chosen/rejected by the project's
    loader (HH rows split at the last "Assistant:"), whose prompt takes at most half of --max-len tokens. On such
    pairs both trainers keep exactly the same tokens (the prompt whole, the responses cut at --max-len), where on
    longer prompts they part: ours cuts the prompt from the left, TRL drops the pair or cuts its end."""
    from rlhf_cli.data.loading import load_rows
    from rlhf_cli.data.preference import normalize_preference_rows, render_pair

    for limit in (8 * args.pairs, None):  # a few rows first: what loading all of them holds counts in the peak
        rows, source = load_rows(args.data, "train", limit)
        rows, _ = normalize_preference_rows(rows, source, "auto", skip_invalid=True)
        prompts = [render_pair(row, tokenizer)[0] for row in rows]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        fit = [row for row, n in zip(rows, lengths) if 0 < n <= args.max_len // 2][:args.pairs]
        if len(fit) == args.pairs:
            break
    if len(fit) < args.pairs:
        raise SystemExit(f"bench_dpo.py: only {len(fit)} pairs of {args.data} have a prompt of at most "
                         f"{args.max_len // 2} tokens (half of --max-len): lower --pairs or raise --max-len")
    return fit, f"{args.data} (the first {args.pairs} pairs with a prompt of <= {args.max_len // 2} tokens)"


def common(args, device, model_dir: str) -> dict:
    """The figures both runs report about the model and the workload."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return {"model": f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                     f"{config.num_attention_heads} heads, ffn {config.intermediate_size}, vocab {config.vocab_size}"
                     f"{', untied head' if not config.tie_word_embeddings else ''}",
            "device": str(device) if device.type != "cuda" else __import__("torch").cuda.get_device_name(device),
            "threads": __import__("torch").get_num_threads(),
            "batch": args.batch, "micro_batch": args.micro_batch, "max_len": args.max_len,
            "warmup": args.warmup, "steps": args.steps}


def figures(tokens: list, responses: list, times: list, losses: list) -> dict:
    seconds = sum(times)
    return {"tokens_per_step": sum(tokens) / len(tokens), "response_tokens_per_step": sum(responses) / len(responses),
            "s_per_step": seconds / len(times), "tokens_per_s": sum(tokens) / seconds,
            "loss_first": losses[0], "loss_last": losses[-1]}


# ---- ours: rlhf dpo's own step ----------------------------------------------------------------------------------

def ours_bench(args) -> dict:
    import torch

    from rlhf_cli.config.schemas import DataConfig, DPOAlgoConfig, DPOConfig, DPOModelConfig, DPOTrainConfig
    from rlhf_cli.engine import batches, device as dev, train
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.engine.recording import MetricsLog
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.stages import dpo

    quiet_transformers()
    runtime = rss_mib()  # the runtime's resident set, before any model
    model_dir = args.model_dir
    total = args.warmup + args.steps
    packing = {"auto": "auto", "true": True, "false": False}[args.packing]
    with train.process(args.device, args.precision) as (d, device), \
            tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        cfg = DPOConfig(model=DPOModelConfig(name_or_path=model_dir),
                        data=DataConfig(path=args.data, max_seq_len=args.max_len, packing=packing),
                        train=DPOTrainConfig(max_steps=total, examples_per_step=args.batch,
                                             micro_batch_size=args.micro_batch, device=args.device,
                                             precision=args.precision),
                        dpo=DPOAlgoConfig(precompute_reference=args.precompute), seed=args.seed)
        cfg.data.validate()
        cfg.dpo.validate()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        policy, tokenizer, packing_text = dpo.load_policy(cfg, dpo.Upstream(model_dir, model_dir, []), d, device)
        rows, source = load_pairs(args, tokenizer)
        train_set, _, truncated = dpo.tokenize(cfg, rows, [], tokenizer, source)
        reference = dpo.Reference(cfg, model_dir, policy, device, d)
        if cfg.dpo.precompute_reference:  # one pass over every pair, then the reference model is let go
            reference.precompute(train_set, tokenizer.pad_token_id)
        train_policy = train.wrap_for_training(policy, d, device, cfg.train)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.optim)
        training = train.Training(params, optimizer, build_scheduler(optimizer, cfg.optim, total),
                                  cfg.optim.max_grad_norm, Guard("dpo", Path(tmp) / "no-checkpoints", cfg.optim.lr),
                                  MetricsLog(Path(tmp), False, None), {})
        loaded = memory_now(device)
        tokens, responses, times, losses = [], [], [], []
        for step in range(total):
            sync(device)
            t0 = time.perf_counter()
            examples = batches.step_examples(train_set, step, cfg.train.examples_per_step, cfg.seed)
            metrics, n_response = dpo.train_step(train_policy, reference, examples, tokenizer.pad_token_id,
                                                 training, step, cfg, d, device)  # reads its sums: one sync
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens.append(sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples))
                responses.append(n_response)
                losses.append(metrics["loss"])
        return {"trainer": "rlhf dpo", **common(args, device, model_dir),
                "parameters_m": sum(p.numel() for p in policy.parameters()) / 1e6,
                "precision": dev.precision(device),
                "reference": "log-probs precomputed, not held" if reference.precomputed else "held",
                "precompute": cfg.dpo.precompute_reference, "layout": packing_text,
                "pairs": f"{len(train_set)} ({truncated} truncated)",
                **figures(tokens, responses, times, losses),
                "memory_unit": "cuda allocated" if device.type == "cuda" else "rss",
                **({} if device.type == "cuda" else {"runtime_mib": runtime}),
                "after_loading_mib": loaded, "peak_mib": memory_peak(device), "torch": torch.__version__}


# ---- TRL's DPOTrainer on the same workload ----------------------------------------------------------------------

def trl_paths() -> None:
    """$BENCH_DPO_TRL_PATH's directories at the end of sys.path: a TRL installed apart is found, and nothing there
    shadows the environment's own packages."""
    for path in filter(None, os.environ.get(TRL_PATH, "").split(os.pathsep)):
        if path not in sys.path:
            sys.path.append(path)


def missing_trl(why: str) -> str:
    return (f"bench_dpo.py: --trl needs TRL's DPOTrainer, which {why}: `pip install trl` (tested with 1.16.0), or "
            f"`pip install --no-deps --target DIR trl==1.16.0` and {TRL_PATH}=DIR (or --trl-path DIR)")


def trl_found() -> str | None:
    """None when TRL can be found, else the one line that says it cannot."""
    trl_paths()
    try:
        found = importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else missing_trl("is not installed here")


def trl_bench(args) -> dict:
    trl_paths()
    try:
        import trl
        from trl import DPOConfig as TRLDPOConfig, DPOTrainer
    except Exception as e:  # noqa: BLE001 - an ImportError, or a dependency that breaks on import
        print(missing_trl(f"cannot be imported ({type(e).__name__}: {e})".replace("\n", " ")), file=sys.stderr)
        sys.exit(TRL_MISSING)
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from rlhf_cli.config.schemas import DPOAlgoConfig, DPOConfig
    from rlhf_cli.data.preference import render_pair
    from rlhf_cli.engine import device as dev
    from rlhf_cli.models.loading import quiet_transformers

    quiet_transformers()
    datasets.disable_progress_bars()
    runtime = rss_mib()
    device = dev.pick(args.device)
    dev.set_precision(args.precision)
    bf16 = dev.precision(device) == "bf16-autocast"
    ours = DPOConfig(dpo=DPOAlgoConfig())  # our defaults: beta, loss, optimizer
    model_dir = args.model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = load_pairs(args, tokenizer)
    texts = [render_pair(row, tokenizer) for row in rows]
    dataset = datasets.Dataset.from_dict({"prompt": [t[0] for t in texts], "chosen": [t[1] for t in texts],
                                          "rejected": [t[2] for t in texts]})
    total = args.warmup + args.steps

    class Clock(TrainerCallback):
        """perf_counter when training begins and at the end of every optimizer step."""
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            sync(device)
            self.ends.append(time.perf_counter())

    class Counting(DPOTrainer):
        """DPOTrainer, counting each training batch's non-pad and response tokens and its loss."""
        seen: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            if model.training:
                self.seen.append((int(inputs["attention_mask"].sum()), int(inputs["completion_mask"].sum()),
                                  float(loss.detach())))
            return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    o = ours.optim
    with tempfile.TemporaryDirectory(prefix="bench-dpo-trl-") as out:
        config = TRLDPOConfig(
            output_dir=out, use_cpu=device.type == "cpu", bf16=bf16, fp16=False,
            model_init_kwargs={"dtype": "float32"}, disable_dropout=True,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.batch // args.micro_batch,
            max_length=args.max_len, precompute_ref_log_probs=args.precompute, gradient_checkpointing=False,
            beta=ours.dpo.beta, loss_type=[ours.dpo.loss], learning_rate=o.lr, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
            lr_scheduler_type="cosine", warmup_steps=o.warmup_steps, max_steps=total, seed=args.seed,
            data_seed=args.seed, eval_strategy="no", logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0)
        clock = Clock()
        trainer = Counting(model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[clock])
        trainer.seen = []
        loaded = memory_now(device)
        trainer.train()
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    if len(steps) != total or len(trainer.seen) != total * (args.batch // args.micro_batch):
        raise RuntimeError(f"TRL took {len(steps)} optimizer steps and {len(trainer.seen)} micro-batches, expected "
                           f"{total} steps of {args.batch // args.micro_batch}")
    per_step = args.batch // args.micro_batch
    grouped = [trainer.seen[i * per_step:(i + 1) * per_step] for i in range(total)][args.warmup:]
    tokens = [sum(s[0] for s in g) for g in grouped]
    responses = [sum(s[1] for s in g) for g in grouped]
    losses = [sum(s[2] for s in g) / per_step for g in grouped]
    kept = len(trainer.train_dataset)
    return {"trainer": f"TRL {trl.__version__} DPOTrainer", **common(args, device, model_dir),
            "parameters_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "precision": "bf16-autocast" if bf16 else "fp32",
            "reference": "log-probs precomputed, not held" if args.precompute else "held",
            "precompute": args.precompute, "layout": "padded rows (its padding_free needs FlashAttention)",
            "pairs": f"{kept} ({len(rows) - kept} dropped: prompt >= max_length)",
            **figures(tokens, responses, steps[args.warmup:], losses),
            "memory_unit": "cuda allocated" if device.type == "cuda" else "rss",
            **({} if device.type == "cuda" else {"runtime_mib": runtime}),
            "after_loading_mib": loaded, "peak_mib": memory_peak(device), "torch": torch.__version__}


# ---- the runs, one process each, and the table ------------------------------------------------------------------

@contextmanager
def cache_dir():
    """$RLHF_CLI_CACHE (kept), else a temporary directory removed at the end."""
    if os.environ.get("RLHF_CLI_CACHE"):
        yield os.environ["RLHF_CLI_CACHE"]
        return
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        yield tmp


def build_model(args, cache: str) -> str:
    from rlhf_cli.models.tiny import tiny_model_path

    return str(tiny_model_path(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                               intermediate_size=args.ffn, max_position_embeddings=max(256, args.max_len),
                               seed=args.seed, cache_dir=cache, vocab_size=args.vocab_size,
                               tie_word_embeddings=False))


def child_argv(args, who: str, model_dir: str, precompute: bool) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", who, "--model-dir", model_dir,
            "--data", args.data, "--pairs", str(args.pairs), "--batch", str(args.batch),
            "--micro-batch", str(args.micro_batch), "--max-len", str(args.max_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--packing", args.packing, "--precision", args.precision,
            "--device", args.device, "--seed", str(args.seed), *([] if precompute else ["--no-precompute"])]


def run_child(cmd: list[str]) -> tuple[dict | None, str | None]:
    """(its figures, None), or (None, why it failed: the TRL line, or its error's tail)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == TRL_MISSING:
        return None, (proc.stderr.strip().splitlines() or ["TRL cannot be imported"])[-1]
    if proc.returncode:
        return None, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


ROWS = (  # (label, key, format)
    ("parameters", "parameters_m", "{:.2f}M"),
    ("device", "device", "{}"),
    ("threads", "threads", "{}"),
    ("precision", "precision", "{}"),
    ("reference", "reference", "{}"),
    ("layout", "layout", "{}"),
    ("pairs", "pairs", "{}"),
    ("pairs/step (micro-batch)", None, None),
    ("steps", None, None),
    ("tokens/step (non-pad, both sides)", "tokens_per_step", "{:,.0f}"),
    ("response tokens/step", "response_tokens_per_step", "{:,.0f}"),
    ("seconds/step", "s_per_step", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("peak memory", "peak_mib", "{:,.0f} MiB"),
    ("after loading", "after_loading_mib", "{:,.0f} MiB"),
    ("runtime (before any model)", "runtime_mib", "{:,.0f} MiB"),
    ("loss first -> last", None, None),
)


def cell(row: dict, label: str, key: str | None, fmt: str | None) -> str:
    if label.startswith("pairs/step"):
        return f"{row['batch']} ({row['micro_batch']})"
    if label == "steps":
        return f"{row['steps']} timed (+{row['warmup']} warmup)"
    if label.startswith("loss"):
        return f"{row['loss_first']:.4f} -> {row['loss_last']:.4f}"
    return fmt.format(row[key]) if key in row else "-"


def column(row: dict) -> str:
    return f"{row['trainer']}\n{'precomputed reference' if row['precompute'] else 'reference held'}"


def show(runs: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("figure", no_wrap=True)
    for run in runs:
        table.add_column(column(run), justify="right")
    kind = "cuda allocated" if runs[0]["memory_unit"] != "rss" else "RSS"
    for label, key, fmt in ROWS:
        if key is None or any(key in r for r in runs):
            shown = f"{label} ({kind})" if key in ("peak_mib", "after_loading_mib", "runtime_mib") else label
            table.add_row(shown, *[cell(r, label, key, fmt) for r in runs])
    Console(highlight=False, width=None if sys.stdout.isatty() else 44 + 34 * len(runs)).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = ours_bench(args) if args.child == "ours" else trl_bench(args)
        print(json.dumps(result))
        return 0
    trl_note = trl_found() if args.trl else None
    plan = [("ours", True), ("ours", False)] if args.memory else [("ours", args.precompute)]
    if args.trl and trl_note is None:
        plan += [("trl", True), ("trl", False)] if args.memory else [("trl", args.precompute)]
    runs, status = [], 0
    with cache_dir() as cache:
        model_dir = build_model(args, cache)
        for who, precompute in plan:  # one after another, each in a process of its own
            run, why = run_child(child_argv(args, who, model_dir, precompute))
            if run is not None:
                runs.append(run)
            elif who == "trl" and not why.startswith("Traceback") and "\n" not in why.strip():
                trl_note = why  # TRL cannot be imported: one line, ours still shown
                break
            else:
                sys.stderr.write(why)
                status = 1
                if who == "ours":
                    return status
    if args.json:
        print(json.dumps(runs))
    else:
        print(f"model: random Llama, {runs[0]['model']}; data: the first {args.pairs} pairs of {args.data} with a "
              f"prompt of <= {args.max_len // 2} tokens; max length {args.max_len}")
        show(runs, "DPO training step: " + ("peak memory, reference precomputed vs held" if args.memory
                                            else "throughput"))
        summary(runs)
    if trl_note:
        print(trl_note)
    return status


def summary(runs: list[dict]) -> None:
    ours = [r for r in runs if r["trainer"] == "rlhf dpo"]
    trl = [r for r in runs if r["trainer"] != "rlhf dpo"]
    for a, b in zip(ours, trl):
        if a["precompute"] == b["precompute"]:
            print(f"tokens/s ({'precomputed' if a['precompute'] else 'held'} reference): ours "
                  f"{a['tokens_per_s']:,.0f}, TRL {b['tokens_per_s']:,.0f}: ours / TRL = "
                  f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x; peak memory ours {a['peak_mib']:,.0f} MiB, "
                  f"TRL {b['peak_mib']:,.0f} MiB")
    for name, side in (("ours", ours), ("TRL", trl)):
        pre = next((r for r in side if r["precompute"]), None)
        held = next((r for r in side if not r["precompute"]), None)
        if pre and held:
            print(f"peak memory {name}: precomputed reference {pre['peak_mib']:,.0f} MiB, held "
                  f"{held['peak_mib']:,.0f} MiB (held - precomputed = {held['peak_mib'] - pre['peak_mib']:+,.0f} MiB);"
                  f" tokens/s {pre['tokens_per_s']:,.0f} vs {held['tokens_per_s']:,.0f}")


if __name__ == "__main__":
    sys.exit(main())
