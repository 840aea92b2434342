"""HTTP services on Ray Serve: THOR anomaly detection and Stable Diffusion synthesis.

- :mod:`~meddiff.serving.auth`: the bearer token (Ray's token auth does not cover Serve's HTTP
  port, so every ``/v1`` route checks it in the ingress);
- :mod:`~meddiff.serving.limits`: body caps, content types, PNG decoding into 4xx answers;
- :mod:`~meddiff.serving.schemas`: request and response models (the OpenAPI schema);
- :mod:`~meddiff.serving.runners`: the models as plain objects (no Ray): load, run a batch;
- :mod:`~meddiff.serving.api`: the FastAPI apps over a backend (a runner in tests, a Serve handle
  when deployed);
- :mod:`~meddiff.serving.deployments`: the Serve deployments and the builders that Serve config
  files (the shipped ``configs/tiny.yaml`` and ``configs/full.yaml``) name in ``import_path``.
"""
