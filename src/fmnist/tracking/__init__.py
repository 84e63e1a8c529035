"""MLflow tracking: the only package that imports mlflow.

- store: where runs are stored (the repository's SQLite file, or MLFLOW_TRACKING_URI) and the client;
- runs: a training's run, from the train stage's first epoch to the metrics evaluate adds;
- registry: MLflow Models, the registered model ``fashion-mnist`` and its ``champion``.
"""

from fmnist.tracking.runs import (Run, existing_run, finished_runs, flatten, json_artifact, metric_histories,
                                  reap_orphans, run_tags, start_run)
from fmnist.tracking.store import (EXPERIMENT, TrackingError, TrackingURIError, check_uri, client,
                                   experiment_name, repo_root, tracking_uri)

__all__ = ["EXPERIMENT", "Run", "TrackingError", "TrackingURIError", "check_uri", "client", "existing_run",
           "experiment_name", "finished_runs", "flatten", "json_artifact", "metric_histories", "reap_orphans",
           "repo_root", "run_tags", "start_run", "tracking_uri"]
