"""``meddiff serve run | check | promote | rollback``."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

from meddiff.cli import add_config_arguments, config_from_args

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "serve" / "tiny.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP services on Ray Serve (anomaly, synthesis)")
    s = p.add_subparsers(dest="serve_command", required=True, metavar="SUBCOMMAND")

    run = s.add_parser("run", help="start the services from a Serve config; stay up until Ctrl-C")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file")
    run.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else embedded)")
    run.set_defaults(handler=_run)

    check = s.add_parser("check", help="validate a Serve config strictly and resolve its models")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_check)

    for name, helptext in (
        ("promote", "point ALIAS at VERSION; running services switch without dropping requests"),
        ("rollback", "point ALIAS back at the version before the last promotion"),
    ):
        q = s.add_parser(name, help=helptext)
        q.add_argument("name", help="registered model name")
        if name == "promote":
            q.add_argument("version")
            q.add_argument(
                "--force",
                action="store_true",
                help="promote a synthesis model above evaluation.memorization.max_copy_rate",
            )
        q.add_argument("--alias", default="production")
        add_config_arguments(q)  # tracking.uri / --set select the registry
        q.set_defaults(handler=_promote if name == "promote" else _rollback)


def _tracking(args: argparse.Namespace):
    return config_from_args(args).tracking


def _check(args: argparse.Namespace) -> int:
    from meddiff.serving.check import check_config

    for entry in check_config(args.config):
        print(
            f"{entry['application']}: {entry['kind']} model {entry['model']} -> "
            f"version {entry['version']} ({entry['uri']})"
        )
    print(f"{args.config}: OK")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from meddiff.evaluation.memorization import check_promotion
    from meddiff.tracking.aliases import promote

    cfg = config_from_args(args)
    memorization = check_promotion(args.name, args.version, cfg, force=args.force)
    if memorization:
        print(memorization)
    before = promote(args.name, args.version, args.alias, cfg.tracking)
    print(f"models:/{args.name}@{args.alias}: {before or 'unset'} -> {args.version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from meddiff.tracking.aliases import rollback

    before, after = rollback(args.name, args.alias, _tracking(args))
    print(f"models:/{args.name}@{args.alias}: {before} -> {after}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from meddiff.serving import auth
    from meddiff.serving.check import check_config, read_config
    from meddiff.serving.launch import deploy, shutdown

    check_config(args.config)
    data = read_config(args.config)
    files = {(a.get("args") or {}).get("token_file") for a in data["applications"]}
    for f in files:
        token, where = auth.ensure_token(f)
    urls = deploy(data, address=args.address)
    print(f"token: {token}  (from {where}; send 'Authorization: Bearer <token>')")
    for name, url in urls.items():
        print(f"{name}: {url}  (page: {url}/, API docs: {url}/docs)")
    print("Ctrl-C stops the services.")
    # `kill` (SIGTERM, as from a process manager) stops them as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0
