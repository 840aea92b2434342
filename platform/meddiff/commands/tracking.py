"""``meddiff tracking server`` (a team's MLflow server) and ``meddiff lineage`` (where a
registered model came from)."""

from __future__ import annotations

import argparse
import signal


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    group = sub.add_parser("tracking", help="run an MLflow tracking server for a team")
    cmds = group.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    server = cmds.add_parser(
        "server",
        help="start `mlflow server`: database backend, artifacts proxied to a bucket or directory",
    )
    server.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlruns.db",
        help="postgresql://user:password@host:5432/db for a team (default: sqlite:///mlruns.db, "
        "one user)",
    )
    server.add_argument(
        "--artifacts-destination",
        default="mlartifacts",
        help="where the server stores artifacts: s3://bucket/prefix or a directory "
        "(default: ./mlartifacts); clients upload through the server",
    )
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=2, help="server worker processes")
    server.add_argument(
        "--allowed-hosts",
        help="Host names clients may use (MLflow answers only localhost by default), e.g. "
        "'mlflow.internal,mlflow.internal:5000'",
    )
    server.add_argument("--log", metavar="FILE", help="append the server's output to FILE")
    server.add_argument(
        "--wait-s", type=float, default=180.0, help="how long to wait for /health at start"
    )
    add_config_arguments(server)
    server.set_defaults(handler=_server)

    lineage = sub.add_parser(
        "lineage", help="print where a registered model came from, back to the input files"
    )
    lineage.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    lineage.add_argument("--json", action="store_true", help="print the chain as JSON")
    add_config_arguments(lineage)
    lineage.set_defaults(handler=_lineage)


def _server(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.tracking.server import start_server, stop_server

    cfg = config_from_args(args)
    proc = start_server(
        args.backend_store_uri,
        args.artifacts_destination,
        host=args.host,
        port=args.port,
        workers=args.workers,
        allowed_hosts=args.allowed_hosts,
        endpoint_url=cfg.storage.endpoint_url,
        log_path=args.log,
        timeout_s=args.wait_s,
    )
    print(f"MLflow server at http://{args.host}:{args.port} (pid {proc.pid}); Ctrl-C stops it")
    print(f"  export MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)

    def _stop(signum, frame):  # SIGTERM too: the server runs in its own session
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)
        return 0


def _lineage(args: argparse.Namespace) -> int:
    import json

    from meddiff.commands import config_from_args
    from meddiff.tracking.lineage import format_lineage, model_lineage

    cfg = config_from_args(args)
    chain = model_lineage(args.model, cfg.tracking)
    print(json.dumps(chain, indent=2) if args.json else format_lineage(chain))
    return 0
