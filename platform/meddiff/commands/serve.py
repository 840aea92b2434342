"""``meddiff serve run | check | promote | canary | rollback | token``."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

from meddiff.commands import add_config_arguments, config_from_args
from meddiff.serving.check import shipped_config

log = logging.getLogger(__name__)

DEFAULT_CONFIG = shipped_config("tiny")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP services on Ray Serve (anomaly, synthesis)")
    s = p.add_subparsers(dest="serve_command", required=True, metavar="SUBCOMMAND")

    run = s.add_parser(
        "run", help="start the services from a Serve config; stay up until Ctrl-C or SIGTERM "
        "(then drain: requests in flight finish within args.drain_grace_s)",
    )  # fmt: skip
    run.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="Serve config file (default: tiny.yaml shipped in meddiff/serving/configs/)",
    )
    run.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else embedded)")
    run.add_argument(
        "--timeout-s", type=float, default=600.0,
        help="how long the applications may take to start (a cold start on a busy machine)",
    )  # fmt: skip
    run.set_defaults(handler=_run)

    check = s.add_parser("check", help="validate a Serve config strictly and resolve its models")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_check)

    for name, helptext in (
        ("promote", "point ALIAS at VERSION (ends a canary); running services switch without "
                    "dropping requests"),
        ("canary", "send --percent P %% of the requests of services on ALIAS to VERSION; then "
                   "`promote` or `rollback`"),
        ("rollback", "end the alias's canary if one runs, else point ALIAS back at the version "
                     "before the last promotion"),
    ):  # fmt: skip
        q = s.add_parser(name, help=helptext)
        q.add_argument("name", help="registered model name")
        if name != "rollback":
            q.add_argument("version")
            q.add_argument(
                "--force",
                action="store_true",
                help="even a synthesis model above evaluation.memorization.max_copy_rate",
            )
        if name == "canary":
            q.add_argument("--percent", type=float, required=True, help="share in (0, 100]")
        q.add_argument("--alias", default="production")
        add_config_arguments(q)  # tracking.uri / --set select the registry
        q.set_defaults(
            handler={"promote": _promote, "canary": _canary, "rollback": _rollback}[name]
        )

    tok = s.add_parser("token", help="named tokens: add | rotate | revoke | list (no restart)")
    tok.add_argument("action", choices=["add", "rotate", "revoke", "list"])
    tok.add_argument("name", nargs="?")
    tok.add_argument("--credentials", type=Path, help="default ~/.meddiff/serve_credentials.yaml")
    tok.add_argument("--token-dir", type=Path, help="where new tokens go (~/.meddiff/tokens)")
    tok.set_defaults(handler=_token)


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


def _canary(args: argparse.Namespace) -> int:
    from meddiff.evaluation.memorization import check_promotion
    from meddiff.tracking.aliases import set_canary

    # A canary serves the candidate to real clients, so it passes the same memorization check.
    cfg = config_from_args(args)
    memorization = check_promotion(
        args.name, args.version, cfg, force=args.force, action="given a canary"
    )
    if memorization:
        print(memorization)
    current = set_canary(args.name, args.version, args.percent, args.alias, cfg.tracking)
    print(
        f"models:/{args.name}@{args.alias}: canary {args.percent:g}% to version {args.version} "
        f"(the alias stays at {current}; X-Model-Version says which answered)"
    )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from meddiff.tracking.aliases import canary_of, end_canary, rollback

    tracking = _tracking(args)
    if canary_of(args.name, args.alias, tracking) is not None:
        version = end_canary(args.name, args.alias, tracking)
        print(f"models:/{args.name}@{args.alias}: canary of version {version} ended")
        return 0
    before, after = rollback(args.name, args.alias, tracking)
    print(f"models:/{args.name}@{args.alias}: {before} -> {after}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from meddiff.errors import ConfigError
    from meddiff.serving import auth

    cred = auth.credentials_path(args.credentials)
    if args.action == "list":
        table = auth.parse_credentials(cred.read_text(), str(cred)) if cred.is_file() else {}
        print(f"{cred}: {', '.join(table) or 'no tokens'}")
        return 0
    if not args.name:
        raise ConfigError(f"meddiff serve token {args.action}: give the token's NAME")
    if args.action == "revoke":
        auth.revoke(args.name, cred)
        print(f"token '{args.name}' revoked in {cred} (running services refuse it within 1 s)")
        return 0
    path = auth.set_token(args.name, cred, args.token_dir, rotate=args.action == "rotate")
    print(f"token '{args.name}' stored in {path} (mode 600); its SHA-256 is in {cred} "
          "(running services accept it within 1 s)")  # fmt: skip
    return 0


def _run(args: argparse.Namespace) -> int:
    from meddiff.config.serving import AppArgs
    from meddiff.serving import auth
    from meddiff.serving.check import check_config, read_config
    from meddiff.serving.launch import deploy, drain, metrics_urls, shutdown

    check_config(args.config)
    data = read_config(args.config)
    apps = {a["name"]: AppArgs.model_validate(a.get("args") or {}) for a in data["applications"]}
    sources = {auth.ensure_token(a.token_file, a.credentials_file) for a in apps.values()}
    urls = deploy(data, address=args.address, timeout_s=args.timeout_s)
    print(f"tokens from: {'; '.join(sorted(sources))} (send 'Authorization: Bearer <token>')")
    metrics = metrics_urls(list(urls))
    for name, url in urls.items():
        print(f"{name}: {url}  (page: {url}/, API docs: {url}/docs, metrics: {metrics[name]})")
    print("Ctrl-C or SIGTERM drains and stops the services.", flush=True)
    # `kill` (SIGTERM, as from a process manager) stops them as Ctrl-C does: drain, then stop.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    grace = max(a.drain_grace_s for a in apps.values())
    try:
        start = time.monotonic()
        left = drain(list(urls), grace)
        print(f"drained in {time.monotonic() - start:.1f} s; requests still in flight: "
              f"{sum(left.values())}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("second interrupt: stopping without waiting", flush=True)
    finally:
        shutdown()
    return 0
