"""The Serve deployments and the application builders that Serve config files name.

Each service is three deployments: an ingress (the app of :mod:`meddiff.serving.api`: token,
limits, encoding, audit), a model deployment that holds one runner and answers batches
(``@serve.batch``: one inferer or pipeline call per batch, a seed per item), and ``Monitor``
(one replica, no CPU): it serves the application's Prometheus metrics on ``args.metrics_port``,
gathers every replica's events, and carries the drain signal of ``meddiff serve run``.

The model is the deployment's ``user_config`` (:class:`~meddiff.config.serving.ModelUserConfig`).
Serve calls ``reconfigure`` when it changes, and a registry reference is checked every
``refresh_s``: an alias that moved is followed (the new model loaded beside the old one and
swapped in when ready, so requests in flight are answered by one version or the other, never
failed); a served version deleted from the registry (or an alias removed) keeps being served but
makes the service not ready, with the reason in ``/readyz``, the log and the
``meddiff_serve_model_in_registry`` metric; a canary tag of the alias loads the candidate beside
it and sends it the requests whose draw ``u`` is under the canary's share.

Builders (``import_path`` in ``configs/*.yaml``): ``meddiff.serving.deployments:anomaly_app`` and
``meddiff.serving.deployments:synthesis_app``; each takes the application's ``args``
(:class:`~meddiff.config.serving.AppArgs`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from meddiff.config import Config, load_config
from meddiff.config.serving import AppArgs, ModelUserConfig
from meddiff.errors import MeddiffError, ModelError
from meddiff.serving.api import (
    IngressState,
    Overloaded,
    ServiceOptions,
    Unavailable,
    build_anomaly_app,
    build_synthesis_app,
)
from meddiff.serving.auth import Credentials
from meddiff.serving.metrics import Metrics, Recorder, add_audit_file, version_label
from meddiff.serving.runners import load_runner
from meddiff.tracking.aliases import canary_of, parse_ref, resolve

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # how often a replica sends its metric events (and learns of a drain)


def service_config(args: AppArgs) -> Config:
    """The meddiff config a service runs with (preset + overrides of its ``args``)."""
    return load_config(args.preset, None, list(args.set))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        return "local"


async def _report(monitor, replica, kind, events, **extra) -> bool | None:
    """Send events to the Monitor; its answer is whether the service is draining (None when the
    Monitor did not answer: the events are dropped, metrics are best effort)."""
    try:
        return await asyncio.wait_for(
            _awaited(monitor.report.remote(replica, kind, events, extra)), 5
        )
    except Exception as err:
        log.debug("metrics report failed: %s", err)
        return None


async def _awaited(response):
    return await response


class _ModelHolder:
    """What both model deployments share: load, swap, follow the registry, canary, health."""

    kind = ""

    def __init__(self, args: dict[str, Any], monitor: DeploymentHandle | None = None):
        import ray
        import torch

        self.cfg = service_config(AppArgs.model_validate(args))
        self.runner = None
        self.candidate = None  # the canary's runner, beside self.runner
        self.canary_percent = 0.0
        self.problem: str | None = None
        self.user: ModelUserConfig | None = None
        self._swap = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task] = {}
        self.monitor = monitor
        self.recorder = Recorder()
        self.pending = 0
        self.replica = _replica_id()
        # One replica uses the CPUs Serve gave it (ray_actor_options.num_cpus), not every core.
        cpus = ray.is_initialized() and ray.get_runtime_context().get_assigned_resources().get(
            "CPU"
        )
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        user = ModelUserConfig.model_validate(user_config)
        if self.user is None or user.model != self.user.model or self.runner is None:
            await self._load(user.model)
        self.user = user
        self._batch.set_max_batch_size(user.max_batch_size)
        self._batch.set_batch_wait_timeout_s(user.batch_wait_timeout_s)
        if "follow" in self._tasks:
            self._tasks.pop("follow").cancel()
        loop = asyncio.get_running_loop()
        if parse_ref(user.model) is not None and user.refresh_s > 0:
            self._tasks["follow"] = loop.create_task(self._follow())
        if self.monitor is not None and "flush" not in self._tasks:
            self._tasks["flush"] = loop.create_task(self._flush())

    async def _load(self, ref: str) -> None:
        """Load the new runner beside the old one, then swap (the old one keeps answering)."""
        async with self._swap:
            try:
                runner = await asyncio.to_thread(load_runner, self.kind, ref, self.cfg)
            except Exception:
                self.recorder.add("event", "load_failed", "none")
                raise
            old = None if self.runner is None else self.runner.model.version
            self.runner = runner
            version = version_label(runner.model.version)
            self.recorder.add("event", "load" if old is None else "swap", version)
            self.recorder.add("in_registry", self.replica, self.problem is None)
            log.info("%s model %s: version %s -> %s", self.kind, ref, old, runner.model.version)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.user.refresh_s)
            try:
                await self._check_registry()
            except Exception as err:  # keep serving the loaded version; say why it stayed
                self._set_problem(f"cannot check {self.user.model}: {err}".splitlines()[0])

    async def _check_registry(self) -> None:
        ref, served = self.user.model, self.runner.model.version
        try:
            now = await asyncio.to_thread(resolve, ref, self.cfg.tracking)
        except ModelError:
            self._set_problem(await asyncio.to_thread(self._why_unresolved, ref, served))
            return
        if now.version != served:
            try:
                await self._load(ref)
            except MeddiffError as err:
                first = str(err).splitlines()[0]
                self._set_problem(f"cannot load version {now.version} of {ref} ({first}); "
                                  f"still serving version {served}")  # fmt: skip
                return
        self._set_problem(None)
        name, alias, _ = parse_ref(ref)
        if alias:
            await self._follow_canary(name, alias)

    def _why_unresolved(self, ref: str, served: str | None) -> str:
        name = parse_ref(ref)[0]
        try:
            resolve(f"models:/{name}/{served}", self.cfg.tracking)
        except ModelError:
            return (f"version {served} of {name} was deleted from the registry and {ref} does "
                    f"not resolve; still serving it until {ref} names a version")  # fmt: skip
        return f"{ref} does not resolve in the registry; still serving version {served}"

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem:
            log.error("%s service not ready: %s", self.kind, problem)
            self.recorder.add("event", "registry_missing", version_label(self._version()))
        else:
            log.info("%s service ready again: %s", self.kind, self.user.model)
        self.problem = problem
        self.recorder.add("in_registry", self.replica, problem is None)

    def _version(self):
        return None if self.runner is None else self.runner.model.version

    async def _follow_canary(self, name: str, alias: str) -> None:
        canary = await asyncio.to_thread(canary_of, name, alias, self.cfg.tracking)
        if canary is None:
            if self.candidate is not None:
                log.info("canary of %s ended", self.candidate.model.uri)
                self.recorder.add(
                    "event", "canary_off", version_label(self.candidate.model.version)
                )
                self.candidate, self.canary_percent = None, 0.0
            return
        version, percent = canary
        if self.candidate is None or self.candidate.model.version != version:
            runner = await asyncio.to_thread(
                load_runner, self.kind, f"models:/{name}/{version}", self.cfg
            )
            self.candidate = runner
            self.recorder.add("event", "canary_on", version_label(version))
            log.info("canary: %g%% of requests to version %s of %s", percent, version, name)
        self.canary_percent = percent

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            events = [*self.recorder.take(), ("queue", self.replica, self.pending)]
            await _report(self.monitor, self.replica, "model", events)

    def check_health(self) -> None:
        if self.runner is None:
            raise RuntimeError(f"{self.kind} model not loaded")

    async def info(self) -> dict[str, Any]:
        self.check_health()
        canary = None
        if self.candidate is not None:
            canary = {"version": self.candidate.model.version, "percent": self.canary_percent}
        return {**self.runner.info(), "problem": self.problem, "canary": canary}

    def _arms(self, us: list[float]) -> list[tuple[Any, list[int]]]:
        """(runner, item indices) groups: an item goes to the canary when its draw is under the
        canary's share."""
        stable, cand, share = self.runner, self.candidate, self.canary_percent / 100
        picked = [i for i, u in enumerate(us) if cand is not None and u < share]
        rest = [i for i in range(len(us)) if i not in set(picked)]
        return [(r, idx) for r, idx in ((stable, rest), (cand, picked)) if idx]

    async def _run_arms(self, items: list, seeds: list[int], us: list[float], wrap) -> list:
        out: list = [None] * len(items)
        for runner, idx in self._arms(us):
            results = await asyncio.to_thread(
                runner.run, [items[i] for i in idx], [seeds[i] for i in idx]
            )
            info = runner.info()
            self.recorder.add("batch", version_label(runner.model.version), len(idx))
            for i, r in zip(idx, results, strict=True):
                out[i] = {**wrap(r, seeds[i]), "model": info, "canary": runner is self.candidate,
                          "batch_size": len(idx)}  # fmt: skip
        return out

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "pending": self.pending}


@serve.deployment(name="AnomalyModel", max_ongoing_requests=16, max_queued_requests=64)
class AnomalyModel(_ModelHolder):
    kind = "anomaly"

    async def detect(self, image, seed: int, u: float = 0.0) -> dict[str, Any]:
        self.pending += 1
        try:
            return await self._batch(image, seed, u)
        finally:
            self.pending -= 1

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batch(self, images: list, seeds: list[int], us: list[float]) -> list[dict]:
        return await self._run_arms(images, seeds, us, lambda r, s: dict(r.__dict__))


@serve.deployment(name="SynthesisModel", max_ongoing_requests=16, max_queued_requests=64)
class SynthesisModel(_ModelHolder):
    kind = "synthesis"

    async def prompts(self) -> list[dict[str, Any]]:
        self.check_health()
        return self.runner.prompts

    async def check_prompt(self, prompt: str) -> None:
        self.check_health()
        self.runner.check_prompt(prompt)

    async def generate(self, prompt: str, seed: int, u: float = 0.0) -> dict[str, Any]:
        self.pending += 1
        try:
            return await self._batch(prompt, seed, u)
        finally:
            self.pending -= 1

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batch(self, prompts: list[str], seeds: list[int], us: list[float]) -> list[dict]:
        return await self._run_arms(prompts, seeds, us, lambda img, s: {"image": img, "seed": s})


@serve.deployment(
    name="Monitor",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    # Every replica reports once a second: Serve's access line per report would drown the log.
    logging_config={"enable_access_log": False},
)
class Monitor:
    """The application's metrics server and drain flag (see the module's docstring)."""

    def __init__(self, service: str, args: dict[str, Any]):
        from meddiff.serving.metrics import serve_metrics

        a = AppArgs.model_validate(args)
        self.metrics = Metrics(service)
        self.host = a.metrics_host
        self.port = serve_metrics(self.metrics, a.metrics_host, a.metrics_port)
        self.draining_since: float | None = None
        self.reports: dict[str, dict[str, Any]] = {}

    async def report(self, replica: str, kind: str, events: list, extra: dict) -> bool:
        self.metrics.apply(events)
        self.reports[replica] = {"kind": kind, "at": time.time(), **extra}
        return self.draining_since is not None

    async def drain(self) -> float:
        self.draining_since = self.draining_since or time.time()
        return self.draining_since

    async def status(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "draining_since": self.draining_since,
                "reports": self.reports}  # fmt: skip


_RETRYABLE = (RayActorError, DeploymentUnavailableError)


class HandleBackend:
    """The ingress's view of a model deployment: a Serve handle whose errors become the app's.
    A full queue → :class:`~meddiff.serving.api.Overloaded`; bad input → the meddiff error; a
    replica that died under the request → the request (every model call is idempotent: a pure
    function of its input and seed) is sent once more, to a live replica, within
    ``retry_timeout_s``, else :class:`~meddiff.serving.api.Unavailable` (503 + Retry-After)."""

    def __init__(self, handle: DeploymentHandle, retry_timeout_s: float = 30.0):
        self.handle = handle
        self.retry_timeout_s = retry_timeout_s

    async def _call(self, method: str, *args):
        from meddiff.errors import find_user_error

        for attempt in (1, 2):
            response = getattr(self.handle, method).remote(*args)
            try:
                if attempt == 1:
                    return await response
                return await asyncio.wait_for(_awaited(response), self.retry_timeout_s)
            except BackPressureError:
                raise Overloaded() from None
            except _RETRYABLE as err:
                reason = type(err).__name__
                if attempt == 2:
                    raise Unavailable(f"the retry failed too ({reason})") from None
                log.warning("model replica failed under a %s call (%s); retrying once",
                            method, reason)  # fmt: skip
            except asyncio.TimeoutError:
                response.cancel()
                raise Unavailable(
                    f"the retry got no answer within {self.retry_timeout_s:g} s"
                ) from None
            except Exception as err:
                user = find_user_error(err)
                if user is None:
                    raise
                raise type(user)(str(user).split("\n")[0]) from None

    async def info(self):
        return await self._call("info")

    async def detect(self, image, seed, u=0.0):
        return await self._call("detect", image, seed, u)

    async def prompts(self):
        return await self._call("prompts")

    async def check_prompt(self, prompt):
        return await self._call("check_prompt", prompt)

    async def generate(self, prompt, seed, u=0.0):
        return await self._call("generate", prompt, seed, u)


class _Ingress:
    """What both ingresses share: options from ``args``, the flush loop to the Monitor."""

    def __init__(self, model: DeploymentHandle, monitor: DeploymentHandle, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        if self.args.audit_log:
            add_audit_file(self.args.audit_log)
        self.backend = HandleBackend(model, self.args.retry_timeout_s)
        self.monitor = monitor
        self.state = IngressState()
        self.opts = ServiceOptions(
            credentials=Credentials(self.args.token_file, self.args.credentials_file),
            max_body_bytes=self.args.max_body_bytes,
            retry_after_s=self.args.retry_after_s,
            ready_timeout_s=self.args.ready_timeout_s,
            recorder=Recorder(),
            state=self.state,
        )
        self.replica = _replica_id()
        self._flush_task: asyncio.Task | None = None

    def _start_flush(self) -> None:
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            events = [*self.opts.recorder.take(), ("inflight", self.replica, self.state.inflight)]
            draining = await _report(self.monitor, self.replica, "ingress", events,
                                     inflight=self.state.inflight, draining=self.state.draining)  # fmt: skip
            if draining and not self.state.draining:
                log.info("draining: new /v1 requests get 503 + Retry-After")
                self.state.draining = True


@serve.deployment(name="AnomalyIngress", max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress()
class AnomalyIngress(_Ingress):
    async def __serve_build_asgi_app__(self):
        self._start_flush()
        from meddiff.serving.clinical import Settings

        info = await self.backend.info()
        cfg = service_config(self.args)
        return build_anomaly_app(
            self.backend,
            self.opts,
            int(info["plan"]["image_size"]),
            cfg.data.images,
            Settings.from_config(cfg, self.args.max_series_slices),
        )


@serve.deployment(name="SynthesisIngress", max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress()
class SynthesisIngress(_Ingress):
    async def __serve_build_asgi_app__(self):
        self._start_flush()
        return build_synthesis_app(self.backend, self.opts, self.args.max_images)


def _checked(args: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return AppArgs.model_validate(args or {}).model_dump(mode="json")
    except Exception as err:
        raise MeddiffError(f"invalid application args: {err}") from None


def anomaly_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The anomaly service (builder for ``import_path``)."""
    a = _checked(args)
    monitor = Monitor.bind("anomaly", a)
    return AnomalyIngress.bind(AnomalyModel.bind(a, monitor), monitor, a)


def synthesis_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The synthesis service (builder for ``import_path``)."""
    a = _checked(args)
    monitor = Monitor.bind("synthesis", a)
    return SynthesisIngress.bind(SynthesisModel.bind(a, monitor), monitor, a)
