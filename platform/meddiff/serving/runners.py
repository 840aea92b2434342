"""The served models as plain objects (no Ray, no HTTP): resolve a model reference, load it,
run a batch with per-item seeds. The Serve deployments hold one runner each and swap it for a
new one when the model changes; unit tests call runners directly.

Both runners reuse the batch code of the CLI (``meddiff thor detect``: the THOR inferer;
``meddiff synth generate``: :class:`~meddiff.synthesis.stages.ImageGenerator`), so an HTTP
answer equals the CLI's output for the same image or prompt and seed.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import precision as amp
from meddiff import storage
from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.serving.schemas import SEED_MAX
from meddiff.tracking.aliases import ResolvedModel, resolve

log = logging.getLogger(__name__)


def content_seed(image: np.ndarray) -> int:
    """The seed of an image sent without one: from its pixel values alone (CRC-32 of the float32
    array), so the same image always gets the same map whatever batch it lands in."""
    return zlib.crc32(np.ascontiguousarray(image, dtype=np.float32).tobytes()) & SEED_MAX


@dataclass
class AnomalyResult:
    score: float
    anomaly_map: np.ndarray  # float32 (H, W) in [0, 0.999]
    reconstruction: np.ndarray  # float32 (H, W) in [0, 1]
    seed: int


def _fetch(model_ref: str, cfg: Config) -> tuple[ResolvedModel, Path]:
    """``model_ref`` pinned to one version now, and a local copy of that version (a replica
    applies its config's storage settings first, for an s3:// model).

    Raises:
        ModelError: the reference does not resolve, or its files cannot be fetched.
    """
    from meddiff.tracking import fetch_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    storage.configure(cfg.storage)
    model = resolve(model_ref, cfg.tracking)
    return model, fetch_model(model.uri, cfg.tracking)


class AnomalyRunner:
    """THOR (or a baseline) on one loaded model with the plan of ``cfg.thor.infer``.

    Raises:
        ModelError: the reference does not resolve or is not a THOR model.
        ConfigError: the plan does not fit the model's schedule.
    """

    kind = "anomaly"

    def __init__(self, model_ref: str, cfg: Config):
        import torch

        from meddiff.thor.detect import plan_for
        from meddiff.thor.inferer import ThorInferer
        from meddiff.thor.model import read_model_config, resolve_model
        from meddiff.thor.volumes import seg_threshold

        self.cfg = cfg
        self.model, local = _fetch(model_ref, cfg)
        read_model_config(local)  # a synthesis model fails here, naming the missing file
        self.plan = plan_for(cfg, str(local))
        # The DICOM SEG threshold of this version and plan, as `thor detect` finds it.
        found = seg_threshold(cfg, self.model.uri, local, self.plan)
        self.seg_threshold = None if found is None else float(found["threshold"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.thor = resolve_model(local, cfg.tracking, device)
        if device == "cpu":
            # As in thor detect: mkldnn convolutions are faster on channels-last tensors.
            self.thor.unet.to(memory_format=torch.channels_last)
        self.inferer = ThorInferer.from_config(self.thor.schedule, cfg.thor.infer, cfg.thor.simplex)
        self.plan["precision"] = amp.resolve(cfg.thor.infer.precision, device, "thor-inference")

    @property
    def image_size(self) -> int:
        return self.thor.image_size

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.model.as_dict(), "plan": self.plan,
                "seg_threshold": self.seg_threshold}  # fmt: skip

    def run(self, images: list[np.ndarray], seeds: list[int]) -> list[AnomalyResult]:
        """One inferer call on the whole batch; image i uses ``seeds[i]`` (float32 (H, W))."""
        import torch

        for img in images:
            if img.shape != (self.image_size, self.image_size):
                raise DataError(
                    f"image is {img.shape[1]}x{img.shape[0]} pixels; expected "
                    f"{self.image_size}x{self.image_size} (the model's image size)"
                )
        batch = torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
        det = self.inferer(
            self.thor.unet,
            batch,
            seeds=[int(s) for s in seeds],
            image_shape=self.thor.image_shape,
            device=self.thor.device,
        )
        return [
            AnomalyResult(
                score=float(det.score[i]),
                anomaly_map=det.anomaly_map[i, 0].numpy(),
                reconstruction=det.reconstruction[i, 0].numpy(),
                seed=int(seeds[i]),
            )
            for i in range(len(images))
        ]


class SynthesisRunner:
    """A fine-tuned Stable Diffusion pipeline with the steps, scheduler and guidance of
    ``cfg.synthesis.generate``, and the prompt table it was trained on.

    Raises:
        ModelError: the reference does not resolve or is not a pipeline directory.
    """

    kind = "synthesis"

    def __init__(self, model_ref: str, cfg: Config):
        from meddiff.synthesis import components as C
        from meddiff.synthesis.stages import ImageGenerator

        self.cfg = cfg
        self.model, local = _fetch(model_ref, cfg)
        local = C.check_model_dir(local).resolve()
        self.prompts = model_prompts(local, cfg.prompts)
        g = cfg.synthesis.generate
        self.generator = ImageGenerator(str(local), g.model_dump(mode="json"))
        self.max_prompt_tokens = int(self.generator.pipe.tokenizer.model_max_length)
        self.plan = {
            "scheduler": g.scheduler,
            "steps": g.steps,
            "guidance_scale": g.guidance_scale,
            "output_size": g.output_size,
            "precision": g.precision,
        }

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.model.as_dict(), "plan": self.plan}

    def check_prompt(self, prompt: str) -> None:
        """DataError when the prompt is longer than the tokenizer takes."""
        ids = self.generator.pipe.tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise DataError(
                f"prompt: {len(ids)} tokens, more than the model's {self.max_prompt_tokens}"
            )

    def run(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """One pipeline call; image i from ``prompts[i]`` and ``seeds[i]``: uint8 (S, S, 3)."""
        out = self.generator(
            {"prompt": np.array(prompts, dtype=object), "seed": np.array(seeds, dtype=np.int64)}
        )
        return list(out["image"])


def model_prompts(model_dir, prompts_cfg=None) -> list[dict[str, Any]]:
    """The prompt table stored with a synthesis model (``prompts.csv`` beside the pipeline, as
    ``meddiff synth train`` saves it), as rows of prompt, label, cluster, count."""
    from meddiff.prompts import read_prompt_table

    path = Path(model_dir) / "prompts.csv"
    if not path.is_file():
        return []
    return [
        {"prompt": r.prompt, "label": r.label, "cluster": r.cluster, "count": r.count}
        for r in read_prompt_table(path, prompts_cfg)
    ]


def load_runner(kind: str, model_ref: str, cfg: Config) -> AnomalyRunner | SynthesisRunner:
    """A runner of ``kind`` ('anomaly' or 'synthesis') for ``model_ref``.

    Raises:
        ModelError: the model does not resolve, or is of the other kind (named).
    """
    cls = AnomalyRunner if kind == "anomaly" else SynthesisRunner
    try:
        return cls(model_ref, cfg)
    except ModelError as err:
        other = "synthesis" if kind == "anomaly" else "anomaly (THOR)"
        raise ModelError(
            f"{err} (the {kind} service needs a "
            f"{'THOR' if kind == 'anomaly' else 'Stable Diffusion'} model, not a {other} one)"
        ) from None


__all__ = ["AnomalyRunner", "ResolvedModel", "SynthesisRunner", "content_seed", "load_runner"]
