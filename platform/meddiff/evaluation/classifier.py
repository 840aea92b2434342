"""Downstream usefulness: a patch classifier trained on real, synthetic, or real + synthetic
data with Ray Train, always tested on the real test split (paper A: synthetic-only AUC 0.805).

Every arm gets the same seed and the same budget (``steps`` optimizer steps of ``batch_size``
images), so arms differ only in what they learn from. The model is a bare module; the training
loop, the Ray Data stage that scores the test split and the metrics are separate.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import training
from meddiff.config import Config
from meddiff.config.evaluation import ClassifierConfig
from meddiff.errors import ConfigError, DataError
from meddiff.files import save_figure, write_json

log = logging.getLogger(__name__)

ARMS = ("real", "synthetic", "real+synthetic")


def build_classifier(cfg: ClassifierConfig):
    """A binary patch classifier: images (n, 3, H, W) in [-1, 1] → logits (n,).

    ``small_cnn``: conv3×3-BN-ReLU-maxpool stages of ``cfg.channels``, global average pool, one
    linear unit. Any other name is a timm model with one output, trained from scratch.
    """
    import torch
    from torch import nn

    if cfg.model == "small_cnn":
        layers: list[nn.Module] = []
        cin = 3
        for c in cfg.channels:
            layers += [
                nn.Conv2d(cin, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = c
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1))
    else:
        import timm

        try:
            body = timm.create_model(cfg.model, pretrained=False, num_classes=1)
        except RuntimeError as err:
            raise ConfigError(
                f"evaluation.classifier.model: '{cfg.model}' is neither 'small_cnn' nor a timm "
                f"model ({err})"
            ) from None

    class _Binary(nn.Module):
        def __init__(self, body: nn.Module):
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).reshape(-1)

    return _Binary(body)


def to_input(images, device=None):
    """uint8 (n, H, W, 3) numpy or tensor → float (n, 3, H, W) in [-1, 1]."""
    import torch

    x = torch.as_tensor(images, device=device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _augment(x, generator=None):
    """Random 90° rotations and flips per batch (drawn from ``generator``): tissue has no
    canonical orientation."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        x = torch.flip(x, dims=(3,))
    return x


def model_config(cfg: ClassifierConfig) -> dict[str, Any]:
    """The settings that fix the classifier's architecture (checked when resuming)."""
    return {"model": cfg.model, "channels": list(cfg.channels)}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: for each arm in turn, a fresh model trained for ``steps``
    optimizer steps over this worker's shard of that arm's dataset (same seed for every arm).

    One Ray Train run serves all arms, so the workers start once. Checkpoints (every
    ``checkpoint_every`` steps and after each arm) hold the finished arms' weights and the
    current arm's training state; the final one holds a weights file per arm.
    """
    cfg = ClassifierConfig.model_validate(config["classifier"])
    ctx = training.WorkerContext.from_ray(
        use_gpu=cfg.use_gpu,
        run_dir=config["run_dir"],
        seed=int(config["seed"]),
        tracking=config.get("tracking"),
    )
    run = _ArmsRun(cfg, ctx, config)
    with training.restored(ctx.run_dir) as d:
        run.restore(d)
        # The first arm's state is read while the restored folder is at hand.
        run.train_all(d)


class _ArmsRun:
    """The arms of one Ray Train run, trained one after another with a global step count
    (arm i's step s is ``i * steps + s``: checkpoints and the fault drill count in it)."""

    def __init__(self, cfg: ClassifierConfig, ctx, config: dict[str, Any]):
        self.cfg, self.ctx = cfg, ctx
        self.arms: list[str] = list(config["arms"])
        self.sizes: dict[str, int] = config["sizes"]
        self.plan = config["plan"]
        self.precision = training.resolve_precision(cfg.precision, ctx.device.type == "cuda")
        self.weights: dict[str, Any] = {}  # finished arm → fp32 state dict
        self.metrics: dict[str, float] = {}
        self.arm_index, self.arm_step = 0, 0

    def restore(self, d: Path | None) -> None:
        import torch

        start = 0
        if d is not None:
            info = training.read_marker(d)
            self.arm_index, self.arm_step = int(info["arm_index"]), int(info["arm_step"])
            self.metrics = dict(info["arm_metrics"])
            for arm in self.arms[: self.arm_index]:
                self.weights[arm] = torch.load(d / f"{arm}.pt", weights_only=True)
            start = int(info["step"])
        self.ctx.log_metrics({"resumed_from_step": start}, start)

    def train_all(self, resume: Path | None) -> None:
        import ray.train

        for i in range(self.arm_index, len(self.arms)):
            arm = self.arms[i]
            shard = ray.train.get_dataset_shard(arm)
            self._train_arm(i, arm, shard, resume if self.arm_step else None)
            self.arm_index, self.arm_step, resume = i + 1, 0, None
        if self.arm_index == len(self.arms) and not self.weights.keys() >= set(self.arms):
            raise RuntimeError("classifier run ended without every arm's weights")
        self._checkpoint(None, final=True)

    def _train_arm(self, i: int, arm: str, shard, resume: Path | None) -> None:
        import torch

        cfg, ctx = self.cfg, self.ctx
        # Same initial weights for every arm and worker; augmentation and shuffling differ per
        # worker and step (the step generator) but not per arm.
        torch.manual_seed(ctx.seed)
        model = build_classifier(cfg).to(ctx.device)
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_steps)
        per_worker = max(1, cfg.batch_size // ctx.world)
        strategy = training.make_strategy(
            cfg, ctx, model, opt, sched, micro_batch=per_worker, grad_clip=cfg.max_grad_norm
        )
        if resume is not None:
            strategy.load(resume)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        n_train = self.sizes[arm]
        # Full batches only, unless a worker's share is smaller than two batches (a tiny
        # synthetic set): then the short last batch is kept rather than leaving nothing.
        drop_last = n_train // ctx.world >= 2 * per_worker
        base, step, epoch, losses = i * cfg.max_steps, self.arm_step, 0, []
        model.train()
        while step < cfg.max_steps:
            batches = shard.iter_torch_batches(
                batch_size=per_worker,
                local_shuffle_buffer_size=max(4 * per_worker, 256),
                local_shuffle_seed=ctx.seed + epoch,
                drop_last=drop_last,
            )
            seen = 0
            for batch in batches:
                ctx.fault_drill(cfg, base + step + 1, in_checkpoint=False)
                x = _augment(to_input(batch["image"], ctx.device), ctx.generator(base + step))
                y = batch["label"].to(ctx.device).float()
                with strategy.autocast():
                    logits = strategy.model(x)
                loss = loss_fn(logits.float(), y)
                strategy.step(loss)
                losses.append(float(loss.detach()))
                step += 1
                seen += 1
                if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    self.arm_step = step
                    self._checkpoint(strategy, loss=float(np.mean(losses[-20:])))
                if step >= cfg.max_steps:
                    break
            if seen == 0:
                raise DataError(f"a classifier worker got no training images ({n_train} in all)")
            epoch += 1
        self.weights[arm] = strategy.fp32_state_dict()
        self.metrics.update(
            {
                f"{arm}/loss": float(np.mean(losses[-20:])),
                f"{arm}/steps": step,
                f"{arm}/epochs": epoch,
            }
        )

    def _checkpoint(self, strategy, *, loss: float | None = None, final: bool = False) -> None:
        import torch

        cfg, ctx = self.cfg, self.ctx
        step = self.arm_index * cfg.max_steps + self.arm_step

        def write(tmp: Path) -> None:
            if strategy is not None:
                strategy.save(tmp, ctx.rank)
            if ctx.rank == 0:
                for arm, state in self.weights.items():
                    torch.save(state, tmp / f"{arm}.pt")

        info = training.marker_info(
            cfg, world=ctx.world, precision=self.precision, model_config=model_config(cfg)
        )
        info.update(
            plan=self.plan,
            arms=self.arms,
            arm_index=self.arm_index,
            arm_step=self.arm_step,
            arm_metrics=self.metrics,
        )
        metrics = dict(self.metrics) if final else {"step": step, "loss": loss}
        if loss is not None:
            ctx.log_metrics({"loss": loss}, step)
        training.save_and_report(ctx, step, metrics, write, info, drill=cfg)


def _slug(arm: str) -> str:
    """A file- and metric-safe arm name: 'baseline/real+synthetic' → 'baseline-real-synthetic'."""
    return arm.replace("+", "-").replace("/", "-").replace(" ", "_")


class ScoreStage:
    """Ray Data stage: patch batches → ``score/<name>`` (sigmoid probability of label 1) for each
    named weights file, and ``label``. All models score each batch, so the test split is read once.
    """

    def __init__(
        self, classifier: dict[str, Any], weights: dict[str, str], device: str | None = None
    ):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = ClassifierConfig.model_validate(classifier)
        self.models = {}
        for name, path in weights.items():
            model = build_classifier(cfg)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.models[name] = model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out = {"label": np.asarray(batch["label"], dtype=np.int64)}
        with torch.inference_mode():
            x = to_input(batch["image"], self.device)
            for name, model in self.models.items():
                out[f"score/{name}"] = torch.sigmoid(model(x)).float().cpu().numpy()
        return out


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC, accuracy at 0.5 and the ROC curve of scores (n,) against 0/1 labels (n,)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise DataError("the test split holds one class only; AUC is undefined")
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "accuracy": float(((scores >= 0.5) == (labels == 1)).mean()),
        "n_test": int(len(labels)),
        "roc": {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()},
    }


def _dataset(root: str | Path, split: str, cfg: Config, size: int):
    from meddiff.data.datasets import pcam_dataset

    data = cfg.data.model_copy(
        update={"pcam": cfg.data.pcam.model_copy(update={"patch_size": size})}
    )
    return pcam_dataset(root, split, data).select_columns(["image", "label"])


def train_arms(
    cfg: Config,
    real: str | Path,
    synthetic: str | Path | None,
    out: str | Path,
    *,
    arms: list[str] | None = None,
    name: str = "classifier",
) -> dict[str, dict[str, Any]]:
    """Train and test one classifier per arm; returns ``{arm: metrics}`` and writes ``roc.png``
    and each arm's weights under ``out``.

    ``real`` is a PCam directory with the ``train_split`` and ``test_split`` splits; ``synthetic``
    a PCam-layout synthetic set (its ``evaluation.split``), needed by the synthetic arms.
    """
    ccfg = cfg.evaluation.classifier
    arms = list(arms or ccfg.arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown classifier arm(s) {unknown}; expected some of {list(ARMS)}")
    if any(a != "real" for a in arms) and synthetic is None:
        raise DataError(f"arms {arms} need a synthetic set")
    real_train = (real, ccfg.train_split)
    synth = (synthetic, cfg.evaluation.split)
    plan = {
        "real": [real_train],
        "synthetic": [synth],
        "real+synthetic": [real_train, synth],
    }
    return train_plan(cfg, {arm: plan[arm] for arm in arms}, real, out, name=name)


def train_plan(
    cfg: Config,
    plan: Mapping[str, list[tuple[str | Path, str]]],
    real: str | Path,
    out: str | Path,
    *,
    name: str = "classifier",
) -> dict[str, dict[str, Any]]:
    """Train one classifier per named arm on the union of its ``(root, split)`` sets, all arms in
    one Ray Train run (same seed and budget each), and test every arm on ``real``'s test split.
    """
    from meddiff import runtime
    from meddiff.evaluation.features import check_same_size

    ccfg = cfg.evaluation.classifier
    arms = list(plan)
    if not arms:
        raise ConfigError("no classifier arms to train")
    sets = {"real test": (real, ccfg.test_split)}
    for arm, parts in plan.items():
        for i, part in enumerate(parts):
            sets[f"{arm} #{i + 1}"] = part
    size = check_same_size(sets)

    runtime.connect(cfg.runtime)
    _check_gpus(ccfg)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    test = _dataset(real, ccfg.test_split, cfg, size)
    datasets, n_train = {}, {}
    for arm, parts in plan.items():
        dss = [_dataset(root, split, cfg, size) for root, split in parts]
        datasets[_slug(arm)] = dss[0] if len(dss) == 1 else dss[0].union(*dss[1:])
        n_train[arm] = int(datasets[_slug(arm)].count())
    log.info("classifier arms %s: training images %s, %d steps each", arms, n_train, ccfg.max_steps)
    ckpt = _train(cfg, plan, n_train, datasets, out / "ray_train", name)
    info = training.read_marker(ckpt)
    weights = {}
    for arm in arms:
        weights[arm] = out / f"{_slug(arm)}.pt"
        tmp = weights[arm].with_name(weights[arm].name + ".partial")
        tmp.write_bytes((ckpt / f"{_slug(arm)}.pt").read_bytes())
        tmp.replace(weights[arm])
    done = info["arm_metrics"]
    results = score_split(test, ccfg, weights)
    for arm, metrics in results.items():
        metrics.update(
            n_train=n_train[arm],
            steps=int(done.get(f"{_slug(arm)}/steps", ccfg.max_steps)),
            train_loss=float(done.get(f"{_slug(arm)}/loss", float("nan"))),
            weights=str(weights[arm]),
        )
        log.info(
            "classifier arm %s: AUC %.3f accuracy %.3f", arm, metrics["auc"], metrics["accuracy"]
        )
    plot_roc(results, out / "roc.png", title=f"ROC on the real {ccfg.test_split} split")
    return results


def _train(
    cfg: Config,
    plan: Mapping[str, list[tuple[str | Path, str]]],
    n_train: dict[str, int],
    datasets: dict[str, Any],
    storage: Path,
    name: str,
) -> Path:
    """Train every arm of ``plan`` (or resume the run under ``storage/name``); returns the final
    checkpoint (one weights file per arm).

    A rerun of the same plan (arms, data, sizes) resumes the run, after the architecture was
    checked; a different plan starts over, as its old checkpoints trained on other data.
    """
    from meddiff import tracking

    ccfg = cfg.evaluation.classifier
    run_dir = storage / name
    key = {
        "arms": {_slug(a): [[str(Path(r).resolve()), s] for r, s in p] for a, p in plan.items()},
        "sizes": {_slug(a): n for a, n in n_train.items()},
        "steps": ccfg.max_steps,
        "batch_size": ccfg.batch_size,
        "seed": cfg.runtime.seed,
    }
    last = training.latest_checkpoint(run_dir)
    if last is not None and training.read_marker(last).get("plan") != key:
        log.info("classifier run %s trained another plan: starting over", run_dir)
        shutil.rmtree(run_dir)
        last = None
    training.check_run(
        run_dir,
        ccfg,
        use_gpu=ccfg.use_gpu,
        section="evaluation.classifier",
        model_section="evaluation.classifier",
        model_config=model_config(ccfg),
        fresh=f"delete {run_dir} to start fresh",
    )
    if last is not None and training.read_marker(last)["arm_index"] == len(plan):
        return last  # every arm finished in an earlier run
    run = tracking.active_run()  # the eval-classifier run, when called from train_and_log
    result = training.fit(
        train_loop,
        {
            "classifier": ccfg.model_dump(),
            "seed": cfg.runtime.seed,
            "arms": [_slug(a) for a in plan],
            "sizes": key["sizes"],
            "plan": key,
            "run_dir": str(run_dir),
            "tracking": (
                {"uri": tracking.tracking_uri(cfg.tracking), "run_id": run.run_id} if run else None
            ),
        },
        ccfg,
        num_workers=ccfg.num_workers,
        use_gpu=ccfg.use_gpu,
        cpus_per_worker=ccfg.cpus_per_worker,
        storage=storage,
        name=name,
        datasets=datasets,
        section="evaluation.classifier",
    )
    if result.checkpoint is None:
        raise RuntimeError("classifier training reported no checkpoint")
    return Path(result.checkpoint.path)


def score_split(test, ccfg: ClassifierConfig, weights: dict[str, Path]) -> dict[str, dict]:
    """Score a Ray dataset of test patches with each named weights file: AUC, accuracy, ROC."""
    from ray.data import ActorPoolStrategy

    scored = test.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            "classifier": ccfg.model_dump(),
            "weights": {k: str(v) for k, v in weights.items()},
        },
        batch_size=ccfg.eval_batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_gpus=1 if ccfg.use_gpu else None,
    )
    parts = list(scored.iter_batches(batch_size=None, batch_format="numpy"))
    labels = np.concatenate([p["label"] for p in parts])
    return {
        name: binary_metrics(labels, np.concatenate([p[f"score/{name}"] for p in parts]))
        for name in weights
    }


def _check_gpus(ccfg: ClassifierConfig) -> None:
    import ray

    if not ccfg.use_gpu:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < 1:
        raise ConfigError(
            "evaluation.classifier.use_gpu is true but the Ray cluster has no GPU; "
            "set evaluation.classifier.use_gpu=false (or use the tiny preset) to train on CPUs"
        )


def plot_roc(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """ROC curves of every arm in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for arm, res in results.items():
        ax.plot(res["roc"]["fpr"], res["roc"]["tpr"], label=f"{arm} (AUC {res['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="#999", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def run_classifier(
    cfg: Config,
    real: str | Path,
    synthetic: str | Path | None,
    out: str | Path,
    *,
    arms: list[str] | None = None,
) -> dict[str, Any]:
    """:func:`train_arms` recorded as an MLflow run (nested under an active one); also writes
    ``classifier.json``. Returns ``{"arms": {arm: metrics}, "roc": png, "json": path}``."""
    from meddiff import tracking

    with tracking.start_run(cfg, "eval-classifier") as run:  # nested under an active run
        run.log_params({"real": str(real), "synthetic": str(synthetic)})
        results = train_arms(cfg, real, synthetic, out, arms=arms)
        for arm, res in results.items():
            run.log_metrics(
                {f"{_slug(arm)}/auc": res["auc"], f"{_slug(arm)}/accuracy": res["accuracy"]}
            )
        out = Path(out)
        summary = {
            "arms": results,
            "roc": str(out / "roc.png"),
            "json": str(out / "classifier.json"),
        }
        write_json(out / "classifier.json", summary)
        run.log_artifact(str(out / "roc.png"))
        run.log_artifact(str(out / "classifier.json"))
    return summary
