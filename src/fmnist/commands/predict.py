"""`fmnist predict MODEL IMAGE...`: the class of each image and its top-3 probabilities.
`fmnist predict MODEL --test-index N`: the same for test image N, with its true label.

MODEL is a checkpoint file (models/fmnet.pt), the name of a model of params.yaml (fmnet, for
models/fmnet.pt), or an MLflow model URI (models:/fashion-mnist@champion, runs:/RUN_ID/model).
Every image is read and checked (fmnist.data.images) before the model loads. The model is used as
it was trained and evaluated: the checkpoint's run spec says how (normalisation, precision, flip
test-time augmentation); an MLflow Model carries the same inside its graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmnist import FmnistError

TOP_K = 3


class PredictError(FmnistError):
    """A model or test image that cannot be used. The message says which, and what can."""


def checkpoint_path(model: str | Path) -> Path:
    """A checkpoint file as given, or the checkpoint of a model named in params.yaml."""
    path = Path(model)
    if path.suffix or path.is_file() or "/" in str(model) or "\\" in str(model):
        return path
    from fmnist.runspec import RunPaths

    return RunPaths.of(str(model)).model


def predict(model: str | Path, image_paths: list[str | Path]) -> list[dict[str, Any]]:
    """Per image: the predicted class and the top-3 classes with their probabilities."""
    from fmnist.data import images

    pictures = [images.load_image(p) for p in image_paths]  # every image checked before the model loads
    results = classify(model, images.to_tensor(pictures))
    return [{"image": str(path), **r} for path, r in zip(image_paths, results)]


def predict_test_image(model: str | Path, index: int, processed: str | Path = "data/processed") -> dict[str, Any]:
    """Test image ``index`` of the processed test split: the prediction and the true label."""
    from fmnist.data import CLASSES
    from fmnist.data.loader import load_split

    test = load_split("test", processed)
    if not 0 <= index < len(test):
        raise PredictError(f"--test-index {index}: the test split has {len(test):,} images; "
                           f"use an index in 0..{len(test) - 1}")
    [result] = classify(model, test.images[index:index + 1])
    return {"test_index": index, **result, "true": CLASSES[int(test.labels[index])]}


def is_model_uri(model: str | Path) -> bool:
    return str(model).startswith(("models:/", "runs:/"))


def probabilities(model: str | Path, x) -> tuple[Any, tuple[str, ...]]:
    """(N, 28, 28) uint8 images -> (N, 10) class probabilities (calibrated, as the MLflow Model gives
    them), and the class names."""
    import torch

    from fmnist.data import CLASSES

    if is_model_uri(model):
        from fmnist.tracking import registry

        return torch.from_numpy(registry.load(str(model)).predict(x.float().numpy())), CLASSES
    from fmnist import checkpoint
    from fmnist.core import calibration, engine
    from fmnist.data.loader import Split

    net, ck = checkpoint.load(checkpoint_path(model))
    split = Split(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)))
    logp = engine.predict(net, split, ck.stats, bf16=ck.bf16, tta_flip=ck.spec.evaluate.tta_flip)
    return calibration.scale(logp, ck.temperature).exp(), ck.classes


def classify(model: str | Path, x) -> list[dict[str, Any]]:
    """(N, 28, 28) uint8 images -> per image the predicted class and the top-3 probabilities."""
    probs, classes = probabilities(model, x)
    top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
    return [{"predicted": classes[int(i[0])],
             "top3": [{"class": classes[int(k)], "probability": round(float(p), 4)} for p, k in zip(ps, i)]}
            for ps, i in zip(top_p, top_i)]


def main(model: str, image_paths: list[str], test_index: int | None = None, as_json: bool = False) -> None:
    if test_index is None and not image_paths:
        raise PredictError("give image files, or --test-index N for an image of the test split")
    results = predict(model, image_paths) if image_paths else []
    if test_index is not None:
        results.append(predict_test_image(model, test_index))
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        top = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top3"])
        if "test_index" in r:
            verdict = "correct" if r["predicted"] == r["true"] else "wrong"
            print(f"test image {r['test_index']}: predicted {r['predicted']}, true {r['true']} ({verdict})  "
                  f"(top 3: {top})")
        else:
            print(f"{r['image']}: {r['predicted']}  (top 3: {top})")
