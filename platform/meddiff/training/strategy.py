"""How a worker takes an optimisation step: DDP or DeepSpeed, in fp32, bf16 or fp16.

``precision`` means the same in every loop:

- ``fp32``: no autocast, fp32 weights.
- ``bf16``: with DDP, ``torch.autocast(bfloat16)`` over fp32 master weights (the optimizer never
  sees a bf16 tensor); with DeepSpeed, the engine keeps bf16 weights and fp32 master copies in its
  optimizer, and every floating-point input is cast to bf16 before the forward.
- ``fp16``: GPU only. DDP autocasts to float16 and scales the loss with ``torch.amp.GradScaler``;
  DeepSpeed keeps fp16 weights with its dynamic loss scaling, inputs cast to fp16.

A loop computes its loss with ``strategy.model`` (the wrapped module) inside
``strategy.autocast()``, in fp32 from the output (``pred.float()``), and calls
``strategy.step(loss)``; everything else (backward, loss scaling, clipping, the optimizer and
LR-schedule steps, zeroing gradients) happens here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from meddiff.errors import ConfigError, ModelError

STATE_FILE = "trainer_state.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def resolve_precision(precision: str, cuda: bool, path: str = "training") -> str:
    """``auto`` → ``bf16`` on CUDA; on a CPU what :func:`meddiff.precision.resolve` gives for
    ``path`` (bf16 where measured faster on a CPU with native bf16, else fp32); other values
    unchanged."""
    from meddiff import precision as amp

    return amp.resolve(precision, "cuda" if cuda else "cpu", path)


def deepspeed_config(
    *, micro_batch: int, zero_stage: int, precision: str, grad_clip: float | None, cuda: bool
) -> dict[str, Any]:
    """The one DeepSpeed config builder: ``micro_batch`` samples per worker per step, ZeRO
    ``zero_stage`` (0-2), ``precision`` fp32/bf16/fp16 (fp16 with dynamic loss scaling),
    gradient clipping at ``grad_clip`` (None: off)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": zero_stage,
            # Overlapping the gradient reduction with backward needs CUDA streams.
            "overlap_comm": cuda,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0: dynamic scaling (DeepSpeed's own; halves on overflow, skips the step).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        # Each loop's optimizer is torch's (AdamW/Adam, fused on GPU); ZeRO 0-2 handles it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    return config


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class Strategy:
    """One optimisation step over a wrapped module, and its part of a checkpoint.

    ``module`` is the bare module (for saving, sampling, EMA); ``model`` is what the loss calls;
    ``optimizer`` and ``scheduler`` are the ones that actually step.
    """

    name: str
    module: Any
    model: Any
    optimizer: Any
    scheduler: Any

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, loss) -> None:
        raise NotImplementedError

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, d: Path, rank: int) -> None:
        raise NotImplementedError

    def load(self, d: Path) -> None:
        raise NotImplementedError

    def fp32_state_dict(self) -> dict[str, Any]:
        """The module's weights on the CPU, floating-point ones in fp32 (what a saved model
        holds whatever the training precision)."""
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            for k, v in self.module.state_dict().items()
        }


class DDPStrategy(Strategy):
    """PyTorch DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU); a single
    worker trains the bare module."""

    name = "ddp"

    def __init__(self, ctx, module, optimizer, scheduler, *, precision: str, grad_clip):
        import torch
        import torch.distributed as dist

        self.ctx, self.module, self.optimizer, self.scheduler = ctx, module, optimizer, scheduler
        self.grad_clip = grad_clip
        self.dtype = _dtype(precision)
        self.model = module
        if dist.is_initialized() and ctx.world > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        # fp16's narrow range underflows small gradients: scale the loss up, unscale before
        # clipping, skip steps whose gradients overflowed (bf16 has fp32's range: no scaler).
        self.scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.dtype)

    def step(self, loss) -> None:
        import torch

        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        if self.scheduler is not None:
            return float(self.scheduler.get_last_lr()[0])
        return super().lr()

    def save(self, d: Path, rank: int) -> None:
        import torch

        if rank != 0:  # DDP keeps the ranks identical: one copy is the whole state
            return
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        torch.save(state, d / STATE_FILE)

    def load(self, d: Path) -> None:
        import torch

        path = d / STATE_FILE
        if not path.is_file():
            raise ModelError(f"checkpoint {d} has no {STATE_FILE} (not written by DDP training)")
        # Our own file: optimizer and schedule states hold plain Python objects too.
        state = torch.load(path, map_location=self.ctx.device, weights_only=False)
        with _not_fitting(d):
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


@contextlib.contextmanager
def _not_fitting(d: Path):
    """A state of other shapes (another architecture) as a one-line ModelError; the driver's
    :func:`~meddiff.training.driver.check_resume` normally refuses it before workers start."""
    try:
        yield
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"checkpoint {d} does not fit this model ({first})") from None


class _CastInputs:
    """Calls the DeepSpeed engine with every floating-point tensor argument cast to the engine's
    dtype (a bf16/fp16 engine holds bf16/fp16 weights and refuses fp32 inputs)."""

    def __init__(self, engine, dtype):
        self.engine, self.dtype = engine, dtype

    def _cast(self, value):
        import torch

        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(self.dtype)
        return value

    def __call__(self, *args, **kwargs):
        args = tuple(self._cast(a) for a in args)
        return self.engine(*args, **{k: self._cast(v) for k, v in kwargs.items()})


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 0-2 over the process group Ray Train set up."""

    name = "deepspeed"

    def __init__(
        self,
        ctx,
        module,
        optimizer,
        scheduler,
        *,
        precision: str,
        grad_clip,
        zero_stage: int,
        micro_batch: int,
    ):
        try:
            import deepspeed
        except ImportError as err:
            raise ConfigError(
                f"strategy=deepspeed but deepspeed cannot be imported ({err})"
            ) from None

        cuda = ctx.device.type == "cuda"
        if not cuda:
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its
            # comm backend starts (minutes with a C++ toolchain, a failure without one). It
            # serves only inference all-reduce, never training, so it is switched off; gloo does
            # the rest.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = deepspeed_config(
            micro_batch=micro_batch,
            zero_stage=zero_stage,
            precision=precision,
            grad_clip=grad_clip,
            cuda=cuda,
        )
        self.ctx = ctx
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.dtype = _dtype(precision)
        self.model = _CastInputs(self.engine, self.dtype) if self.dtype else self.engine

    def step(self, loss) -> None:
        self.engine.backward(loss)  # scales the loss in fp16
        self.engine.step()  # clips, steps the optimizer and the LR schedule, zeroes gradients

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, d: Path, rank: int) -> None:
        # Every rank writes its ZeRO partition; Ray Train merges the ranks' folders.
        self.engine.save_checkpoint(str(d / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, d: Path) -> None:
        if not (d / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir():
            raise ModelError(f"checkpoint {d} has no DeepSpeed state under deepspeed/state")
        with _not_fitting(d):
            path, _ = self.engine.load_checkpoint(
                str(d / DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if path is None:
            raise ModelError(f"checkpoint {d}: DeepSpeed could not load deepspeed/state")


def make_strategy(
    t,
    ctx,
    module,
    optimizer,
    scheduler=None,
    *,
    micro_batch: int,
    grad_clip: float | None,
) -> Strategy:
    """The strategy ``t.strategy`` (a :class:`~meddiff.config.training.TrainingSection`) over
    ``module`` (already on ``ctx.device``), in ``t.precision`` resolved for that device."""
    precision = resolve_precision(t.precision, ctx.device.type == "cuda", t.precision_path)
    if t.strategy == "deepspeed":
        return DeepSpeedStrategy(
            ctx,
            module,
            optimizer,
            scheduler,
            precision=precision,
            grad_clip=grad_clip,
            zero_stage=t.zero_stage,
            micro_batch=micro_batch,
        )
    return DDPStrategy(ctx, module, optimizer, scheduler, precision=precision, grad_clip=grad_clip)
