"""The Serve deployments and the application builders that Serve config files name.

Each service is two deployments: an ingress (the FastAPI app of :mod:`meddiff.serving.api`:
token, limits, encoding) and a model deployment that holds one runner and answers batches
(``@serve.batch``: one inferer or pipeline call per batch, a seed per item, so a result never
depends on what else is in the batch).

The model is the deployment's ``user_config`` (:class:`~meddiff.config.serving.ModelUserConfig`).
Serve calls ``reconfigure`` when it changes, and an alias (``models:/NAME@ALIAS``) is re-resolved
every ``refresh_s``; either way the new model is loaded beside the old one and swapped in when
ready, so requests in flight are answered by one version or the other, never failed.

Builders (``import_path`` in ``serve/*.yaml``): ``meddiff.serving.deployments:anomaly_app`` and
``meddiff.serving.deployments:synthesis_app``; each takes the application's ``args``
(:class:`~meddiff.config.serving.AppArgs`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from meddiff.config import Config, load_config
from meddiff.config.serving import AppArgs, ModelUserConfig
from meddiff.errors import MeddiffError
from meddiff.serving import auth
from meddiff.serving.api import Overloaded, build_anomaly_app, build_synthesis_app
from meddiff.serving.runners import load_runner
from meddiff.tracking.aliases import parse_ref, resolve

log = logging.getLogger(__name__)


def service_config(args: AppArgs) -> Config:
    """The meddiff config a service runs with (preset + overrides of its ``args``)."""
    return load_config(args.preset, None, list(args.set))


class _ModelHolder:
    """What both model deployments share: load, swap, re-resolve the alias, health, stats."""

    kind = ""

    def __init__(self, args: dict[str, Any]):
        import torch

        self.cfg = service_config(AppArgs.model_validate(args))
        self.runner = None
        self.user: ModelUserConfig | None = None
        self._swap = asyncio.Lock()
        self._watch: asyncio.Task | None = None
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        # One replica uses the CPUs Serve gave it (ray_actor_options.num_cpus), not every core.
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        user = ModelUserConfig.model_validate(user_config)
        if self.user is None or user.model != self.user.model or self.runner is None:
            await self._load(user.model)
        self.user = user
        self._set_batching(user)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        parsed = parse_ref(user.model)
        if parsed is not None and parsed[1] is not None and user.refresh_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._follow_alias())

    def _set_batching(self, user: ModelUserConfig) -> None:
        # Each subclass's ``_batch`` is its @serve.batch method; its size is set in place.
        self._batch.set_max_batch_size(user.max_batch_size)
        self._batch.set_batch_wait_timeout_s(user.batch_wait_timeout_s)

    async def _load(self, ref: str) -> None:
        """Load the new runner beside the old one, then swap (the old one keeps answering)."""
        async with self._swap:
            runner = await asyncio.to_thread(load_runner, self.kind, ref, self.cfg)
            old = None if self.runner is None else self.runner.model.version
            self.runner = runner
            log.info("%s model %s: version %s -> %s", self.kind, ref, old, runner.model.version)

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.user.refresh_s)
            try:
                now = await asyncio.to_thread(resolve, self.user.model, self.cfg.tracking)
                if now.version != self.runner.model.version:
                    await self._load(self.user.model)
            except Exception as err:  # keep serving the loaded version; say why it stayed
                log.warning("cannot follow %s: %s", self.user.model, err)

    def check_health(self) -> None:
        if self.runner is None:
            raise RuntimeError(f"{self.kind} model not loaded")

    async def info(self) -> dict[str, Any]:
        self.check_health()
        return self.runner.info()

    async def stats(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {"batches": len(sizes), "mean_batch_size": sum(sizes) / max(len(sizes), 1)}

    async def reset_stats(self) -> None:
        self.batch_sizes.clear()


@serve.deployment(name="AnomalyModel", max_ongoing_requests=16, max_queued_requests=64)
class AnomalyModel(_ModelHolder):
    kind = "anomaly"

    async def detect(self, image, seed: int) -> dict[str, Any]:
        return await self._batch(image, seed)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batch(self, images: list, seeds: list[int]) -> list[dict[str, Any]]:
        runner = self.runner  # one version answers the whole batch
        results = await asyncio.to_thread(runner.run, images, seeds)
        self.batch_sizes.append(len(images))
        info = runner.info()
        return [{**r.__dict__, "model": info} for r in results]


@serve.deployment(name="SynthesisModel", max_ongoing_requests=16, max_queued_requests=64)
class SynthesisModel(_ModelHolder):
    kind = "synthesis"

    async def prompts(self) -> list[dict[str, Any]]:
        self.check_health()
        return self.runner.prompts

    async def check_prompt(self, prompt: str) -> None:
        self.check_health()
        self.runner.check_prompt(prompt)

    async def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        return await self._batch(prompt, seed)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batch(self, prompts: list[str], seeds: list[int]) -> list[dict[str, Any]]:
        runner = self.runner
        images = await asyncio.to_thread(runner.run, prompts, seeds)
        self.batch_sizes.append(len(prompts))
        info = runner.info()
        return [
            {"image": img, "seed": s, "model": info} for img, s in zip(images, seeds, strict=True)
        ]


class HandleBackend:
    """The ingress's view of a model deployment: a Serve handle whose errors become the app's
    (a full queue → :class:`~meddiff.serving.api.Overloaded`, bad input → the meddiff error)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def _call(self, method: str, *args):
        from meddiff.errors import find_user_error

        try:
            return await getattr(self.handle, method).remote(*args)
        except BackPressureError:
            raise Overloaded() from None
        except Exception as err:
            user = find_user_error(err)
            if user is None:
                raise
            raise type(user)(str(user).split("\n")[0]) from None

    async def info(self):
        return await self._call("info")

    async def detect(self, image, seed):
        return await self._call("detect", image, seed)

    async def prompts(self):
        return await self._call("prompts")

    async def check_prompt(self, prompt):
        return await self._call("check_prompt", prompt)

    async def generate(self, prompt, seed):
        return await self._call("generate", prompt, seed)


@serve.deployment(name="AnomalyIngress", max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress()
class AnomalyIngress:
    def __init__(self, model: DeploymentHandle, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        self.token = auth.load_token(self.args.token_file)
        self.backend = HandleBackend(model)

    async def __serve_build_asgi_app__(self):
        info = await self.backend.info()
        return build_anomaly_app(
            self.backend,
            self.token,
            int(info["plan"]["image_size"]),
            self.args.max_body_bytes,
            self.args.retry_after_s,
            service_config(self.args).data.images,
        )


@serve.deployment(name="SynthesisIngress", max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress()
class SynthesisIngress:
    def __init__(self, model: DeploymentHandle, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        self.token = auth.load_token(self.args.token_file)
        self.backend = HandleBackend(model)

    async def __serve_build_asgi_app__(self):
        return build_synthesis_app(
            self.backend,
            self.token,
            self.args.max_images,
            retry_after_s=self.args.retry_after_s,
        )


def _checked(args: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return AppArgs.model_validate(args or {}).model_dump(mode="json")
    except Exception as err:
        raise MeddiffError(f"invalid application args: {err}") from None


def anomaly_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The anomaly service (builder for ``import_path``)."""
    a = _checked(args)
    return AnomalyIngress.bind(AnomalyModel.bind(a), a)


def synthesis_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The synthesis service (builder for ``import_path``)."""
    a = _checked(args)
    return SynthesisIngress.bind(SynthesisModel.bind(a), a)
