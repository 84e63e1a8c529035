"""MLflow Models: how a trained model leaves the lab.

Every training run logs its model as an MLflow Model (``mlflow.pytorch``, the pt2 format of
torch.export: a graph and weights, loaded without unpickling code) that takes raw images and
returns class probabilities (fmnist.core.export). The register stage registers the pipeline's best
model (chosen on the validation split: fmnist.selection) as a version of the registered model
``fashion-mnist`` and points the alias ``champion`` at it when its validation accuracy beats the
current champion's. ``load`` turns a ``models:/`` or ``runs:/`` URI back into a predictor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from fmnist import FmnistError
from fmnist.tracking.store import TrackingError, _store_lock, cause, retry, tracking_uri

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

    @property
    def alias_version(self) -> str | None:
        """The version ``champion`` points at after the call."""
        return self.version if self.moved else self.previous


def promote(spec, run_id: str | None, val_accuracy: float, test_accuracy: float | None = None) -> Champion:
    """The register stage's registration of the pipeline's best model (``spec``, trained by ``run_id``),
    chosen on ``val_accuracy``. A run that is not in the store, or a store that cannot take it, is an
    error: registering is all the stage does."""
    from fmnist.tracking.runs import run_tags

    tags = run_tags(run_id) if run_id else None
    if tags is None:
        raise RegistryError(f"the run that trained {spec.model} ({run_id or 'none recorded in its checkpoint'}) is "
                            f"not in {tracking_uri()}: set MLFLOW_TRACKING_URI to the store it was trained in, or "
                            f"train it again in this one (`dvc repro --force train@{spec.model}`)")
    champ = register_champion(run_id, val_accuracy, {
        "model": spec.model, "loss": spec.loss, "recipe": spec.recipe,
        "git_commit": tags.get("mlflow.source.git.commit", ""), "dvc_exp_name": tags.get("dvc_exp_name", "")},
        test_accuracy=test_accuracy)
    done = "registered as" if champ.new else "already"
    where = (f"now @{ALIAS}" if champ.moved else f"already @{ALIAS}" if champ.previous == champ.version else
             f"@{ALIAS} stays on version {champ.previous}, as accurate on validation or more")
    log.info("champion: %s (validation accuracy %.2f%%) %s version %s of %s; %s", spec.model, 100 * val_accuracy,
             done, champ.version, REGISTERED_MODEL, where)
    return champ


def register_champion(run_id: str, val_accuracy: float, tags: dict[str, str],
                      test_accuracy: float | None = None) -> Champion:
    """Register the model of ``run_id`` as a version of ``fashion-mnist`` (once: a run registered
    before is not registered again) and point ``champion`` at it if its validation accuracy beats the
    current champion's.

    The version is tagged ``val_accuracy`` (what the choice reads) and ``test_accuracy`` (informative
    only: it never decides). A version registered again gets the figures of this call, its latest
    evaluation (flip test-time augmentation, say, changes them). The alias moves when there is no
    champion, or when ``val_accuracy`` is strictly higher than the champion's tag; a tie keeps the
    champion. A champion registered before versions were chosen on validation has only a
    ``test_accuracy`` tag: it was chosen on the test set, a figure not comparable with a validation
    accuracy, so any candidate with a validation accuracy replaces it once, and champions compare on
    validation from then on.

    On a SQLite store the check and the move run under the store's lock, so experiments that finish
    together (``dvc queue start -j 2``) cannot both move the alias on a stale view of the champion.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    c = MlflowClient(tracking_uri=uri)
    figures = {"val_accuracy": str(val_accuracy), **({} if test_accuracy is None else
                                                     {"test_accuracy": str(test_accuracy)})}
    with _store(), _store_lock(uri):
        try:
            if not retry(lambda: c.search_registered_models(f"name = '{REGISTERED_MODEL}'")):
                _create_registered_model(c)
            mine = retry(lambda: c.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'"))
            new = not mine
            if mine:
                version = mine[0]
                for key, value in figures.items():
                    retry(lambda: c.set_model_version_tag(REGISTERED_MODEL, version.version, key, value))
            else:
                version = mlflow.register_model(logged_model_uri(run_id, c), REGISTERED_MODEL,
                                                tags={**tags, **figures})
            current = _champion_version(c)
            beats = current is None or _beats(val_accuracy, current.tags)
            if beats and (current is None or current.version != version.version):
                retry(lambda: c.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version.version))
        except RegistryError:
            raise
        except Exception as e:
            raise TrackingError(f"MLflow tracking store {uri} cannot register the champion ({cause(e)})") from e
    previous = str(current.version) if current is not None else None
    return Champion(str(version.version), moved=beats and previous != version.version, new=new, previous=previous)


def _beats(val_accuracy: float, champion_tags: dict[str, str]) -> bool:
    """The rule of ``register_champion``: strictly higher validation accuracy; a champion without one
    (chosen on the test set, before) loses to any candidate."""
    theirs = champion_tags.get("val_accuracy")
    return theirs is None or val_accuracy > float(theirs)


def _create_registered_model(c) -> None:
    """Create ``fashion-mnist``; another process creating it at the same moment is not an error."""
    try:
        retry(lambda: c.create_registered_model(REGISTERED_MODEL))
    except Exception as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e).lower():
            raise


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
