"""MLflow Models: how a trained model leaves the lab.

Every training run logs its model as an MLflow Model (``mlflow.pytorch``, the pt2 format of
torch.export: a graph and weights, loaded without unpickling code) that takes raw images and
returns class probabilities (fmnist.core.export). The report stage registers the pipeline's best
model as a version of the registered model ``fashion-mnist`` and points the alias ``champion`` at
it when it beats the current champion. ``load`` turns a ``models:/`` or ``runs:/`` URI back into a
predictor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from fmnist import FmnistError
from fmnist.tracking.store import TrackingError, cause, retry, tracking_uri

log = logging.getLogger(__name__)

REGISTERED_MODEL = "fashion-mnist"
ALIAS = "champion"
ARTIFACT = "model"  # the name of the logged model in its run
PIP_REQUIREMENTS = ["torch==2.14.1", "numpy"]  # what serving the pt2 graph needs; nothing of this package


class RegistryError(FmnistError):
    """A model URI that names nothing, or a registry that cannot be used."""


@contextlib.contextmanager
def _store() -> Iterator[None]:
    """MLflow's module-level API (log_model, register_model) on our store, without changing the
    process's tracking URI for good."""
    uri = tracking_uri()
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def log_model(run_id: str, module, example) -> str:
    """Log ``module`` (a RawImageClassifier) to the run as an MLflow Model; its URI."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from fmnist.core.export import INPUT_SHAPE, OUTPUT_SHAPE

    f32 = np.dtype(np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(f32, INPUT_SHAPE)]),  # unnamed: pytorch takes one array
                               outputs=Schema([TensorSpec(f32, OUTPUT_SHAPE)]))
    with _store():
        try:
            info = mlflow.pytorch.log_model(module.eval(), name=ARTIFACT, input_example=example.numpy(),
                                            signature=signature, serialization_format="pt2",
                                            pip_requirements=PIP_REQUIREMENTS, run_id=run_id)
        except Exception as e:
            raise TrackingError(f"MLflow tracking store {tracking_uri()} refused the model of run {run_id} "
                                f"({cause(e)})") from e
    return info.model_uri


@dataclass(frozen=True)
class Champion:
    version: str
    moved: bool  # the alias now points at this version (it beat the champion, or there was none)
    new: bool  # this call registered the version
    previous: str | None  # the version the alias pointed at before


def promote(spec, run_id: str | None, test_accuracy: float) -> Champion | None:
    """The report stage's registration of the pipeline's best model (``spec``, trained by ``run_id``).
    The report's files do not depend on it, so a store that cannot do it is a warning, not an error."""
    from fmnist.tracking.runs import run_tags

    try:
        tags = run_tags(run_id) if run_id else None
        if tags is None:
            log.warning("champion: the run that trained %s (%s) is not in %s; nothing registered", spec.model,
                        run_id, tracking_uri())
            return None
        champ = register_champion(run_id, test_accuracy, {
            "model": spec.model, "loss": spec.loss, "recipe": spec.recipe,
            "git_commit": tags.get("mlflow.source.git.commit", ""), "dvc_exp_name": tags.get("dvc_exp_name", "")})
    except (TrackingError, RegistryError) as e:
        log.warning("champion: not registered: %s", e)
        return None
    done = "registered as" if champ.new else "already"
    where = (f"now @{ALIAS}" if champ.moved else f"already @{ALIAS}" if champ.previous == champ.version else
             f"@{ALIAS} stays on version {champ.previous}, as accurate or more")
    log.info("champion: %s (%.2f%%) %s version %s of %s; %s", spec.model, 100 * test_accuracy, done,
             champ.version, REGISTERED_MODEL, where)
    return champ


def register_champion(run_id: str, test_accuracy: float, tags: dict[str, str]) -> Champion:
    """Register the model of ``run_id`` as a version of ``fashion-mnist`` (once: a run registered
    before is not registered again) and point ``champion`` at it if its test accuracy beats the
    current champion's."""
    import mlflow
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri())
    with _store():
        try:
            if not retry(lambda: c.search_registered_models(f"name = '{REGISTERED_MODEL}'")):
                retry(lambda: c.create_registered_model(REGISTERED_MODEL))
            mine = retry(lambda: c.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'"))
            new = not mine
            version = mine[0] if mine else mlflow.register_model(logged_model_uri(run_id, c), REGISTERED_MODEL,
                                                                 tags={**tags, "test_accuracy": str(test_accuracy)})
            current = _champion_version(c)
            beats = current is None or test_accuracy > float(current.tags.get("test_accuracy", "-inf"))
            if beats and (current is None or current.version != version.version):
                retry(lambda: c.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version.version))
        except RegistryError:
            raise
        except Exception as e:
            raise TrackingError(f"MLflow tracking store {tracking_uri()} cannot register the champion "
                                f"({cause(e)})") from e
    previous = str(current.version) if current is not None else None
    return Champion(str(version.version), moved=beats and previous != version.version, new=new, previous=previous)


def logged_model_uri(run_id: str, c=None) -> str:
    """models:/<id> of the model the run logged."""
    from mlflow import MlflowClient

    c = c or MlflowClient(tracking_uri=tracking_uri())
    outputs = retry(lambda: c.get_run(run_id)).outputs
    found = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    if not found:
        raise RegistryError(f"run {run_id} logged no MLflow Model; train it again (`dvc repro` or `fmnist train`)")
    return f"models:/{found[-1]}"


def _champion_version(c):
    try:
        return c.get_model_version_by_alias(REGISTERED_MODEL, ALIAS)
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return None
        raise


def load(uri: str):
    """The pyfunc model a ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/ID`` or
    ``runs:/RUN/model`` URI names; it predicts probabilities from (N, 28, 28) float32 pixels."""
    import mlflow.pyfunc

    with _store():
        try:
            return mlflow.pyfunc.load_model(uri)
        except Exception as e:
            text = " ".join(str(e).split())
            if any(s in text for s in ("RESOURCE_DOES_NOT_EXIST", "not found", "does not exist", "No such file")):
                names = sorted(m.name for m in retry(lambda: mlflow.MlflowClient(tracking_uri()).search_registered_models()))
                raise RegistryError(f"{uri}: no such model or alias in {tracking_uri()}; registered models: "
                                    f"{', '.join(names) or 'none'}") from e
            raise RegistryError(f"{uri}: cannot be loaded ({cause(e)})") from e
