"""The demo's last step: deploy both services from the registry (the shipped ``tiny`` Serve
config, the demo's registered models behind the ``production`` alias), send one anomaly and one
synthesis request over HTTP, save and print what came back, and shut the services down."""

from __future__ import annotations

import base64
import copy
import socket
from pathlib import Path
from typing import Any

from meddiff.config import Config


def _port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:  # taken (another service on this machine): any free port
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def serve_demo(
    cfg: Config, out: Path, thor_model: str, sd_model: str, slice_png: Path, prompt: str
) -> dict[str, Any]:
    """Returns what each service answered (score, version, seeds, saved files)."""
    import requests

    from meddiff.serving import auth
    from meddiff.serving.check import check_config, read_config, shipped_config
    from meddiff.serving.launch import deploy, shutdown
    from meddiff.tracking import tracking_uri
    from meddiff.tracking.aliases import parse_ref, promote

    out.mkdir(parents=True, exist_ok=True)
    (out / "slice.png").write_bytes(slice_png.read_bytes())  # the README's curl lines send it
    data = copy.deepcopy(read_config(shipped_config("tiny")))
    models = {"anomaly": thor_model, "synthesis": sd_model}
    token = auth.read_token(out / "token")
    for app in data["applications"]:
        ref = models[app["name"]]
        name, _, version = parse_ref(ref)
        promote(name, version, "production", cfg.tracking)
        args = app.setdefault("args", {})
        args["token_file"] = str(out / "token")
        args["set"] = [*args.get("set", []), f"tracking.uri={tracking_uri(cfg.tracking)}"]
        app["deployments"][0]["user_config"]["model"] = f"models:/{name}@production"
    data["http_options"]["port"] = _port(data["http_options"]["port"])
    (out / "serve.yaml").write_text(__import__("yaml").safe_dump(data, sort_keys=False))
    check_config(out / "serve.yaml")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        urls = deploy(data, timeout_s=600)  # a cold start on a busy 2-core machine
        r = requests.post(
            f"{urls['anomaly']}/v1/anomaly",
            data=slice_png.read_bytes(),
            headers={**headers, "Content-Type": "image/png"},
            timeout=300,
        )
        r.raise_for_status()
        a = r.json()
        (out / "anomaly_map.png").write_bytes(base64.b64decode(a["anomaly_map_png"]))
        s = requests.post(
            f"{urls['synthesis']}/v1/synthesis",
            json={"prompt": prompt, "n": 2, "seed": 0},
            headers=headers,
            timeout=300,
        )
        s.raise_for_status()
        b = s.json()
        for im in b["images"]:
            (out / f"synthetic_seed{im['seed']}.png").write_bytes(base64.b64decode(im["png"]))
    finally:
        shutdown()
    result = {
        "config": str(out / "serve.yaml"),
        "anomaly": {
            "image": str(slice_png),
            "score": a["score"],
            "seed": a["seed"],
            "model": f"models:/{a['model']['name']}/{a['model']['version']}",
            "plan": a["model"]["plan"]["schedule"],
            "map": str(out / "anomaly_map.png"),
        },
        "synthesis": {
            "prompt": b["prompt"],
            "seeds": [im["seed"] for im in b["images"]],
            "model": f"models:/{b['model']['name']}/{b['model']['version']}",
            "images": [str(out / f"synthetic_seed{im['seed']}.png") for im in b["images"]],
        },
    }
    print(
        f"\nServing (HTTP, {urls['anomaly'].rsplit('/', 1)[0]}): POST /anomaly/v1/anomaly -> "
        f"score {a['score']:.4f} from {result['anomaly']['model']} ({result['anomaly']['plan']}); "
        f"POST /synthesis/v1/synthesis -> {len(b['images'])} patches of '{b['prompt']}' from "
        f"{result['synthesis']['model']}, saved under {out}"
    )
    return result
