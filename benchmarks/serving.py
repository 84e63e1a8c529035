"""The served champion against in-process prediction, on the same test images, in one run.

    python -m benchmarks.serving          # after `make pipeline` (it registers models:/fashion-mnist@champion)

Starts `mlflow models serve -m models:/fashion-mnist@champion --env-manager local` on a free port,
then times, one after the other on the same images: single-image requests over HTTP (latency p50 and
p99 over REQUESTS requests), 256-image requests (images/s), and the same two loads in this process
with the champion loaded by mlflow.pyfunc and with `fmnist predict`'s own path (the checkpoint). One
JSON line per comparison, with the ratio to in-process prediction. The server is stopped in every case.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import emit, machine
from fmnist import tracking
from fmnist.commands import predict
from fmnist.data.loader import load_split
from fmnist.tracking import registry

REQUESTS = 200
BATCH = 256
BATCH_REQUESTS = 20
URI = f"models:/{registry.REGISTERED_MODEL}@{registry.ALIAS}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, images: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": images.tolist()}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"the server answered {e.code}: {e.read().decode(errors='replace')[-3000:]}") from None


def _latencies(call, images: np.ndarray, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call(images[i % len(images)][None])
        out.append(time.perf_counter() - t0)
    return out


def _throughput(call, images: np.ndarray) -> float:
    t0 = time.perf_counter()
    for i in range(BATCH_REQUESTS):
        call(images[(i * BATCH) % (len(images) - BATCH):][:BATCH])
    return BATCH * BATCH_REQUESTS / (time.perf_counter() - t0)


def _summary(lat: list[float], ips: float) -> dict:
    q = statistics.quantiles(lat, n=100)
    return {"p50_ms": round(1000 * statistics.median(lat), 2), "p99_ms": round(1000 * q[98], 2),
            "images_per_s_256": round(ips)}


def serve(port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # it runs `uvicorn` from there
    return subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    emit(machine())
    test = load_split("test")
    images = test.images[:1024].float().numpy()
    model = registry.load(URI)  # fails with the registered names if there is no champion yet
    checkpoint = Path("models") / f"{tracking.run_tags(_champion_run())['model']}.pt"

    in_process = {"pyfunc": model.predict,
                  # its contract: uint8 images (it normalises a copy of them in place)
                  "fmnist predict (checkpoint)": lambda x: predict.probabilities(checkpoint,
                                                                                 torch.from_numpy(x).to(torch.uint8))[0]}
    results = {name: _summary(_latencies(call, images, REQUESTS), _throughput(call, images))
               for name, call in in_process.items()}

    port = _free_port()
    server = serve(port)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow models serve did not start") from None
                time.sleep(0.5)
        def call(x: np.ndarray) -> np.ndarray:
            return _post(f"{url}/invocations", x)

        _latencies(call, images, 20)  # warm-up
        served = _summary(_latencies(call, images, REQUESTS), _throughput(call, images))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for name, ours in results.items():
        emit({"comparison": f"served {URI} (HTTP, JSON) against {name} in-process", "model": str(checkpoint),
              "served": served, "in_process": ours, "requests": REQUESTS, "batch": BATCH,
              "p50_ratio": round(served["p50_ms"] / ours["p50_ms"], 1),
              "throughput_ratio": round(served["images_per_s_256"] / ours["images_per_s_256"], 2)})
    return 0


def _champion_run() -> str:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking.tracking_uri())
    return c.get_model_version_by_alias(registry.REGISTERED_MODEL, registry.ALIAS).run_id


if __name__ == "__main__":
    sys.exit(main())
