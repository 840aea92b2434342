"""``meddiff eval``: judge synthetic data (fidelity, classifier, reader study, the experiment).

Every command prints its metrics as JSON on stdout, or writes them to ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from meddiff import storage
from meddiff.files import write_text
from meddiff.storage import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("eval", help="judge synthetic data: fidelity, classifier, reader study")
    cmds = group.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    _add_fidelity(cmds)
    _add_classifier(cmds)
    _add_reader_study(cmds)
    _add_compare_prompting(cmds)
    _add_seeds(cmds)


def _add_fidelity(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    fid = cmds.add_parser(
        "fidelity",
        help="FD/KID/precision/recall/density/coverage of synthetic sets vs a real set, "
        "UMAP picture and HTML report",
    )
    fid.add_argument("--real", required=True, type=path_arg, help="real PCam directory")
    fid.add_argument(
        "--synthetic",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="synthetic PCam-layout directory or s3:// prefix (repeatable; NAME labels it in "
        "the report)",
    )
    fid.add_argument(
        "--real-prompts", type=path_arg, help="CSV (index,prompt) giving each real image's prompt"
    )
    fid.add_argument(
        "--out", type=path_arg, help="write features, umap.png and report.html here (or s3://)"
    )
    fid.add_argument("--no-umap", action="store_true", help="skip the UMAP picture")
    fid.add_argument("--local", action="store_true", help="extract features without Ray")
    _overwrite_arg(fid)
    _json_arg(fid)
    add_config_arguments(fid)
    fid.set_defaults(handler=_fidelity)


def _add_classifier(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    clf = cmds.add_parser(
        "classifier",
        help="train a patch classifier on real / synthetic / both (Ray Train), test on real",
    )
    clf.add_argument(
        "--real", required=True, type=path_arg, help="real PCam directory (train, test)"
    )
    clf.add_argument("--synthetic", type=path_arg, help="synthetic PCam-layout directory")
    clf.add_argument(
        "--arms",
        nargs="+",
        choices=["real", "synthetic", "real+synthetic"],
        help="which training sets (default: evaluation.classifier.arms)",
    )
    clf.add_argument(
        "--out", required=True, type=path_arg, help="weights, roc.png, classifier.json (or s3://)"
    )
    _overwrite_arg(clf)
    _json_arg(clf)
    add_config_arguments(clf)
    clf.set_defaults(handler=_classifier)


def _add_reader_study(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    rs = cmds.add_parser("reader-study", help="blinded real-vs-synthetic reading: export, score")
    rcmds = rs.add_subparsers(dest="reader_command", required=True, metavar="STEP")
    exp = rcmds.add_parser("export", help="write study.html (blinded) and key.json")
    exp.add_argument("--real", required=True, type=path_arg)
    exp.add_argument("--synthetic", required=True, type=path_arg)
    exp.add_argument("--out", required=True, type=path_arg)
    exp.add_argument("--num-real", type=int, help="default: evaluation.reader_study.num_real")
    exp.add_argument("--num-synthetic", type=int, help="default: ...num_synthetic")
    _overwrite_arg(exp)
    _json_arg(exp)
    add_config_arguments(exp)
    exp.set_defaults(handler=_rs_export)
    score = rcmds.add_parser("score", help="score readers' answer files against the key")
    score.add_argument("--key", required=True, type=Path, help="the study's key.json")
    score.add_argument("answers", nargs="+", type=Path, help="answer files (JSON)")
    _json_arg(score)
    score.set_defaults(handler=_rs_score)


def _add_compare_prompting(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    cmp_ = cmds.add_parser(
        "compare-prompting",
        help="baseline vs morphology prompts end to end: prompts, fine-tune, generate, evaluate",
    )
    cmp_.add_argument("--data", required=True, type=path_arg, help="real PCam directory")
    cmp_.add_argument(
        "--out",
        required=True,
        type=path_arg,
        help="experiment output root, or an s3:// prefix (uploaded at the end; no resume)",
    )
    cmp_.add_argument(
        "--strategies", nargs="+", default=["baseline", "morphology"], help="prompt strategies"
    )
    cmp_.add_argument("--no-classifier", action="store_true", help="skip the classifier arms")
    _overwrite_arg(cmp_)
    _json_arg(cmp_)
    add_config_arguments(cmp_)
    cmp_.set_defaults(handler=_compare)


def _add_seeds(cmds: argparse._SubParsersAction) -> None:
    seeds = cmds.add_parser(
        "seeds",
        help="one table from compare-prompting or thor evaluate runs that differ only in their "
        "seed",
    )
    seeds.add_argument(
        "runs", nargs="+", type=Path, help="compare-prompting or thor evaluate --out folders"
    )
    seeds.add_argument("--out", type=Path, help="write seeds.json and seeds.csv here")
    seeds.set_defaults(handler=_seeds)


def _overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace meddiff's earlier output at --out (files meddiff did not write stay)",
    )


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="FILE", help="write JSON here, not stdout")


def _emit(args: argparse.Namespace, payload: Any) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, text + "\n")
    else:
        print(text)


def _input(path: str | Path | None) -> Path | None:
    """A local copy of an input folder or file (an s3:// one must be a complete upload)."""
    return None if path is None else storage.local_input(path)


def _parse_sets(items: list[str]) -> dict[str, Path]:
    from meddiff.errors import ConfigError

    sets: dict[str, Path] = {}
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("synthetic" if len(items) == 1 else f"synthetic{i + 1}"), item
        if not name or not path:
            raise ConfigError(f"--synthetic '{item}': expected DIR or NAME=DIR")
        if name in sets or name == "real":
            raise ConfigError(f"--synthetic: the name '{name}' is used twice (or is 'real')")
        sets[name] = _input(path_arg(path))
    return sets


def _fidelity(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.evaluation.judge import run_fidelity

    cfg = config_from_args(args)

    real, sets = _input(args.real), _parse_sets(args.synthetic)
    real_prompts = _input(args.real_prompts)

    def run(out: Path) -> dict:
        return run_fidelity(
            cfg,
            real,
            sets,
            out,
            real_prompts=real_prompts,
            use_ray=not args.local,
            umap=not args.no_umap,
        )

    if args.out is not None:
        with storage.OutputLocation.open(args.out, overwrite=args.overwrite) as loc:
            result = loc.rebase(run(loc.staging))
    else:
        import tempfile

        # The report and picture are still made, for the MLflow run, then removed with the
        # folder: without --out nothing is left on disk and no printed path points at nothing.
        with tempfile.TemporaryDirectory(prefix="meddiff-fidelity-") as tmp:
            result = run(Path(tmp))
        result = {k: v for k, v in result.items() if not str(v).startswith(tmp)}
        result["files"] = "none kept (no --out); report.html and umap.png are MLflow artifacts"
    _emit(args, result)
    return 0


def _classifier(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.evaluation.classifier import run_classifier

    cfg = config_from_args(args)
    real, synthetic = _input(args.real), _input(args.synthetic)
    # A rerun of the same plan resumes its Ray Train run there (the checkpoints stay).
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite, resume=True) as loc:
        result = loc.rebase(run_classifier(cfg, real, synthetic, loc.staging, arms=args.arms))
    for arm in result["arms"].values():
        arm.pop("roc", None)  # the curve is in roc.png and classifier.json
    _emit(args, result)
    return 0


def _rs_export(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.evaluation.reader_study import export_study
    from meddiff.reports import provenance

    cfg = config_from_args(args)
    rs = cfg.evaluation.reader_study
    real, synthetic = _input(args.real), _input(args.synthetic)
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite) as loc:
        key = export_study(
            real,
            synthetic,
            loc.staging,
            num_real=args.num_real or rs.num_real,
            num_synthetic=args.num_synthetic or rs.num_synthetic,
            real_split=cfg.evaluation.real_split,
            synthetic_split=cfg.evaluation.split,
            seed=cfg.runtime.seed,
            display_size=rs.display_size,
            provenance=provenance(cfg),
        )
    _emit(
        args,
        {
            "study_id": key["study_id"],
            "images": len(key["items"]),
            "page": str(storage.join(args.out, "study.html")),
            "key": str(storage.join(args.out, "key.json")),
        },
    )
    return 0


def _rs_score(args: argparse.Namespace) -> int:
    from meddiff.evaluation.reader_study import score_answers

    _emit(args, score_answers(args.key, args.answers))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.evaluation.experiment import compare_prompting

    cfg = config_from_args(args)
    data = _input(args.data)
    # A rerun skips the steps an earlier run finished there (local --out).
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite, resume=True) as loc:
        result = compare_prompting(
            cfg, data, loc.staging, strategies=args.strategies, classifier=not args.no_classifier
        )
        result = loc.rebase(result)
    _emit(args, result)
    if args.json:
        print(f"report: {result['report']}")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from meddiff.evaluation.seeds import summarize_runs

    result = summarize_runs(args.runs, args.out)
    print(result["markdown"], end="")
    return 0
