"""The training core without Ray: seeding, the DeepSpeed config, checks before workers start,
checkpoint markers, the worker-error mapping, and DDP/DeepSpeed steps in fp32 and bf16 on CPU
(one process, a world-size-1 gloo group)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.config.thor import UNetConfig
from meddiff.errors import ConfigError, DataError, ModelError
from meddiff.training import (
    WorkerContext,
    check_resume,
    check_training,
    deepspeed_config,
    latest_checkpoint,
    make_strategy,
    marker_info,
    step_generator,
)
from meddiff.training.checkpoints import MARKER, complete_step
from meddiff.training.driver import worker_user_error

# A THOR UNet small enough for a few CPU steps (any module would do: the core imports none).
SMALL = UNetConfig(
    image_size=16, channels=(8, 16), attention_levels=(False, True), norm_groups=8,
    num_head_channels=8,
)  # fmt: skip
# bf16 keeps 8 bits of mantissa: per-step losses of the same run differ from fp32 by well under
# 5 % (measured: < 0.5 %, see docs/training.md); the bound leaves room for other CPUs' kernels.
BF16_REL_TOL = 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_step_generator_is_a_function_of_seed_rank_and_step():
    draw = lambda *a: torch.randn(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 1, 7), draw(0, 1, 7))
    # No collisions between neighbouring (seed, rank, step), unlike seed*1000+rank schemes.
    draws = {tuple(draw(s, r, k).tolist()) for s in (0, 1) for r in (0, 1, 1000) for k in (0, 1)}
    assert len(draws) == 12


def test_deepspeed_config_carries_stage_precision_and_clipping():
    c = deepspeed_config(micro_batch=4, zero_stage=2, precision="bf16", grad_clip=1.0, cuda=False)
    assert c["zero_optimization"]["stage"] == 2 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["gradient_clipping"] == 1.0 and c["zero_optimization"]["overlap_comm"] is False
    c = deepspeed_config(micro_batch=4, zero_stage=0, precision="fp16", grad_clip=None, cuda=True)
    assert c["fp16"] == {"enabled": True, "loss_scale": 0} and "gradient_clipping" not in c


def test_impossible_precision_or_strategy_is_a_config_error_on_the_driver(monkeypatch):
    cfg = load_config("tiny")
    fp16 = cfg.thor.train.model_copy(update={"precision": "fp16"})
    with pytest.raises(ConfigError, match="thor.train.precision=fp16 needs GPUs"):
        check_training(fp16, use_gpu=False, section="thor.train")
    assert check_training(fp16, use_gpu=True, section="thor.train") == "fp16"
    assert check_training(cfg.synthesis.train, use_gpu=True, section="s") == "bf16"  # auto
    assert check_training(cfg.synthesis.train, use_gpu=False, section="s") == "fp32"

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a)
    )
    ds = cfg.thor.train.model_copy(update={"strategy": "deepspeed"})
    with pytest.raises(ConfigError, match="deepspeed package is not installed.*strategy=ddp"):
        check_training(ds, use_gpu=False, section="thor.train")


def _write_checkpoint(run_dir, step, t, model_config, *, world=1, precision="fp32", marker=True):
    d = run_dir / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    if marker:
        for rank in range(world):
            (d / f"meddiff_rank{rank}.json").write_text(json.dumps({"step": step}))
        info = marker_info(t, world=world, precision=precision, model_config=model_config)
        (d / MARKER).write_text(json.dumps({**info, "step": step}))
    return d


def test_a_checkpoint_is_complete_only_with_every_ranks_part(tmp_path):
    t = load_config("tiny").thor.train
    two = _write_checkpoint(tmp_path, 2, t, {}, world=2)
    four = _write_checkpoint(tmp_path, 4, t, {}, world=2)
    assert complete_step(four) == 4 and latest_checkpoint(tmp_path) == four
    (four / "meddiff_rank1.json").unlink()  # rank 1's part never arrived
    assert complete_step(four) is None and latest_checkpoint(tmp_path) == two


def test_checkpoints_on_an_object_store_are_found_resumed_and_counted(bucket, tmp_path):
    from meddiff import storage
    from meddiff.training.checkpoints import _local
    from meddiff.training.context import STARTS

    t = load_config("tiny").thor.train
    run = "s3://bkt/out/ray/thor-train"
    assert latest_checkpoint(run) is None  # nothing there yet
    _write_checkpoint(bucket / "out/ray/thor-train", 2, t, {}, world=2)
    four = _write_checkpoint(bucket / "out/ray/thor-train", 4, t, {}, world=2)
    (four / "meddiff_rank1.json").unlink()  # rank 1's part never arrived
    found = latest_checkpoint(run)
    assert found == f"{run}/checkpoint_00000002"
    with _local(found) as d:  # what a restarted worker loads: a local copy
        assert d.is_dir() and d != bucket and complete_step(d) == 2
    assert not d.exists()  # removed after use
    for pid in (1, 2):  # what rank 0 of each worker-group start writes
        storage.append_line(f"{run}/{STARTS}", json.dumps({"pid": pid}))
    assert WorkerContext.starts(run) == 2
    lines = (bucket / "out/ray/thor-train" / STARTS).read_text().splitlines()
    assert [json.loads(line)["pid"] for line in lines] == [1, 2]


def test_resume_checks_architecture_and_zero_layout_before_workers_start(tmp_path):
    cfg = load_config("tiny")
    t, model = cfg.thor.train, cfg.thor.model.model_dump(mode="json")
    kw = dict(section="thor.train", model_section="thor.model", world=1, precision="fp32",
              fresh="rerun with --fresh to start over")  # fmt: skip
    assert check_resume(tmp_path, t, model_config=model, **kw) is None  # nothing to resume
    _write_checkpoint(tmp_path, 2, t, model)
    unfinished = _write_checkpoint(tmp_path, 4, t, {"channels": [1]}, marker=False)
    # The newest *complete* checkpoint is the one compared (and resumed).
    assert latest_checkpoint(tmp_path).name == "checkpoint_00000002"
    assert check_resume(tmp_path, t, model_config=model, **kw).name == "checkpoint_00000002"
    wider = {**model, "channels": [64, 128, 128]}
    with pytest.raises(ConfigError) as err:
        check_resume(tmp_path, t, model_config=wider, **kw)
    msg = str(err.value)
    assert "\n" not in msg and "thor.model.channels=[32, 64, 64] (this run: [64, 128, 128])" in msg
    assert msg.endswith("or rerun with --fresh to start over")
    assert unfinished.name not in msg

    ds = t.model_copy(update={"strategy": "deepspeed", "zero_stage": 2})
    _write_checkpoint(tmp_path / "ds", 2, ds, model, world=2, precision="bf16")
    with pytest.raises(ConfigError, match="ZeRO-2 bf16 partitions of 2 workers"):
        check_resume(tmp_path / "ds", ds, model_config=model, **kw)  # world 1, fp32


def test_worker_errors_are_found_through_every_ray_wrapper():
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    bad = DataError("shard-00003.parquet: truncated")
    wrapped = UserExceptionWithTraceback(bad, "Traceback ...")
    assert worker_user_error(WorkerGroupError("rank 1 failed", {1: wrapped})) is bad
    assert worker_user_error(ControllerError(bad)) is bad
    assert worker_user_error(WorkerGroupError("oom", {0: MemoryError()})) is None


def test_the_controller_callback_stops_on_user_errors_only():
    """Raised in Ray Train's controller, the error becomes a ControllerError, which the failure
    policy never retries; a crash passes through (and is retried up to max_failures)."""
    import ray.cloudpickle
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from meddiff.training.driver import _stop_callback

    callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(_stop_callback()))  # as shipped
    bad = DataError("shard-00003.parquet: truncated")
    with pytest.raises(DataError, match="shard-00003"):
        callback.after_exception(None, {1: UserExceptionWithTraceback(bad, "Traceback ...")})
    callback.after_exception(None, {0: MemoryError()})
    # What the core relies on in Ray Train: a controller error of that kind is raised, not retried.
    from ray.train import ControllerError, FailureConfig
    from ray.train.v2._internal.execution.failure_handling import (
        FailureDecision,
        create_failure_policy,
    )

    policy = create_failure_policy(FailureConfig(max_failures=3))
    assert policy.make_decision(ControllerError(bad)) == FailureDecision.RAISE


# --- strategies on CPU ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as Ray Train sets up for each worker."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _train(tmp_path, strategy: str, precision: str, steps: int, *, resume_from=None, save_at=None):
    """``steps`` THOR-style ε-prediction steps; returns the losses (and saves at ``save_at``)."""
    from meddiff.thor.unet import DiffusionUNet

    t = load_config(
        "tiny",
        overrides=[f"thor.train.strategy={strategy}", f"thor.train.precision={precision}",
                   "thor.train.zero_stage=1"],
    ).thor.train  # fmt: skip
    ctx = WorkerContext(rank=0, world=1, device=torch.device("cpu"), run_dir=tmp_path, seed=0)
    torch.manual_seed(0)
    unet = DiffusionUNet(SMALL)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    strat = make_strategy(t, ctx, unet, opt, sched, micro_batch=4, grad_clip=1.0)
    start = 0
    if resume_from is not None:
        strat.load(resume_from)
        start = json.loads((resume_from / "step.json").read_text())
    losses = []
    x0 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for step in range(start, steps):
        gen = ctx.generator(step)
        tt = torch.randint(0, 1000, (4,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = 0.7 * x0 + 0.7 * eps  # a fixed mix: the loss, not the schedule, is under test
        with strat.autocast():
            pred = strat.model(x_t, tt)
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        strat.step(loss)
        losses.append(float(loss.detach()))
        if save_at == step + 1:
            d = tmp_path / f"{strategy}-{precision}"
            d.mkdir(parents=True, exist_ok=True)
            strat.save(d, 0)
            (d / "step.json").write_text(json.dumps(step + 1))
    weights = strat.fp32_state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    return np.array(losses), strat


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_bf16_trains_close_to_fp32_and_its_checkpoint_resumes(strategy, process_group, tmp_path):
    fp32, _ = _train(tmp_path, strategy, "fp32", 4)
    bf16, strat = _train(tmp_path, strategy, "bf16", 4, save_at=2)
    if strategy == "ddp":  # autocast over fp32 master weights
        assert next(strat.module.parameters()).dtype == torch.float32
    else:  # DeepSpeed's bf16 engine: bf16 weights, inputs cast to bf16 by the core
        assert next(strat.module.parameters()).dtype == torch.bfloat16
    assert np.isfinite(bf16).all()
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_REL_TOL)
    print(f"{strategy}: fp32 {fp32.round(5).tolist()} bf16 {bf16.round(5).tolist()}")
    # Resuming the step-2 bf16 checkpoint repeats steps 3 and 4 of the uninterrupted run.
    resumed, _ = _train(tmp_path, strategy, "bf16", 4, resume_from=tmp_path / f"{strategy}-bf16")
    np.testing.assert_allclose(resumed, bf16[2:], rtol=1e-5)


def test_a_checkpoint_of_another_architecture_is_a_model_error(process_group, tmp_path):
    _train(tmp_path, "ddp", "fp32", 1, save_at=1)
    from meddiff.thor.unet import DiffusionUNet

    ctx = WorkerContext(rank=0, world=1, device=torch.device("cpu"), run_dir=tmp_path, seed=0)
    wide = DiffusionUNet(SMALL.model_copy(update={"channels": (16, 32), "norm_groups": 8}))
    opt = torch.optim.Adam(wide.parameters())
    strat = make_strategy(load_config("tiny").thor.train, ctx, wide, opt, micro_batch=4,
                          grad_clip=None)  # fmt: skip
    with pytest.raises(ModelError, match="does not fit this model"):
        strat.load(tmp_path / "ddp-fp32")


def _sized_checkpoint(run_dir, step, t, size=100):
    d = _write_checkpoint(run_dir, step, t, {})
    (d / "trainer_state.pt").write_bytes(b"x" * size)
    record = {"step": step, "sizes": {"trainer_state.pt": size}}
    (d / "meddiff_rank0.json").write_text(json.dumps(record))
    return d


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_good_one(tmp_path, caplog):
    """A file truncated after it was stored would fail every restart's load (and the advised
    rerun): its checkpoint is skipped with a warning, the previous one is resumed from."""
    import logging

    t = load_config("tiny").thor.train
    two, four = _sized_checkpoint(tmp_path, 2, t), _sized_checkpoint(tmp_path, 4, t)
    assert latest_checkpoint(tmp_path) == four
    (four / "trainer_state.pt").write_bytes(b"x" * 10)
    with caplog.at_level(logging.WARNING, logger="meddiff.training.checkpoints"):
        assert latest_checkpoint(tmp_path) == two
        kw = dict(section="thor.train", model_section="thor.model", world=1, precision="fp32",
                  fresh="rerun with --fresh")  # fmt: skip
        assert check_resume(tmp_path, t, model_config={}, **kw) == two
    assert f"{four} is damaged (trainer_state.pt is 10 bytes, rank 0 stored 100 bytes)" in (
        caplog.text
    )
    (two / "trainer_state.pt").unlink()
    assert latest_checkpoint(tmp_path) is None  # nothing good left: a fresh start


def test_a_finished_run_is_complete_and_more_steps_go_on(tmp_path):
    from meddiff.training import finished_run

    t = load_config("tiny").thor.train
    summary = tmp_path / "train_summary.json"
    _sized_checkpoint(tmp_path / "ray", 4, t)
    assert finished_run(summary, tmp_path / "ray", 4) is None  # no summary: not finished
    summary.write_text(json.dumps({"steps": 4, "model_uri": "models:/m/1"}))
    done = finished_run(summary, tmp_path / "ray", 4)
    assert done == {"steps": 4, "model_uri": "models:/m/1", "already_complete": True}
    assert finished_run(summary, tmp_path / "ray", 6) is None  # more steps: train on


def test_a_summary_written_before_the_shared_schema_reads_under_the_new_names(tmp_path):
    from meddiff.training import finished_run, read_summary

    old = {"steps": 4, "loss": 0.25, "run_id": "abc", "registered": "models:/thor-ddpm/3"}
    summary = tmp_path / "train_summary.json"
    summary.write_text(json.dumps(old))
    assert read_summary(summary) == {
        "steps": 4,
        "final_loss": 0.25,
        "mlflow_run_id": "abc",
        "model_uri": "models:/thor-ddpm/3",
        "registered_model": "thor-ddpm",
        "version": "3",
    }
    _sized_checkpoint(tmp_path / "ray", 4, load_config("tiny").thor.train)
    assert finished_run(summary, tmp_path / "ray", 4)["mlflow_run_id"] == "abc"
    new = {"steps": 4, "final_loss": 0.5, "mlflow_run_id": "x", "model_uri": None}
    summary.write_text(json.dumps(new))
    assert read_summary(summary) == new  # the current schema is read as written


def test_a_training_task_reads_its_settings_from_the_sections_it_names():
    from meddiff.synthesis.train import SynthesisTraining
    from meddiff.thor.train import ThorTraining

    cfg = load_config("tiny")
    thor, synth = ThorTraining(cfg, "data"), SynthesisTraining(cfg, "pairs")
    assert thor.settings is cfg.thor.train and synth.settings is cfg.synthesis.train
    assert thor.model_config() == cfg.thor.model.model_dump(mode="json")
    assert synth.model_config()["resolution"] == cfg.synthesis.model.resolution
