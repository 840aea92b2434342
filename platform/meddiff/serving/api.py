"""The FastAPI apps of the two services, built over a *backend* that runs the model.

The app does everything HTTP. In front of FastAPI, :class:`Guard` (plain ASGI) answers before
any body is read: a draining service (503), the bearer token (401), a declared body over the
cap (413); it caps a chunked body while it streams (413), and writes the audit line and the
metrics of every request. The routes then check content types (415), PNG decoding, JSON and
field ranges (422) and encode results. The backend only runs the model: deployed it is a Serve
handle to the batched model deployment (:mod:`meddiff.serving.deployments`); in unit tests it is
:class:`LocalBackend` over a runner, so the whole app is testable with FastAPI's TestClient.

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>``):

- anomaly: ``POST /v1/anomaly`` (body: PNG bytes, or one DICOM slice with ``Content-Type:
  application/dicom``; ``?seed=``, ``?reconstruction=``; JSON, the map alone with ``Accept:
  image/png``, or for DICOM a SEG with ``Accept: application/dicom``), ``POST
  /v1/anomaly/series`` (JSON: a series on the service's PACS; :mod:`meddiff.serving.clinical`),
  ``GET /v1/models``;
- synthesis: ``POST /v1/synthesis`` (JSON), ``GET /v1/synthesis/prompts``, ``GET /v1/models``;
- both: ``GET /healthz`` (liveness), ``GET /readyz`` (a model replica answers, and its version is
  still in the registry), ``GET /`` (a page for people), ``GET /docs`` (Swagger UI, its assets
  served from the ``fastapi-offline`` package: no CDN).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError

from meddiff.config.data import ImageConfig
from meddiff.data.images import encode_png
from meddiff.errors import DataError, MeddiffError
from meddiff.reports import encode_png as encode_rgb_png
from meddiff.serving import clinical, limits
from meddiff.serving import schemas as S
from meddiff.serving.auth import Credentials
from meddiff.serving.metrics import Recorder, audit, version_label
from meddiff.serving.runners import content_seed

MODEL_VERSION_HEADER = "X-Model-Version"
SCORE_HEADER = "X-Anomaly-Score"
SEED_HEADER = "X-Seed"
REQUEST_ID_HEADER = "X-Request-ID"
ROUTES = ("/v1/anomaly", "/v1/anomaly/series", "/v1/synthesis", "/v1/synthesis/prompts",
          "/v1/models", "/healthz", "/readyz", "/", "/docs", "/openapi.json")  # fmt: skip
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class Overloaded(Exception):
    """The model's queue is full: answered 503 with Retry-After."""


class Unavailable(Exception):
    """No model replica could answer (one died and the retry failed too): 503 + Retry-After."""


class BodyTooLarge(HTTPException):
    """Raised by :class:`Guard`'s receive while a body streams past the cap."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class AnomalyBackend(Protocol):
    async def info(self) -> dict[str, Any]: ...
    async def detect(self, image: np.ndarray, seed: int, u: float = 0.0) -> dict[str, Any]: ...


class SynthesisBackend(Protocol):
    async def info(self) -> dict[str, Any]: ...
    async def prompts(self) -> list[dict[str, Any]]: ...
    async def check_prompt(self, prompt: str) -> None: ...
    async def generate(self, prompt: str, seed: int, u: float = 0.0) -> dict[str, Any]: ...


class LocalBackend:
    """A runner in this process (tests, benchmarks): same answers as the deployment."""

    def __init__(self, runner):
        self.runner = runner
        self._lock = asyncio.Lock()

    async def info(self) -> dict[str, Any]:
        return self.runner.info()

    async def detect(self, image: np.ndarray, seed: int, u: float = 0.0) -> dict[str, Any]:
        async with self._lock:
            (r,) = await asyncio.to_thread(self.runner.run, [image], [seed])
        return {**r.__dict__, "model": self.runner.info(), "batch_size": 1}

    async def prompts(self) -> list[dict[str, Any]]:
        return self.runner.prompts

    async def check_prompt(self, prompt: str) -> None:
        self.runner.check_prompt(prompt)

    async def generate(self, prompt: str, seed: int, u: float = 0.0) -> dict[str, Any]:
        async with self._lock:
            (img,) = await asyncio.to_thread(self.runner.run, [prompt], [seed])
        return {"image": img, "seed": seed, "model": self.runner.info(), "batch_size": 1}


@dataclass
class ServiceOptions:
    """What an ingress needs besides the backend (from the application's ``args``)."""

    credentials: Credentials
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 2
    ready_timeout_s: float = 1.0
    recorder: Recorder = field(default_factory=Recorder)
    state: IngressState | None = None


@dataclass
class IngressState:
    """Shared between :class:`Guard` and the deployment: draining flag, requests inside."""

    draining: bool = False
    inflight: int = 0


def clean(message: Any, limit: int = 400) -> str:
    """An error message fit for a client: no object reprs (``<… object at 0x…>``), one line,
    at most ``limit`` characters."""
    text = _REPR.sub("<object>", str(message)).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def route_of(scope: dict) -> str:
    """The route label of a request: one of :data:`ROUTES` or 'other' (never the raw path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    path = path.rstrip("/") or "/"
    return path if path in ROUTES else "other"


class Guard:
    """ASGI middleware: the checks that must come before any body is read, the streaming body
    cap, the drain gate, and one audit line and metric sample per request."""

    def __init__(self, app, service: str, opts: ServiceOptions):
        self.app, self.service, self.opts = app, service, opts
        self.state = opts.state or IngressState()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        tele: dict[str, Any] = {}
        scope.setdefault("state", {})["telemetry"] = tele
        route = route_of(scope)
        status = {"code": 500, "version": None}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        protected = route.startswith("/v1") or (route == "other" and "/v1" in scope["path"])
        try:
            if protected:
                early = self._gate(headers, tele)
                if early is not None:
                    await early(scope, receive, send_wrapped)
                    return
                receive = self._capped(receive)
                self.state.inflight += 1
            try:
                await self.app(scope, receive, send_wrapped)
            except BodyTooLarge as err:
                if status["code"] != 500:
                    raise
                await _problem(413, err.detail)(scope, receive, send_wrapped)
            finally:
                if protected:
                    self.state.inflight -= 1
        finally:
            self._record(scope, rid, route, status["code"], time.perf_counter() - start, tele)

    def _gate(self, headers: dict[str, str], tele: dict) -> Response | None:
        if self.state.draining:
            return _problem(503, "the service is shutting down; retry on another instance",
                            {"Retry-After": str(self.opts.retry_after_s),
                             "Connection": "close"})  # fmt: skip
        name = self.opts.credentials.identify(headers.get("authorization"))
        if name is None:
            return _problem(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        tele["token"] = name
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return _problem(400, "Content-Length is not a number")
            if int(declared) > self.opts.max_body_bytes:
                return _problem(413, f"request body exceeds {self.opts.max_body_bytes} bytes")
        return None

    def _capped(self, receive):
        limit, seen = self.opts.max_body_bytes, [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        return wrapped

    def _record(self, scope, rid: str, route: str, code: int, latency: float, tele: dict) -> None:
        version = version_label(tele.get("version"))
        self.opts.recorder.add("request", route, code, version, latency, tele.get("score"))
        audit({
            "request_id": rid, "service": self.service, "token": tele.get("token"),
            "method": scope.get("method"), "route": route, "status": code,
            "latency_ms": round(latency * 1000, 1), "model_version": tele.get("version"),
            "seed": tele.get("seed"), "canary": tele.get("canary", False),
        })  # fmt: skip


def _problem(code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _validation_detail(errors) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without the client's input or context (never echoed back: a
    1 MB prompt or a NaN would come back whole, or fail to encode as JSON)."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": clean(e.get("msg", "")),
         "type": e.get("type", "")}
        for e in errors
    ]  # fmt: skip


def _handlers(app: FastAPI, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _problem(503, "the model is at capacity; retry later", retry)

    @app.exception_handler(Unavailable)
    async def _unavailable_replica(request: Request, exc: Unavailable) -> JSONResponse:
        return _problem(503, f"no model replica could answer: {clean(exc)}", retry)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)

    @app.exception_handler(DataError)
    async def _bad_data(request: Request, exc: DataError) -> JSONResponse:
        return _problem(422, clean(exc))

    @app.exception_handler(MeddiffError)
    async def _unavailable(request: Request, exc: MeddiffError) -> JSONResponse:
        # A model that cannot be loaded or used right now: the service, not the request, is at
        # fault, and a retry may succeed once it is fixed.
        return _problem(503, f"model unavailable: {clean(exc)}", retry)


def _docs(app: FastAPI) -> None:
    """``/docs``: FastAPI's Swagger UI page with its script and style from the
    ``fastapi-offline`` package's static files (served here, so it renders without internet)."""
    from importlib.resources import files

    from fastapi.staticfiles import StaticFiles

    static = files("fastapi_offline") / "static"
    app.mount("/docs-static", StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-static/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-static/favicon.png",
        )


def _base_app(title: str, service: str, backend, page: str, opts: ServiceOptions) -> tuple:
    app = FastAPI(
        title=title,
        version="1",
        description="meddiff HTTP service; every /v1 route needs `Authorization: Bearer <token>`.",
        docs_url=None,
        redoc_url=None,
    )
    state = opts.state = opts.state or IngressState()
    _handlers(app, opts.retry_after_s)
    _docs(app)

    @app.get("/healthz", summary="liveness (no token)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="a model replica answers (no token)",
             responses={503: {"model": S.Problem}})  # fmt: skip
    async def readyz():
        if state.draining:
            return _problem(503, "draining: the service is shutting down")
        try:
            info = await asyncio.wait_for(backend.info(), opts.ready_timeout_s)
        except asyncio.TimeoutError:
            return _problem(503, f"no model replica answered within {opts.ready_timeout_s:g} s")
        except Exception as err:  # not ready is an answer here, not an error
            return _problem(503, f"model not ready: {clean(err)}")
        if info.get("problem"):
            return JSONResponse(
                {"detail": clean(info["problem"]), "version": info.get("version")}, status_code=503
            )
        return {"status": "ready", "version": info.get("version"), "canary": info.get("canary")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        from meddiff.serving.pages import render

        # Behind a Serve route prefix the page's calls go to <prefix>/v1/...
        return HTMLResponse(render(page, base=request.scope.get("root_path", "").rstrip("/")))

    errors = {401: {"model": S.Problem}, 503: {"model": S.Problem}}
    # The dependency only declares the scheme in /openapi.json (and the docs' Authorize
    # button): Guard has checked the token before FastAPI sees the request.
    bearer = HTTPBearer(auto_error=False, description="a token from `meddiff serve token add`")
    router = APIRouter(prefix="/v1", dependencies=[Security(bearer)], responses=errors)

    @router.get("/models", response_model=S.Models, summary="the served model")
    async def models(request: Request, response: Response) -> S.Models:
        info = await backend.info()
        request.state.telemetry["version"] = info.get("version")
        response.headers[MODEL_VERSION_HEADER] = str(info.get("version"))
        return S.Models(models=[S.ModelInfo(**info)])

    return app, router


_PNG = "image/png"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ANOMALY_DOC = {
    "requestBody": {
        "required": True,
        "description": "one grayscale slice: a PNG of the model's size, or a single-frame DICOM "
        "MR instance (Part 10 file; cut and scaled by the rules of data.mri)",
        "content": {_PNG: _BINARY, clinical.DICOM: _BINARY},
    }
}
_ANOMALY_RESPONSES = {
    200: {
        "content": {_PNG: _BINARY, clinical.DICOM: _BINARY},
        "description": "JSON; the map alone with Accept: image/png; a DICOM SEG of the map above "
        "the model's seg_threshold, referencing the instance, with Accept: application/dicom "
        "(DICOM input only)",
    },
    406: {"model": S.Problem},
    413: {"model": S.Problem},
    415: {"model": S.Problem},
    422: {"model": S.Problem},
}
_SERIES_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": S.SeriesRequest.model_json_schema()}},
    }
}
_SERIES_RESPONSES = {
    code: {"model": S.Problem, "description": why}
    for code, why in {
        413: "the series has more slices than args.max_series_slices",
        415: "not application/json",
        422: "bad JSON or UIDs; a series the PACS does not hold; a series that is not one stack",
        502: "the PACS failed, refused the service's credentials or rejected the store",
        504: "the PACS timed out",
    }.items()
}


# Accept values under which a PNG body's JSON (or map PNG) answer is acceptable too.
_OTHERWISE = {"application/json", "application/*", "*/*", _PNG, "image/*"}


def _accepts(request: Request) -> set[str]:
    """The media types of the request's ``Accept`` header (parameters and q-values aside)."""
    header = request.headers.get("accept", "").lower()
    return {part.split(";")[0].strip() for part in header.split(",") if part.strip()}


def _validated(model: type[Any], data: Any) -> Any:
    """``model`` of a JSON body; a mismatch is FastAPI's 422 with ``body`` in each location."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in err.errors()]
        ) from None


class _Slices:
    """A request body as the model's slice: a PNG of the model's size, or a DICOM slice cut to
    it; run on the backend. ``size`` is the model's image size as last heard: a promoted model
    may take another, so a refused slice makes it ask the backend once and judge again."""

    def __init__(self, backend, size: int, images, settings: clinical.Settings):
        self.backend, self.size, self.images, self.settings = backend, size, images, settings

    async def _resized(self) -> bool:
        """Ask the backend for its image size; True when a promotion changed it."""
        fresh = int((await self.backend.info())["plan"]["image_size"])
        changed, self.size = fresh != self.size, fresh
        return changed

    async def decode(self, body: bytes) -> np.ndarray:
        try:
            return limits.decode_slice(body, self.size, self.images)
        except HTTPException:
            if not await self._resized():
                raise
            return limits.decode_slice(body, self.size, self.images)

    async def prepare(self, body: bytes) -> clinical.Instance:
        mri = self.settings.mri_for(self.size)
        return await asyncio.to_thread(clinical.prepare_instance, body, mri)

    async def detect(self, body: bytes, dicom: bool, seed: int | None) -> tuple:
        """(the DICOM instance or None, the seed used, the backend's answer)."""
        inst = await self.prepare(body) if dicom else None
        image = inst.image if inst is not None else await self.decode(body)
        used = content_seed(image) if seed is None else seed
        try:
            return inst, used, await self.backend.detect(image, used, random.random())
        except DataError:
            # A DICOM slice is cut to the model's size, which a promotion may have changed.
            if inst is None or not await self._resized():
                raise
        inst = await self.prepare(body)
        used = content_seed(inst.image) if seed is None else seed
        return inst, used, await self.backend.detect(inst.image, used, random.random())


def build_anomaly_app(
    backend: AnomalyBackend,
    opts: ServiceOptions,
    image_size: int,
    images: ImageConfig | None = None,
    settings: clinical.Settings | None = None,
) -> Guard:
    """The anomaly service over ``backend`` (an ASGI app); ``image_size`` is the model's at
    start-up (slices of another size are refused with 422, as ``meddiff thor detect`` refuses
    them, after asking the backend once whether a promotion changed it), ``images``
    (``data.images``) says how PNG intensities are scaled, as for ``thor detect``, and
    ``settings`` what the DICOM routes need (``data.mri``, ``data.dicom``, the series cap;
    ``POST /v1/anomaly/series`` exists only with a PACS, ``data.dicom.url``)."""
    app, router = _base_app(
        "meddiff anomaly detection (THOR)", "anomaly", backend, "anomaly.html", opts
    )
    settings = settings or clinical.Settings()
    slices = _Slices(backend, image_size, images, settings)

    @router.post(
        "/anomaly",
        response_model=S.AnomalyResponse,
        summary="anomaly map and score of one grayscale slice (PNG or DICOM)",
        openapi_extra=_ANOMALY_DOC,
        responses=_ANOMALY_RESPONSES,
    )
    async def anomaly(
        request: Request,
        seed: int | None = Query(None, ge=0, le=S.SEED_MAX, description="noise seed"),
        reconstruction: bool = Query(True, description="include the pseudo-healthy image"),
    ):
        ctype = limits.require_content_type(request, _PNG, clinical.DICOM)
        is_dicom, accepts = ctype == clinical.DICOM, _accepts(request)
        if clinical.DICOM in accepts and not is_dicom and not accepts & _OTHERWISE:
            raise HTTPException(406, "a DICOM SEG answers a DICOM input; send application/dicom")
        body = await limits.read_body(request, opts.max_body_bytes)
        if not is_dicom:
            limits.require_png(body)
        inst, used, out = await slices.detect(body, is_dicom, seed)
        info = out["model"]
        request.state.telemetry.update(version=info.get("version"), seed=used,
                                       score=out["score"], canary=out.get("canary", False))  # fmt: skip
        headers = {MODEL_VERSION_HEADER: str(info.get("version")), SEED_HEADER: str(used),
                   SCORE_HEADER: f"{out['score']:.9g}"}  # fmt: skip
        if clinical.DICOM in accepts and inst is not None:
            clinical.require_threshold(info, 406)
            seg = await asyncio.to_thread(clinical.seg_bytes, inst, out["anomaly_map"], info,
                                          settings.mri.brain_threshold)  # fmt: skip
            return Response(seg, media_type=clinical.DICOM, headers=headers)
        map_png = encode_png(out["anomaly_map"], bits=16)
        if _PNG in accepts:
            return Response(map_png, media_type=_PNG, headers=headers)
        rec = encode_png(out["reconstruction"], bits=16) if reconstruction else None
        result = S.AnomalyResponse(
            score=out["score"],
            anomaly_map_png=_b64(map_png),
            reconstruction_png=_b64(rec) if rec is not None else None,
            seed=used,
            image_png=_b64(encode_png(inst.image, bits=16)) if inst is not None else None,
            model=S.ModelInfo(**info),
        )
        return JSONResponse(result.model_dump(), headers=headers)

    if settings.dicom.url:  # the route exists where the deployment has a PACS
        _series_route(router, backend, opts, settings, slices)
    app.include_router(router)
    return Guard(app, "anomaly", opts)


def _series_route(
    router: APIRouter,
    backend: AnomalyBackend,
    opts: ServiceOptions,
    settings: clinical.Settings,
    slices: _Slices,
) -> None:
    """``POST /v1/anomaly/series`` on ``router`` (:func:`meddiff.serving.clinical.run_series`)."""

    @router.post(
        "/anomaly/series",
        response_model=S.SeriesResponse,
        summary="a DICOM series on the service's PACS: SEG and map stored back, UIDs and score",
        openapi_extra=_SERIES_DOC,
        responses=_SERIES_RESPONSES,
    )
    async def anomaly_series(request: Request) -> JSONResponse:
        limits.require_content_type(request, "application/json")
        body = await limits.read_body(request, opts.max_body_bytes)
        req = _validated(S.SeriesRequest, parse_json(body))
        out = await clinical.run_series(req, backend, settings, slices.size)
        info = out["model"]
        # No score: meddiff_serve_anomaly_score is a histogram of slice scores, not volumes'.
        request.state.telemetry.update(version=info.get("version"), seed=out["seed"],
                                       canary=out.pop("canary"))  # fmt: skip
        result = S.SeriesResponse(**{**out, "model": S.ModelInfo(**info)})
        headers = {MODEL_VERSION_HEADER: str(info.get("version")), SEED_HEADER: str(out["seed"]),
                   SCORE_HEADER: f"{out['score']:.9g}"}  # fmt: skip
        return JSONResponse(result.model_dump(), headers=headers)


def parse_json(body: bytes) -> Any:
    """A JSON body; ``NaN``, ``Infinity`` and numbers beyond a float (``1e400``) are refused
    (422), as RFC 8259 has no such values.

    Raises:
        HTTPException: 422 naming what is wrong (never echoing the body).
    """

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("a number beyond the float range")
        return value

    try:
        return json.loads(body, parse_constant=constant, parse_float=finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPException(422, f"body: not valid JSON ({clean(err, 120)})") from None
    except ValueError as err:  # from constant/finite, or an integer of > 4300 digits
        raise HTTPException(422, f"body: {clean(err, 120)}") from None


_SYNTH_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": S.SynthesisRequest.model_json_schema()}},
    }
}


def build_synthesis_app(
    backend: SynthesisBackend, opts: ServiceOptions, max_images: int = 8
) -> Guard:
    """The synthesis service over ``backend`` (an ASGI app); ``n`` is capped at
    ``max_images``."""
    app, router = _base_app(
        "meddiff synthesis (Stable Diffusion)", "synthesis", backend, "synthesis.html", opts
    )

    @router.get("/synthesis/prompts", response_model=S.Prompts, summary="prompts it was trained on")
    async def prompts() -> S.Prompts:
        return S.Prompts(prompts=[S.PromptEntry(**p) for p in await backend.prompts()])

    @router.post(
        "/synthesis",
        response_model=S.SynthesisResponse,
        summary="n patches for a prompt (or label + cluster)",
        openapi_extra=_SYNTH_DOC,
        responses={413: {"model": S.Problem}, 415: {"model": S.Problem}, 422: {"model": S.Problem}},
    )
    async def synthesis(request: Request) -> JSONResponse:
        limits.require_content_type(request, "application/json")
        body = await limits.read_body(request, opts.max_body_bytes)
        req = _validated(S.SynthesisRequest, parse_json(body))
        if req.n > max_images:
            raise HTTPException(422, f"n: over this service's limit of {max_images}")
        base = req.seed or 0
        if base + req.n - 1 > S.SEED_MAX:
            raise HTTPException(
                422, f"seed: seed + n - 1 must be at most {S.SEED_MAX} (image i gets seed + i)"
            )
        prompt = await _pick_prompt(backend, req)
        await backend.check_prompt(prompt)
        seeds = [base + i for i in range(req.n)]
        u = random.random()  # one draw per request: every image of it from the same version
        outs = await asyncio.gather(*(backend.generate(prompt, s, u) for s in seeds))
        info = outs[-1]["model"]
        request.state.telemetry.update(version=info.get("version"), seed=base,
                                       canary=outs[-1].get("canary", False))  # fmt: skip
        result = S.SynthesisResponse(
            prompt=prompt,
            images=[
                S.SynthesisImage(seed=o["seed"], png=_b64(encode_rgb_png(o["image"]))) for o in outs
            ],
            model=S.ModelInfo(**info),
        )
        headers = {MODEL_VERSION_HEADER: str(info.get("version")), SEED_HEADER: str(base)}
        return JSONResponse(result.model_dump(), headers=headers)

    app.include_router(router)
    return Guard(app, "synthesis", opts)


async def _pick_prompt(backend: SynthesisBackend, req: S.SynthesisRequest) -> str:
    if req.prompt is not None:
        if req.label is not None or req.cluster is not None:
            raise HTTPException(422, "give either prompt or label + cluster, not both")
        return req.prompt
    if req.label is None or req.cluster is None:
        raise HTTPException(422, "prompt: required (or label and cluster together)")
    table = await backend.prompts()
    for row in table:
        if row["label"] == req.label and row["cluster"] == req.cluster:
            return row["prompt"]
    known = ", ".join(f"({r['label']}, {r['cluster']})" for r in table) or "none"
    raise HTTPException(422, f"label + cluster: no such prompt; known (label, cluster): {known}")
