"""The training scaffold in engine/train.py (and the typed rollout's helpers): each piece on its own."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import torch

from rlhf_cli.config import OptimConfig, SFTConfig, TrainConfig
from rlhf_cli.engine import checkpoint, dist, train
from rlhf_cli.engine.rollout import Rollout, constants
from rlhf_cli.engine.rundir import RunPlan


def test_due_at_every_nth_step_and_at_the_last():
    assert [s for s in range(1, 11) if train.due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 7) if train.due(s, 1, 6)] == [1, 2, 3, 4, 5, 6]
    assert [s for s in range(1, 6) if train.due(s, 100, 5)] == [5]


def test_micro_batches_cover_the_items_in_order_and_flag_the_last():
    chunks = list(train.micro_batches(list(range(10)), 4))
    assert chunks == [([0, 1, 2, 3], False), ([4, 5, 6, 7], False), ([8, 9], True)]
    rows = torch.tensor([5, 2, 7, 1])
    got = list(train.micro_batches(rows, 2))
    assert [c.tolist() for c, _ in got] == [[5, 2], [7, 1]] and [last for _, last in got] == [False, True]
    assert list(train.micro_batches([], 3)) == []


class _Syncing(torch.nn.Linear):
    """A module with DDP's no_sync, counting how often it is entered."""

    def __init__(self):
        super().__init__(2, 2)
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


def test_micro_step_skips_gradient_sync_except_on_the_last_micro_batch():
    a, b, plain = _Syncing(), _Syncing(), torch.nn.Linear(2, 2)
    for _, last in train.micro_batches(list(range(6)), 2):
        with train.micro_step([a, b, plain], last, torch.device("cpu")):
            pass
    assert a.entered == 2 and b.entered == 2  # the first two of three micro-batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrap_for_training_is_the_model_itself_in_one_process_and_ddp_under_a_process_group(monkeypatch):
    model = torch.nn.Linear(3, 1)
    assert train.wrap_for_training(model, dist.Dist(), torch.device("cpu"), TrainConfig()) is model
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = train.wrap_for_training(model, dist.Dist(rank=0, world_size=2), torch.device("cpu"), TrainConfig())
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is model
        with train.micro_step([wrapped], False, torch.device("cpu")):
            assert not wrapped.require_backward_grad_sync
        with train.micro_step([wrapped], True, torch.device("cpu")):
            assert wrapped.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()


def test_process_yields_one_rank_on_the_cpu_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with train.process("cpu") as (d, device):
        assert d == dist.Dist() and device == torch.device("cpu")


def test_main_first_loads_once_per_process():
    calls = []
    assert train.main_first(dist.Dist(), lambda x, y=0: calls.append((x, y)) or x + y, 2, y=3) == 5
    assert calls == [(2, 3)]


def test_all_sum_named_keeps_the_names_in_one_process():
    assert dist.all_sum_named(dist.Dist(), {"n": 4.0, "score": 1.5}, torch.device("cpu")) == {"n": 4.0, "score": 1.5}


def _start(tmp_path: Path, lr: float, resume_from: Path | None = None, max_skipped: int = 0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = SFTConfig(run_dir=str(tmp_path), optim=OptimConfig(lr=lr, warmup_steps=0, schedule="linear"))
    cfg.train.max_skipped_steps = max_skipped
    plan = RunPlan(tmp_path, tmp_path, resume_from, None)
    return model, cfg, plan, train.start(plan, cfg, {"model": model}, 10, dist.Dist(), restore_rng=False)


def test_start_steps_checkpoints_and_resumes_with_the_configs_lr(tmp_path):
    model, cfg, plan, training = _start(tmp_path, lr=0.1)
    assert training.resumed == {} and training.lr == pytest.approx(0.1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    assert train.take_step(training, 1, 0.5) > 0 and not torch.equal(model.weight, before)
    factor = 1 - (1 - cfg.optim.min_lr_ratio) * 1 / 10  # linear decay over 10 steps, one taken
    assert model.weight.grad is None and training.lr == pytest.approx(0.1 * factor)
    training.log.log(1, {"loss": 0.5})
    training.log.log(2, {"loss": 0.4})  # logged after the checkpoint below: a resume drops it
    train.save_checkpoint(dist.Dist(), plan.checkpoints, 1, {"model": model}, training, {"last": {"loss": 0.5}},
                          cfg, "abc")
    saved = checkpoint.verify(plan.checkpoints / "step-1", "full")
    assert saved["step"] == 1 and saved["data_sha256"] == "abc" and saved["last"] == {"loss": 0.5}
    assert saved["skipped_steps"] == 0 and saved["config"]["run_dir"] == str(tmp_path)

    fresh, _, _, resumed = _start(tmp_path, lr=0.01, resume_from=plan.checkpoints / "step-1")
    assert resumed.resumed["step"] == 1 and resumed.resumed["last"] == {"loss": 0.5}
    assert torch.equal(fresh.weight, model.weight)
    assert resumed.scheduler.last_epoch == 1 and resumed.lr == pytest.approx(0.01 * factor)  # the new config's lr
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"step": 1' in rows[0]


def test_take_step_drops_a_nonfinite_update_within_the_skip_budget(tmp_path):
    model, _, _, training = _start(tmp_path, lr=0.1, max_skipped=1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    assert train.take_step(training, 1, float("nan")) is None
    assert torch.equal(model.weight, before) and training.guard.skipped == 1 and model.weight.grad is None


def test_save_checkpoint_writes_nothing_on_other_ranks(tmp_path, monkeypatch):
    model, cfg, plan, training = _start(tmp_path, lr=0.1)
    monkeypatch.setattr(dist, "barrier", lambda d: None)
    train.save_checkpoint(dist.Dist(rank=1, world_size=2), plan.checkpoints, 1, {"model": model}, training, {}, cfg,
                          "abc")
    assert not plan.checkpoints.exists()


def test_rollout_constants_leave_inference_mode():
    with torch.inference_mode():
        t = torch.ones(2, 3)
        roll = Rollout(prompt=t.long(), prompt_mask=t.long(), response=t.long(), mask=t, ended=t[:, 0].bool(),
                       input_ids=t.long(), attention_mask=t.long(), logprobs=t, ref_logprobs=t, values=t,
                       scores=t[:, 0], prompt_text=["a", "b"], response_text=["c", "d"])
    with pytest.raises(RuntimeError):
        (torch.ones(2, 3, requires_grad=True) * roll.values).sum().backward()
    usable = constants(roll)
    w = torch.ones(2, 3, requires_grad=True)
    (w * usable.values).sum().backward()
    assert torch.equal(w.grad, torch.ones(2, 3)) and usable.prompt_text == ["a", "b"]
    assert not usable.values.is_inference() and torch.equal(usable.scores, roll.scores)


def test_step_plan_holds_the_batch_arithmetic_and_prints_it():
    from rlhf_cli.config import SFTTrainConfig
    from rlhf_cli.engine import batches

    t = SFTTrainConfig(examples_per_step=16, micro_batch_size=4, epochs=1.5)
    steps = batches.step_plan(t, 100, world_size=2)  # 100 // 16 = 6 steps per epoch
    assert (steps.grad_accum, steps.total, steps.per_epoch) == (2, 9, 6)
    assert steps.describe(t, 2, " pairs") == ("batch: examples_per_step 16 pairs = micro_batch_size 4 x "
                                              "grad_accum_steps 2 x world_size 2; 9 steps = 1.50 epochs of 6 steps")
    t = SFTTrainConfig(examples_per_step=24, micro_batch_size=16, max_steps=5)  # 16 does not divide 24: 12 does
    steps = batches.step_plan(t, 100, world_size=1)
    assert (steps.micro, steps.grad_accum) == (12, 2)
    assert steps.describe(t, 1) == ("batch: examples_per_step 24 = micro_batch_size 12 (of at most 16) x "
                                    "grad_accum_steps 2 x world_size 1; 5 steps = 1.25 epochs of 4 steps")


@pytest.mark.parametrize("examples,world_size,upper,split", [
    (32, 1, 32, (32, 1)),  # the defaults on one process: as before
    (32, 2, 32, (16, 1)),  # the README's DDP line: each process's 16 in one micro-batch
    (24, 1, 16, (12, 2)),
    (16, 2, 4, (4, 2)),
    (14, 2, 4, (1, 7)),    # 7 per process: only 1 divides it below 4
])
def test_the_micro_batch_is_the_largest_up_to_the_bound_that_divides_each_share(examples, world_size, upper, split):
    from rlhf_cli.engine import batches

    assert batches.split_step(examples, world_size, upper) == split


def test_a_step_that_does_not_split_over_the_processes_is_refused():
    from rlhf_cli.engine import batches
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.examples_per_step=30 does not split evenly over world_size=4 "):
        batches.split_step(30, 4, 32)
    with pytest.raises(ConfigError, match="world_size=4"):
        batches.split_step(2, 4, 32)  # fewer examples than processes


def _loss_and_grads(model, checkpointing: bool, forward) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    wrapped = train.wrap_for_training(model, dist.Dist(), torch.device("cpu"),
                                     TrainConfig(gradient_checkpointing=checkpointing))
    wrapped.train()
    loss = forward(wrapped)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.models.reward import RewardModel
    from rlhf_cli.models.tiny import tiny_model_path

    path = tiny_model_path()
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    lm = lambda: AutoModelForCausalLM.from_pretrained(path)  # noqa: E731
    rm = lambda: RewardModel.from_backbone(str(path), AutoTokenizer.from_pretrained(path))  # noqa: E731
    cases = [(lm, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss),
             (rm, lambda m: m(ids, mask, per_token=True).pow(2).mean() + m(ids, mask).sum())]
    for build, forward in cases:
        torch.manual_seed(0)
        plain = build()
        torch.manual_seed(0)
        checkpointed = build()
        loss, grads = _loss_and_grads(plain, False, forward)
        loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, True, forward)
        layers = checkpointed.backbone.layers if hasattr(checkpointed, "backbone") else checkpointed.model.layers
        assert layers[0].gradient_checkpointing and not (plain.backbone if hasattr(plain, "backbone")
                                                         else plain.model).layers[0].gradient_checkpointing
        assert loss_ckpt == pytest.approx(loss, rel=1e-6) and grads.keys() == grads_ckpt.keys() and grads
        for name in grads:
            assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def test_gradient_checkpointing_on_a_model_without_it_is_a_config_error():
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="does not support gradient checkpointing"):
        train.wrap_for_training(torch.nn.Linear(2, 2), dist.Dist(), torch.device("cpu"),
                                TrainConfig(gradient_checkpointing=True))


def test_frozen_dtype_is_bf16_only_where_asked_or_on_capable_cuda():
    from rlhf_cli.engine.device import frozen_dtype

    cpu = torch.device("cpu")
    assert frozen_dtype("auto", cpu) == torch.float32
    assert frozen_dtype("bfloat16", cpu) == torch.bfloat16 and frozen_dtype("float32", cpu) == torch.float32
