"""Working as a team, for real: a shared MLflow tracking server (a real `mlflow server` on 127.0.0.1,
SQLite backend, artifacts proxied by the server), a shared DVC remote (a local folder) and a shared git
remote (a bare repository), with clones of this repository standing in for the team's machines.

The server runs in its own process group and the whole group is stopped when the module ends, failed
or not. The slow tests are marked `team` (real servers, several clones, the real data: three to four
minutes on 2 cores); they run under plain `make test`, and `pytest -m "not team"` leaves them out.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import REAL_DATA
from fmnist.core import engine
from fmnist.tracking import registry
from reliability_helpers import (REPO, env, free_port, make_repo, start, temp_files, wait_for_http,
                                 wait_for_versions)

BIN = Path(sys.executable).parent  # fmnist, dvc and mlflow of this environment: the stages call `fmnist`
SERVER_START_S = 120.0
TEAM_EXPERIMENT = "team"  # the MLflow experiment of the team tests (section 2 uses the default one)
GIT_USER = {"GIT_AUTHOR_NAME": "fmnist test", "GIT_AUTHOR_EMAIL": "test@fmnist.invalid",
            "GIT_COMMITTER_NAME": "fmnist test", "GIT_COMMITTER_EMAIL": "test@fmnist.invalid"}


# --------------------------------------------------------------------------- a real MLflow server

def _group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group, as 'PID COMMAND'."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{d.name} {comm}")
    return found


class MlflowServer:
    """`mlflow server` on a free port of 127.0.0.1: SQLite backend and proxied artifacts under ``root``.
    start() and stop() may be called again: a restart keeps the port and the store."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def log_tail(self, n: int = 3000) -> str:
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-n:] if log.exists() else ""

    def start(self, timeout: float = SERVER_START_S) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.db}", "--serve-artifacts",
               "--artifacts-destination", str(self.artifacts), "--workers", "1"]
        with open(self.root / "server.log", "ab") as log:
            # Its own process group: uvicorn and any job runner go with it in stop().
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        try:
            wait_for_http(f"{self.uri}/health", self.proc, timeout)
        except AssertionError as e:
            self.stop()
            raise AssertionError(f"mlflow server: {e}:\n{self.log_tail()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the whole process group: ``sig``, then SIGKILL for whatever is left after ``timeout``."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        pgid = proc.pid  # the group's id: start_new_session made the server its leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while (proc.poll() is None or _group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _group_members(pgid)
        assert not left, f"processes of the mlflow server outlived it: {left}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The team's tracking server, shared by the tests of this module; stopped, with every process
    it started, when the module ends."""
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def run_fmnist(args: list[str], cwd: Path, timeout: float = 300, **extra_env: str) -> tuple[str, str]:
    """`fmnist ARGS` as a subprocess (this checkout's code); fails the test on a non-zero exit."""
    p = start(args, cwd, **extra_env)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, f"fmnist {' '.join(args)} exited {p.returncode}:\n{err[-3000:]}"
    return out, err


# --------------------------------------------------------------------------- 2. a shared tracking server

@pytest.mark.team
def test_train_evaluate_and_compare_through_a_shared_server(server, tmp_path, processed_dir):
    """Runs, metrics and the model go to the server (artifacts uploaded through it), and anyone reads
    them back over HTTP."""
    ws = make_repo(tmp_path / "ws", processed_dir)
    uri = server.uri
    run_fmnist(["train", "linear", "--no-progress", "--set", "train.epochs=2"], ws, MLFLOW_TRACKING_URI=uri)
    run_fmnist(["evaluate", "linear"], ws, MLFLOW_TRACKING_URI=uri)
    run_fmnist(["compare"], ws, MLFLOW_TRACKING_URI=uri)

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("fashion-mnist")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied by the server
    [run] = c.search_runs([exp.experiment_id], "tags.model = 'linear'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert (run.data.tags["model"], run.data.tags["loss"]) == ("linear", "ce")
    assert [m.step for m in c.get_metric_history(run_id, "val_loss")] == [1, 2]
    assert ({"train_time_s", "best_epoch", "test_accuracy", "test_nll", "test_ece_ts", "eval_val_nll"} <=
            set(run.data.metrics))
    assert run.data.metrics["test_accuracy"] == json.loads((ws / "reports/eval/linear/metrics.json").read_text())[
        "test_accuracy"]
    assert run.data.params["train.epochs"] == "2"

    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"linear.pt", "history.csv", "confusion_matrix.json", "confusion_matrix.png",
            "per_class.json", "predictions.csv", "calibration.json"} <= names, names
    got = Path(c.download_artifacts(run_id, "linear.pt", str(tmp_path / "download")))
    assert got.read_bytes() == (ws / "models/linear.pt").read_bytes()
    # The server stored the artifacts in its artifact root; the client kept no store of its own.
    [stored] = [p for p in server.artifacts.rglob("linear.pt") if run_id in p.parts]
    assert stored.read_bytes() == got.read_bytes()
    assert not (ws / "mlflow.db").exists() and not (ws / "mlartifacts").exists()
    # compare read the same run from the server
    assert f"`{run_id}`" in (ws / "reports/compare.md").read_text()


@pytest.mark.team
def test_server_that_goes_away_mid_training(server, tmp_path, processed_dir):
    """The team's server dies (SIGKILL, as in a crash) after the first epoch: `fmnist train` stops with
    one line naming the store, keeps no model and no metrics (the resume file stays), and once the server
    is back on the same store and port, `--resume` finishes the same MLflow run."""
    ws = make_repo(tmp_path / "ws", processed_dir)
    epochs = 15
    args = ["train", "linear", "--no-progress", "--set", f"train.epochs={epochs}", "--set", "train.batch_size=16"]
    fast = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": "server-goes-away",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    resume = ws / ".fmnist/resume/linear.pt"
    try:
        proc = start(args, ws, **fast)
        try:
            wait_for_versions(resume, 1, proc, timeout=120)
            server.stop(signal.SIGKILL)
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=120)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]  # before it, one progress line per epoch
        assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
        assert lines[-1].startswith(f"fmnist train: error: MLflow tracking store {server.uri} failed during run "), err
        assert "MLFLOW_TRACKING_URI" in lines[-1] and "--resume" in lines[-1]
        assert took < 30, f"took {took:.1f} s to give up with no retries"
        # Outputs stay consistent: no model, no metrics, no temp file; only the resume state.
        assert not (ws / "models" / "linear.pt").exists()
        assert not [p for p in (ws / "reports").rglob("*") if p.is_file()]
        assert temp_files(ws) == []
        assert resume.is_file()
    finally:
        if server.proc is None:
            server.start()  # back on the same store and port, for this test and the next ones

    _, err = run_fmnist([*args, "--resume"], ws, **fast)
    assert "resume: continuing from epoch" in err
    c = MlflowClient(tracking_uri=server.uri)
    exp = c.get_experiment_by_name("server-goes-away")
    [run] = c.search_runs([exp.experiment_id])  # the same run went on
    assert run.info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(run.info.run_id, "val_loss")} == set(range(1, epochs + 1))
    assert "linear.pt" in {a.path for a in c.list_artifacts(run.info.run_id)}
    assert (ws / "models" / "linear.pt").is_file() and not resume.exists()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("uri, why", [
    ("localhost:5000", "unknown scheme 'localhost'"),
    ("127.0.0.1:5000", "no scheme"),
    ("foo bar", "blank or with spaces"),
    ("http://", "no host"),
    ("http://mlflow.example:port", "the port is not a number"),
    ("sqlite:mlflow.db", "a SQLite store is sqlite:///PATH"),
    ("ftp://mlflow.example", "unknown scheme 'ftp'"),
])
def test_a_tracking_uri_that_is_not_a_url_stops_before_training(repo, fmnist, monkeypatch, uri, why):
    """One line, exit status 2 (a configuration mistake), no training, nothing written: no `foo bar`
    folder (MLflow takes a bare word for a file store), no mlflow.db, no model."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def no_fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(engine, "fit", no_fit)
    before = _tree(repo)
    for command in (["train", "linear", "--set", "train.epochs=1"], ["compare"]):
        rc, _, err = fmnist(*command)
        assert rc == 2, err
        [line] = err.strip().splitlines()
        assert line.startswith(f"fmnist {command[0]}: error: MLFLOW_TRACKING_URI={uri!r} is not a tracking URI "
                               f"({why}); expected http://HOST:PORT"), line
    if uri.endswith(":5000"):
        assert line.endswith(f"did you mean http://{uri}?")
    assert _tree(repo) == before


# --------------------------------------------------------------------------- 3 and 4. a team: git + DVC remotes

SEED_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
SEED_DIRS = ("src/", ".dvc/", ".ci/")
SMOKE_SUBSET = 3000  # the smoke profile's training subset (.ci/repro_check.py)


def sh(cmd: list[str], cwd: Path, env_: dict[str, str], timeout: float = 600, check: bool = True):
    p = subprocess.run(cmd, cwd=cwd, env=env_, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` in {cwd} exited {p.returncode}:\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def seed_repository(dest: Path) -> None:
    """A repository like this one from this checkout's files (tracked or new, as git lists them), with
    a small params.yaml: one model on the smoke profile."""
    git = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True)
    listed = git.stdout.split("\0") if git.returncode == 0 else [  # not a git checkout: every file but caches
        str(f.relative_to(REPO)) for d in SEED_DIRS for f in (REPO / d).rglob("*")
        if not {"__pycache__", ".venv", "cache", "tmp"} & set(f.parts) and ".egg-info" not in str(f)] + list(SEED_FILES)
    for rel in listed:
        if (rel in SEED_FILES or rel.startswith(SEED_DIRS)) and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {"linear": params["models"]["linear"]}
    if isinstance(params.get("evaluate"), dict) and "models" in params["evaluate"]:
        params["evaluate"]["models"] = {}
    params["train"].update(subset=SMOKE_SUBSET, epochs=1)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class Team:
    root: Path
    origin: Path  # the team's git remote: a bare repository
    storage: Path  # the team's DVC remote: a folder
    server: MlflowServer  # the team's tracking server
    lead: Path = Path()  # the clone that ran the pipeline and pushed its results

    def env(self, clone: Path, **extra: str) -> dict[str, str]:
        """A teammate's shell: the clone's own code, the team's tracking server, the local data copy."""
        e = env(PYTHONPATH=str(clone / "src"), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                MLFLOW_TRACKING_URI=self.server.uri, MLFLOW_EXPERIMENT_NAME=TEAM_EXPERIMENT,
                FMNIST_SOURCE=str(REAL_DATA), DVC_NO_ANALYTICS="1", **GIT_USER, **extra)
        e.pop("PYTHONDONTWRITEBYTECODE", None)  # Python's default: __pycache__/ appears beside the code DVC hashes
        return e

    def git(self, clone: Path, *args: str) -> str:
        return sh(["git", *args], clone, self.env(clone)).stdout

    def dvc(self, clone: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh([sys.executable, "-m", "dvc", *args], clone, self.env(clone), check=check)

    def clone(self, name: str) -> Path:
        """A teammate's machine: a fresh clone of the team's repository, with a git identity."""
        dest = self.root / name
        sh(["git", "clone", "-q", str(self.origin), str(dest)], self.root, self.env(dest))
        self.git(dest, "config", "user.name", GIT_USER["GIT_AUTHOR_NAME"])
        self.git(dest, "config", "user.email", GIT_USER["GIT_AUTHOR_EMAIL"])
        return dest

    def runs(self) -> list:
        c = MlflowClient(tracking_uri=self.server.uri)
        exp = c.get_experiment_by_name(TEAM_EXPERIMENT)
        return list(c.search_runs([exp.experiment_id], max_results=1000)) if exp else []


@pytest.fixture(scope="module")
def team(tmp_path_factory, server) -> Team:
    """The team's git remote and DVC remote, after the lead ran the pipeline (logging to the shared
    tracking server) and pushed: its results to git, its data and models to the DVC remote."""
    if not all((REAL_DATA / f).is_file() for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")):
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_DATA} is missing: CI must install it (apt-get install dataset-fashion-mnist)")
        pytest.skip(f"{REAL_DATA} not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("team")
    t = Team(root, root / "origin.git", root / "dvc-storage", server)
    seed = root / "seed"
    seed_repository(seed)
    t.git(seed, "init", "-q", "-b", "main")
    t.dvc(seed, "remote", "add", "-d", "storage", str(t.storage))
    t.git(seed, "add", "-A")
    t.git(seed, "commit", "-q", "-m", "fmnist, small")
    sh(["git", "clone", "-q", "--bare", str(seed), str(t.origin)], root, t.env(seed))

    t.lead = t.clone("lead")
    t.dvc(t.lead, "repro")
    t.git(t.lead, "add", "-A")
    t.git(t.lead, "commit", "-q", "-m", "results")
    t.git(t.lead, "push", "-q", "origin", "main")
    t.dvc(t.lead, "push")
    return t


def first_test_image(path: Path) -> Path:
    """Test image 0 of the real data set as a 28x28 grayscale PNG."""
    import gzip

    from PIL import Image

    with gzip.open(REAL_DATA / "t10k-images-idx3-ubyte.gz") as f:
        pixels = f.read(16 + 28 * 28)[16:]
    Image.frombytes("L", (28, 28), pixels).save(path)
    return path


@pytest.mark.team
def test_a_teammate_pulls_the_models_and_predicts_without_training(team, tmp_path):
    """`git clone` and `dvc pull`: the lead's data and model, `dvc status` clean, `fmnist predict` works,
    and nothing is (or would be) trained."""
    # The lead's pipeline logged to the shared server: its run is there, with the test metrics.
    [lead_run] = [r for r in team.runs() if not r.data.tags.get("dvc_exp_name")]
    assert lead_run.info.status == "FINISHED" and lead_run.data.tags["model"] == "linear"
    lead_eval = json.loads((team.lead / "reports/eval/linear/metrics.json").read_text())
    assert lead_run.data.metrics["test_accuracy"] == lead_eval["test_accuracy"]
    # the report registered the best model: on the server too
    champion = MlflowClient(tracking_uri=team.server.uri).get_model_version_by_alias(registry.REGISTERED_MODEL,
                                                                                    registry.ALIAS)
    assert champion.run_id == lead_run.info.run_id
    runs_before = len(team.runs())

    mate = team.clone("mate")
    assert not (mate / "models").exists()
    team.dvc(mate, "pull")
    status = json.loads(team.dvc(mate, "status", "--json").stdout or "{}")
    assert status == {}, (f"a fresh clone after `dvc pull` is not up to date: {status}. (`src/fmnist/core modified` "
                          "means the lead's dvc.lock hashed __pycache__/ files: .dvcignore must list __pycache__/)")
    assert (mate / "models/linear.pt").read_bytes() == (team.lead / "models/linear.pt").read_bytes()

    out = sh([str(BIN / "fmnist"), "predict", "models/linear.pt", str(first_test_image(tmp_path / "0.png")),
              "--json"], mate, team.env(mate)).stdout
    [got] = json.loads(out)
    # The pulled model classifies test image 0 as the lead's evaluation did (its predictions are in git).
    with open(mate / "reports/eval/linear/predictions.csv", newline="") as f:
        lead_row = next(r for r in csv.DictReader(f) if r["index"] == "0")
    assert got["predicted"] == lead_row["predicted"]

    repro = team.dvc(mate, "repro")  # nothing to do: every stage is up to date
    assert "Running stage" not in repro.stdout, repro.stdout
    assert len(team.runs()) == runs_before  # no training reached the server
    assert not (mate / "mlflow.db").exists()


@pytest.mark.team
def test_a_missing_dvc_remote_fails_before_anything_is_trained(team, tmp_path):
    """What DVC does when the remote is not there (docs/troubleshooting.md, "The DVC remote"): exit status 1
    and an ERROR line; nothing pulled, nothing trained, nothing created where the remote should be."""
    mate = team.clone("newcomer")
    r = team.dvc(mate, "pull", "-r", "nosuch", check=False)
    assert r.returncode == 1
    assert "ERROR: failed to pull data from the cloud - config file error: remote 'nosuch' doesn't exist" in r.stderr

    gone = tmp_path / "unmounted" / "dvc-storage"  # a share that is not mounted, a typo in the path
    team.dvc(mate, "remote", "modify", "--local", "storage", "url", str(gone))
    r = team.dvc(mate, "pull", check=False)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == ["ERROR: failed to pull data from the cloud - Checkout failed for following targets:"], r.stderr
    assert "Missing cache files" in r.stderr and "models/linear.pt" in r.stderr
    assert not gone.parent.exists() and not (mate / "models/linear.pt").exists()
    # The project's own command on the model that did not come: one line, exit status 1.
    p = subprocess.run([str(BIN / "fmnist"), "predict", "models/linear.pt", str(first_test_image(tmp_path / "0.png"))],
                       cwd=mate, env=team.env(mate), capture_output=True, text=True)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("fmnist predict: error: models/linear.pt: missing")

    team.dvc(mate, "remote", "remove", "--local", "storage")
    team.dvc(mate, "remote", "remove", "storage")
    r = team.dvc(mate, "push", check=False)
    assert r.returncode == 1
    assert "ERROR: failed to push data to the cloud - config file error: no remote specified" in r.stderr
    assert not (mate / "mlflow.db").exists()


def _experiments(shown) -> dict[str, dict]:
    """`dvc exp show --json` -> experiment name -> its data (params, metrics), wherever it nests."""
    found: dict[str, dict] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and "metrics" in node["data"]:
                found[node["name"]] = node["data"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return found


def _file_data(section: dict, path: str) -> dict:
    return ((section or {}).get(path) or {}).get("data") or {}


@pytest.mark.team
def test_experiments_from_two_machines_meet_in_a_third(team, tmp_path):
    """Two teammates each run an experiment on the smoke profile and push it; a third pulls them and
    sees both in `dvc exp show` and both runs in `fmnist compare`, from the shared tracking server."""
    smoke = sh([sys.executable, ".ci/repro_check.py", "smoke", "--print"], team.lead,
               team.env(team.lead)).stdout.split()
    assert "train.subset=3000" in smoke and "train.epochs=1" in smoke, smoke
    machines = {"exp-focal": ("alice", ["-S", "loss=focal"]), "exp-lr": ("bob", ["-S", "train.lr=0.004"])}
    clones, procs = {}, {}
    try:
        for name, (who, sets) in machines.items():  # both machines at once
            clones[name] = c = team.clone(who)
            team.dvc(c, "pull")
            procs[name] = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "-n", name, *smoke, *sets],
                                           cwd=c, env=team.env(c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        for name, p in procs.items():
            out, _ = p.communicate(timeout=600)
            who = machines[name][0]
            assert p.returncode == 0, f"dvc exp run on {who}'s machine exited {p.returncode}:\n{out[-4000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, c in clones.items():
        team.dvc(c, "exp", "push", "origin", name)
        team.dvc(c, "push")

    carol = team.clone("carol")
    team.dvc(carol, "exp", "pull", "origin")
    shown = _experiments(json.loads(team.dvc(carol, "exp", "show", "--json").stdout))
    assert set(machines) <= set(shown), sorted(shown)
    for name, c in clones.items():
        metrics = _file_data(shown[name]["metrics"], "reports/eval/linear/metrics.json")
        assert metrics == json.loads((c / "reports/eval/linear/metrics.json").read_text()), name
        assert 0 < metrics["test_accuracy"] <= 1
    params = {name: _file_data(shown[name]["params"], "params.yaml") for name in machines}
    assert params["exp-focal"]["loss"] == "focal" and params["exp-lr"]["train"]["lr"] == 0.004
    # The outputs came with the experiments: alice's model, applied on carol's machine, untrained there.
    team.dvc(carol, "exp", "apply", "exp-focal")
    assert (carol / "models/linear.pt").read_bytes() == (clones["exp-focal"] / "models/linear.pt").read_bytes()

    # Every run is on the shared server, tagged with its experiment, and compare's table has both.
    runs = {name: [r for r in team.runs() if r.data.tags.get("dvc_exp_name") == name] for name in machines}
    for name, found in runs.items():
        assert [r.info.status for r in found] == ["FINISHED"], (name, found)
    sh([str(BIN / "fmnist"), "compare", "--out", str(tmp_path)], carol, team.env(carol))
    table = (tmp_path / "compare.md").read_text()
    for name, [run] in runs.items():
        assert f"`{run.info.run_id}`" in table, (name, table)
    assert "| linear, focal loss" in table and "| linear, cross-entropy" in table
