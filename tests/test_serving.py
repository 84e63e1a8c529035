"""Models leave the lab: every training logs an MLflow Model (pt2, loads without unpickling code), the
register stage registers the best (on validation) as the `champion` of `fashion-mnist`, `mlflow models
serve` answers with the probabilities `fmnist predict` gives, and `fmnist predict` takes a model URI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import specs
from fmnist import checkpoint
from fmnist.core.export import RawImageClassifier
from fmnist.tracking import registry
from fmnist.commands import predict, register
from fmnist.files import write_json
from fmnist.data.loader import load_split
from reliability_helpers import env, free_port, make_repo, runs, wait_for_http

SETS = ("train.subset=300", "train.epochs=1", "train.batch_size=50", "models.tinyvgg.hidden_units=4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """A repository where linear and tinyvgg (flip test-time augmentation on) were trained, evaluated
    and reported by the stages, with the default store: ROOT/mlflow.db."""
    processed = request.getfixturevalue("module_processed")
    root = make_repo(tmp_path_factory.mktemp("serving") / "repo", processed)
    sets = [*SETS, "evaluate.models.fmnet.tta_flip=false", "+evaluate.models.tinyvgg.tta_flip=true"]
    args = [a for s in sets for a in ("--set", s)]
    for model in ("linear", "tinyvgg"):
        for stage in (["train", model, "--no-progress"], ["evaluate", model]):
            res = subprocess.run([sys.executable, "-m", "fmnist", *stage, *args], cwd=root, env=env(),
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr
    return root, sets


@pytest.fixture(scope="module")
def module_processed(tmp_path_factory):
    from conftest import REPO, write_raw
    from fmnist import config
    from fmnist.commands import preprocess

    tmp = tmp_path_factory.mktemp("data")
    out = tmp / "processed"
    preprocess.run(config.load(REPO / "params.yaml"), raw=write_raw(tmp / "raw"), out=out)
    return out


@pytest.fixture
def store(trained, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a model that needs pickle would fail
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def run_id(root: Path, model: str) -> str:
    return checkpoint.read(root / "models" / f"{model}.pt")[0].run_id


def test_every_training_logs_a_pt2_model_that_needs_nothing_of_this_package(trained, store):
    root, _ = trained
    test = load_split("test", root / "data/processed")
    x = test.images[:50]
    for model in ("linear", "tinyvgg"):
        uri = registry.logged_model_uri(run_id(root, model))
        files = {a.path for a in store.list_logged_model_artifacts(uri.removeprefix("models:/"))}
        assert "MLmodel" in files and not any(f.endswith((".pkl", ".pth")) for f in files)
        loaded = registry.load(uri)
        inputs = loaded.metadata.get_input_schema().inputs[0]
        assert inputs.shape == (-1, 28, 28) and str(inputs.type) == "float32"
        got = loaded.predict(x.float().numpy())
        net, ck = checkpoint.load(root / "models" / f"{model}.pt")
        eager = RawImageClassifier(net, ck.stats, ck.spec.evaluate.tta_flip, ck.temperature)(x.float())
        assert got.shape == (50, 10)
        np.testing.assert_allclose(got, eager.detach().numpy(), rtol=0, atol=1e-5)  # the graph is the checkpoint's
        # fmnist predict (the batch loader, channels-last convs) agrees up to float rounding, which the fitted
        # temperature magnifies by 1/T where it sharpens
        want, _ = predict.probabilities(root / "models" / f"{model}.pt", x)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-3)
        assert (got.argmax(1) == want.numpy().argmax(1)).all()
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    assert checkpoint.read(root / "models/tinyvgg.pt")[0].spec.evaluate.tta_flip  # the flip is inside the graph


def test_pyfunc_model_scores_the_test_set_as_the_evaluate_stage_did(trained, store):
    root, _ = trained
    test = load_split("test", root / "data/processed")
    loaded = registry.load(registry.logged_model_uri(run_id(root, "tinyvgg")))
    acc = float((torch.from_numpy(loaded.predict(test.images.float().numpy())).argmax(1) == test.labels).float().mean())
    evaluated = json.loads((root / "reports/eval/tinyvgg/metrics.json").read_text())["test_accuracy"]
    assert acc == pytest.approx(evaluated, abs=0.001)


def test_champion_moves_only_on_a_better_model_and_a_rerun_registers_nothing(trained, store):
    root, sets = trained
    two = {k: v for k, v in specs(*sets).items() if k in ("linear", "tinyvgg")}
    evals = {m: json.loads((root / "reports/eval" / m / "metrics.json").read_text()) for m in two}
    # The stage chooses on validation: the less accurate model on the test set is made the better there.
    best, other = sorted(two, key=lambda m: (evals[m]["test_accuracy"], m))
    for m, val in ((best, 0.9), (other, 0.8)):
        write_json(root / "reports/eval" / m / "metrics.json", {**evals[m], "val_accuracy": val, "val_nll": 1 - val})

    # the register stage registers the best model, tagged, and points the alias at it
    register.run(two)
    [v] = store.search_model_versions("name = 'fashion-mnist'")
    assert v.run_id == run_id(root, best) and str(store.get_model_version_by_alias("fashion-mnist", "champion").version) == str(v.version)
    assert {k: v.tags[k] for k in ("model", "loss", "recipe")} == {"model": best, "loss": "ce", "recipe": "project"}
    assert float(v.tags["val_accuracy"]) == 0.9 and float(v.tags["test_accuracy"]) == evals[best]["test_accuracy"]
    assert "git_commit" in v.tags and "dvc_exp_name" in v.tags
    register.run(two)  # the same best run again: no second version
    assert len(store.search_model_versions("name = 'fashion-mnist'")) == 1

    # another run: registered as a new version, the alias moves only when it is more accurate on validation
    worse = registry.register_champion(run_id(root, other), 0.9 - 0.01, {"model": other}, test_accuracy=1.0)
    assert worse.new and not worse.moved and worse.previous == str(v.version)
    assert str(store.get_model_version_by_alias("fashion-mnist", "champion").version) == str(v.version)
    again = registry.register_champion(run_id(root, other), 0.9 - 0.01, {"model": other})
    assert (again.new, again.moved, again.version) == (False, False, worse.version)
    better = registry.register_champion(run_id(root, other), 0.9 + 0.01, {"model": other})
    assert not better.new and better.moved and better.version == worse.version
    versions = store.search_model_versions("name = 'fashion-mnist'")
    assert len(versions) == 2 and {x.run_id for x in versions} == {run_id(root, m) for m in two}
    assert str(store.get_model_version_by_alias("fashion-mnist", "champion").version) == worse.version


def test_predict_takes_a_model_uri(trained, store, capsys, restore_sigterm):
    from fmnist import cli
    from PIL import Image

    root, _ = trained
    if not store.search_registered_models("name = 'fashion-mnist'"):
        registry.register_champion(run_id(root, "tinyvgg"), 0.9, {"model": "tinyvgg"})
    test = load_split("test", root / "data/processed")
    Image.fromarray(test.images[0].numpy(), "L").save(root / "x.png")
    assert cli.main(["predict", "models:/fashion-mnist@champion", "x.png", "--json"]) == 0
    [by_uri] = json.loads(capsys.readouterr().out)
    champion = store.get_model_version_by_alias("fashion-mnist", "champion")
    model = store.get_run(champion.run_id).data.tags["model"]
    assert cli.main(["predict", f"models/{model}.pt", "x.png", "--json"]) == 0
    [by_file] = json.loads(capsys.readouterr().out)
    assert by_uri["predicted"] == by_file["predicted"]
    assert [t["class"] for t in by_uri["top3"]] == [t["class"] for t in by_file["top3"]]
    for a, b in zip(by_uri["top3"], by_file["top3"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=2e-4)

    assert cli.main(["predict", "models:/no-such-model@champion", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model or alias" in err and "registered models: fashion-mnist" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- mlflow models serve, for real

def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_like_predict(trained, store):
    root, _ = trained
    if not store.search_registered_models("name = 'fashion-mnist'"):
        registry.register_champion(run_id(root, "tinyvgg"), 0.9, {"model": "tinyvgg"})
    champion = store.get_model_version_by_alias("fashion-mnist", "champion")
    model = store.get_run(champion.run_id).data.tags["model"]
    port = free_port()
    serve_env = env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
                    PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # it runs `uvicorn` from there
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               "models:/fashion-mnist@champion", "--env-manager", "local", "--host", "127.0.0.1",
                               "-p", str(port)], cwd=root, env=serve_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/ping", server, timeout=120)

        test = load_split("test", root / "data/processed")
        x = test.images[:20]
        status, answer = post(f"{base}/invocations", {"inputs": x.float().tolist()})
        assert status == 200, answer
        served = np.asarray(answer["predictions"], dtype=np.float32)
        want, _ = predict.probabilities(root / "models" / f"{model}.pt", x)
        np.testing.assert_allclose(served, want.numpy(), rtol=0, atol=1e-5)

        for bad, says in ((np.zeros((2, 1, 28, 28)).tolist(), "(-1, 28, 28)"),
                          ([[["a"] * 28] * 28], "could not convert string to float"),
                          (np.full((1, 28, 28), 300.0).tolist(), "pixel values must be numbers in [0, 255]")):
            status, answer = post(f"{base}/invocations", {"inputs": bad})
            assert status == 400, answer
            assert says in json.dumps(answer), answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            log = server.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            log = server.communicate()[0]
    assert "Traceback" not in log  # bad requests are the caller's mistake, not the server's


def test_a_store_that_refuses_the_model_fails_the_training_in_one_line(tmp_path, processed_dir, monkeypatch):
    """The artifact root is a path through a file: the store cannot take the upload."""
    from mlflow import MlflowClient as Client

    repo = make_repo(tmp_path / "repo", processed_dir)
    (tmp_path / "not-a-folder").write_text("a file")
    c = Client(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    c.create_experiment("fashion-mnist", artifact_location=(tmp_path / "not-a-folder" / "artifacts").as_uri())
    res = subprocess.run([sys.executable, "-m", "fmnist", "train", "linear", "--no-progress",
                          *[a for s in SETS for a in ("--set", s)]], cwd=repo, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("fmnist train: error:")]
    assert len(lines) == 1 and "MLflow tracking store" in lines[0] and "Traceback" not in res.stderr
    assert [r.info.status for r in runs(repo / "mlflow.db", "linear")] == ["FAILED"]
    assert not (repo / "models/linear.pt").exists()
    assert not c.search_registered_models()
