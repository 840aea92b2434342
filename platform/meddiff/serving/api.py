"""The FastAPI apps of the two services, built over a *backend* that runs the model.

The app does everything HTTP: the token (401), body cap (413), content type (415), PNG decoding
and field ranges (422), encoding results. The backend only runs the model: when deployed it is a
Serve handle to the batched model deployment (:mod:`meddiff.serving.deployments`); in unit tests
it is :class:`LocalBackend` over a runner, so the whole app is testable with FastAPI's
TestClient without Ray.

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>``):

- anomaly: ``POST /v1/anomaly`` (body: PNG bytes; ``?seed=``, ``?reconstruction=``; JSON, or the
  map alone with ``Accept: image/png``), ``GET /v1/models``;
- synthesis: ``POST /v1/synthesis`` (JSON), ``GET /v1/synthesis/prompts``, ``GET /v1/models``;
- both: ``GET /healthz`` (liveness), ``GET /readyz`` (model loaded), ``GET /`` (a page for
  people), ``GET /docs`` (OpenAPI).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from meddiff.config.data import ImageConfig
from meddiff.data.images import encode_png
from meddiff.errors import DataError, MeddiffError
from meddiff.reports import encode_png as encode_rgb_png
from meddiff.serving import auth, limits
from meddiff.serving import schemas as S
from meddiff.serving.runners import content_seed

MODEL_VERSION_HEADER = "X-Model-Version"
SCORE_HEADER = "X-Anomaly-Score"


class Overloaded(Exception):
    """The model's queue is full: answered 503 with Retry-After."""


class AnomalyBackend(Protocol):
    async def info(self) -> dict[str, Any]: ...
    async def detect(self, image: np.ndarray, seed: int) -> dict[str, Any]: ...


class SynthesisBackend(Protocol):
    async def info(self) -> dict[str, Any]: ...
    async def prompts(self) -> list[dict[str, Any]]: ...
    async def check_prompt(self, prompt: str) -> None: ...
    async def generate(self, prompt: str, seed: int) -> dict[str, Any]: ...


class LocalBackend:
    """A runner in this process (tests, benchmarks): same answers as the deployment."""

    def __init__(self, runner):
        self.runner = runner
        self._lock = asyncio.Lock()

    async def info(self) -> dict[str, Any]:
        return self.runner.info()

    async def detect(self, image: np.ndarray, seed: int) -> dict[str, Any]:
        async with self._lock:
            (r,) = await asyncio.to_thread(self.runner.run, [image], [seed])
        return {**r.__dict__, "model": self.runner.info()}

    async def prompts(self) -> list[dict[str, Any]]:
        return self.runner.prompts

    async def check_prompt(self, prompt: str) -> None:
        self.runner.check_prompt(prompt)

    async def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        async with self._lock:
            (img,) = await asyncio.to_thread(self.runner.run, [prompt], [seed])
        return {"image": img, "seed": seed, "model": self.runner.info()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _base_app(title: str, token: str, backend, page: str, retry_after_s: int) -> tuple:
    app = FastAPI(
        title=title,
        version="1",
        description="meddiff HTTP service; every /v1 route needs `Authorization: Bearer <token>`.",
    )

    def check_token(request: Request) -> None:
        if not auth.authorized(request.headers.get("authorization"), token):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse(
            {"detail": "the model is at capacity; retry later"},
            status_code=503,
            headers={"Retry-After": str(retry_after_s)},
        )

    @app.exception_handler(DataError)
    async def _bad_data(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(MeddiffError)
    async def _unavailable(request: Request, exc: MeddiffError) -> JSONResponse:
        # A model that cannot be loaded or used right now: the service, not the request, is at
        # fault, and a retry may succeed once it is fixed.
        return JSONResponse(
            {"detail": f"model unavailable: {exc}"},
            status_code=503,
            headers={"Retry-After": str(retry_after_s)},
        )

    @app.get("/healthz", summary="liveness (no token)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="model loaded (no token)", responses={503: {"model": S.Problem}})
    async def readyz():
        try:
            info = await backend.info()
        except Exception as err:  # not ready is an answer here, not an error
            return JSONResponse({"detail": f"model not ready: {err}"}, status_code=503)
        return {"status": "ready", "version": info.get("version")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        from meddiff.serving.pages import render

        # Behind a Serve route prefix the page's calls go to <prefix>/v1/...
        return HTMLResponse(render(page, base=request.scope.get("root_path", "").rstrip("/")))

    errors = {401: {"model": S.Problem}, 503: {"model": S.Problem}}
    router = APIRouter(prefix="/v1", dependencies=[Depends(check_token)], responses=errors)

    @router.get("/models", response_model=S.Models, summary="the served model")
    async def models(response: Response) -> S.Models:
        info = await backend.info()
        response.headers[MODEL_VERSION_HEADER] = str(info.get("version"))
        return S.Models(models=[S.ModelInfo(**info)])

    return app, router


def build_anomaly_app(
    backend: AnomalyBackend,
    token: str,
    image_size: int,
    max_body_bytes: int = 4 * 1024 * 1024,
    retry_after_s: int = 2,
    images: ImageConfig | None = None,
) -> FastAPI:
    """The anomaly service over ``backend``; ``image_size`` is the model's at start-up (slices of
    another size are refused with 422, as ``meddiff thor detect`` refuses them, after asking the
    backend once whether a promotion changed it) and ``images`` (``data.images``) says how
    intensities are scaled, as for ``thor detect``."""
    app, router = _base_app(
        "meddiff anomaly detection (THOR)", token, backend, "anomaly.html", retry_after_s
    )
    body_doc = {
        "requestBody": {
            "required": True,
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        }
    }
    responses = {
        200: {
            "content": {"image/png": {}},
            "description": "JSON, or the map with Accept: image/png",
        },
        413: {"model": S.Problem},
        415: {"model": S.Problem},
        422: {"model": S.Problem},
    }

    size = {"current": image_size}

    async def decode(body: bytes) -> np.ndarray:
        try:
            return limits.decode_slice(body, size["current"], images)
        except HTTPException:
            # A promoted model may have another image size: ask once, then judge again.
            fresh = int((await backend.info())["plan"]["image_size"])
            if fresh == size["current"]:
                raise
            size["current"] = fresh
            return limits.decode_slice(body, fresh, images)

    @router.post(
        "/anomaly",
        response_model=S.AnomalyResponse,
        summary="anomaly map and score of one grayscale PNG slice",
        openapi_extra=body_doc,
        responses=responses,
    )
    async def anomaly(
        request: Request,
        seed: int | None = Query(None, ge=0, le=S.SEED_MAX, description="noise seed"),
        reconstruction: bool = Query(True, description="include the pseudo-healthy image"),
    ):
        body = await limits.read_body(request, max_body_bytes)
        limits.require_png(request, body)
        image = await decode(body)
        used = content_seed(image) if seed is None else seed
        out = await backend.detect(image, used)
        info = out["model"]
        headers = {MODEL_VERSION_HEADER: str(info.get("version"))}
        map_png = encode_png(out["anomaly_map"], bits=16)
        if "image/png" in request.headers.get("accept", "").lower():
            headers[SCORE_HEADER] = f"{out['score']:.9g}"
            headers["X-Seed"] = str(used)
            return Response(map_png, media_type="image/png", headers=headers)
        rec = encode_png(out["reconstruction"], bits=16) if reconstruction else None
        result = S.AnomalyResponse(
            score=out["score"],
            anomaly_map_png=_b64(map_png),
            reconstruction_png=_b64(rec) if rec is not None else None,
            seed=used,
            model=S.ModelInfo(**info),
        )
        return JSONResponse(result.model_dump(), headers=headers)

    app.include_router(router)
    return app


def build_synthesis_app(
    backend: SynthesisBackend,
    token: str,
    max_images: int = 8,
    max_body_bytes: int = 64 * 1024,
    retry_after_s: int = 2,
) -> FastAPI:
    """The synthesis service over ``backend``; ``n`` is capped at ``max_images``."""
    app, router = _base_app(
        "meddiff synthesis (Stable Diffusion)", token, backend, "synthesis.html", retry_after_s
    )

    @router.get("/synthesis/prompts", response_model=S.Prompts, summary="prompts it was trained on")
    async def prompts() -> S.Prompts:
        return S.Prompts(prompts=[S.PromptEntry(**p) for p in await backend.prompts()])

    @router.post(
        "/synthesis",
        response_model=S.SynthesisResponse,
        summary="n patches for a prompt (or label + cluster)",
        responses={413: {"model": S.Problem}, 415: {"model": S.Problem}, 422: {"model": S.Problem}},
    )
    async def synthesis(request: Request, req: S.SynthesisRequest) -> JSONResponse:
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            raise HTTPException(413, f"request body exceeds {max_body_bytes} bytes")
        if req.n > max_images:
            raise HTTPException(422, f"n: {req.n} is over this service's limit of {max_images}")
        prompt = await _pick_prompt(backend, req)
        await backend.check_prompt(prompt)
        base = req.seed or 0
        seeds = [base + i for i in range(req.n)]
        outs = await asyncio.gather(*(backend.generate(prompt, s) for s in seeds))
        info = outs[-1]["model"]
        result = S.SynthesisResponse(
            prompt=prompt,
            images=[
                S.SynthesisImage(seed=o["seed"], png=_b64(encode_rgb_png(o["image"]))) for o in outs
            ],
            model=S.ModelInfo(**info),
        )
        return JSONResponse(
            result.model_dump(), headers={MODEL_VERSION_HEADER: str(info.get("version"))}
        )

    app.include_router(router)
    return app


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
    raise HTTPException(
        422,
        f"label {req.label}, cluster {req.cluster}: no such prompt; known (label, cluster): {known}",
    )
