"""`fmnist predict CHECKPOINT IMAGE...`: the class of each image and its top-3 probabilities.

Every image is read and checked (fmnist.data.images) before the model loads. The model
is used as it was trained and evaluated: the checkpoint's run spec says how (normalisation,
precision, flip test-time augmentation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOP_K = 3


def predict(checkpoint_path: str | Path, image_paths: list[str | Path]) -> list[dict[str, Any]]:
    """Per image: the predicted class and the top-3 classes with their probabilities."""
    from fmnist.data import images

    pictures = [images.load_image(p) for p in image_paths]  # every image checked before the model loads

    import torch

    from fmnist import checkpoint
    from fmnist.core import engine
    from fmnist.data.loader import Split

    model, ck = checkpoint.load(checkpoint_path)
    x = images.to_tensor(pictures)
    split = Split(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)))
    probs = engine.predict(model, split, ck.stats, bf16=ck.bf16, tta_flip=ck.spec.evaluate.tta_flip).exp()
    top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
    return [{"image": str(path), "predicted": ck.classes[int(i[0])],
             "top3": [{"class": ck.classes[int(k)], "probability": round(float(p), 4)} for p, k in zip(ps, i)]}
            for path, ps, i in zip(image_paths, top_p, top_i)]


def main(checkpoint_path: str, image_paths: list[str], as_json: bool = False) -> None:
    results = predict(checkpoint_path, image_paths)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        top = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top3"])
        print(f"{r['image']}: {r['predicted']}  (top 3: {top})")
