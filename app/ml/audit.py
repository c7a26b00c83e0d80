"""The data audit: what is wrong with a labelled image dataset, seen through a pretrained
backbone's features. Pure ML: no HTTP, no database.

- exact duplicates: the same bytes under several names (sha256 of the files);
- near duplicates: different files whose features are almost the same image (a resized or
  re-encoded copy, a burst shot); across train and val either kind is leakage, and the validation
  accuracy it inflates;
- likely mislabelled images: out-of-fold predictions of a linear classifier on the features
  (cross-validated, so no image is judged by a model that saw its label), ranked by cleanlab's
  confident learning (`find_label_issues`);
- confused classes: class pairs those predictions mix up (cleanlab's `find_overlapping_classes`);
- outliers: images far from all their nearest neighbours (a robust z-score of the distance).
"""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanlab.dataset import find_overlapping_classes
from cleanlab.filter import find_label_issues
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from timm.data import create_transform, resolve_model_data_config

from app.ml.data import eval_resize, load_rgb

# Cosine similarity of pooled features above which two images count as the same picture. Measured
# on trashnet with mobilenetv2_100 (tests/datasets/test_audit.py): a copy resized to 80% and
# re-encoded at JPEG quality 70 stays above 0.97; distinct photos of one class rarely exceed 0.93.
NEAR_DUPLICATE_SIMILARITY = 0.93
NEIGHBOURS = 10  # the outlier score: mean cosine distance to this many nearest images
OUTLIER_Z = 4.0  # ... that many robust standard deviations above the median flags an outlier
MAX_LISTED = 200  # findings listed per kind (the counts are complete)


@dataclass
class AuditImage:
    file: str  # as named in the dataset: "train/ants/1.jpg"
    label: int
    split: str  # "train" | "val"
    sha256: str


@torch.no_grad()
def image_features(model: torch.nn.Module, paths: list[Path], check: Callable[[], None] = lambda: None,
                   batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """The pooled features of each image (the classifier's input), decoded and transformed as
    training evaluates them; decoding in threads, a batch at a time."""
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    resize = eval_resize(transform).size
    model.eval()
    rows = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), batch_size):
            check()
            pixels = torch.stack(list(pool.map(lambda path: transform(load_rgb(path, resize)), paths[start : start + batch_size])))
            rows.append(model.forward_head(model.forward_features(pixels), pre_logits=True).float())
    return torch.cat(rows)


def audit(features: torch.Tensor, images: list[AuditImage], class_names: list[str], seed: int = 0) -> dict[str, Any]:
    """`features`: one row per image (any scale; normalised here)."""
    features = torch.nn.functional.normalize(features.float(), dim=1)
    labels = np.array([image.label for image in images])
    exact = _exact_duplicates(images, class_names)
    same_bytes = {frozenset(group["files"]) for group in exact}
    near = _near_duplicates(features, images, class_names, same_bytes)
    pred_probs, cv_accuracy = _out_of_fold_probabilities(features.numpy(), labels, seed)
    issues = _label_issues(pred_probs, labels, images, class_names)
    confused = _confused_classes(pred_probs, labels, class_names)
    outliers = _outliers(features, images, class_names)
    return {
        "images": len(images),
        "cross_validated_accuracy": cv_accuracy,
        "summary": {
            "exact_duplicate_groups": len(exact),
            "near_duplicate_pairs": len(near),
            "leaking_duplicates": sum(d["leak"] for d in exact) + sum(d["leak"] for d in near),
            "likely_mislabelled": len(issues),
            "confused_class_pairs": len(confused),
            "outliers": len(outliers),
        },
        "exact_duplicates": exact[:MAX_LISTED],
        "near_duplicates": near[:MAX_LISTED],
        "likely_mislabelled": issues[:MAX_LISTED],
        "confused_classes": confused[:MAX_LISTED],
        "outliers": outliers[:MAX_LISTED],
    }


def _describe(group: list[AuditImage], class_names: list[str]) -> dict[str, Any]:
    labels = sorted({class_names[image.label] for image in group})
    return {
        "files": [image.file for image in group],
        "labels": [class_names[image.label] for image in group],
        "leak": len({image.split for image in group}) > 1,  # in train and in val
        "conflicting_labels": len(labels) > 1,
    }


def _exact_duplicates(images: list[AuditImage], class_names: list[str]) -> list[dict[str, Any]]:
    groups: dict[str, list[AuditImage]] = {}
    for image in images:
        groups.setdefault(image.sha256, []).append(image)
    found = [_describe(group, class_names) for group in groups.values() if len(group) > 1]
    return sorted(found, key=lambda d: (not d["leak"], not d["conflicting_labels"], d["files"]))


def _near_duplicates(features: torch.Tensor, images: list[AuditImage], class_names: list[str],
                     same_bytes: set[frozenset[str]]) -> list[dict[str, Any]]:  # fmt: skip
    """Pairs above NEAR_DUPLICATE_SIMILARITY that are not byte-identical, most similar first. The
    similarity matrix is computed a block of rows at a time, so memory stays linear in the images."""
    pairs = []
    for start in range(0, len(images), 1024):
        block = features[start : start + 1024] @ features.T
        rows, columns = torch.nonzero(block >= NEAR_DUPLICATE_SIMILARITY, as_tuple=True)
        for row, column in zip(rows.tolist(), columns.tolist()):
            first, second = start + row, column
            if first < second and frozenset((images[first].file, images[second].file)) not in same_bytes:
                pairs.append((block[row, column].item(), first, second))
    found = []
    for similarity, first, second in sorted(pairs, reverse=True):
        found.append({**_describe([images[first], images[second]], class_names), "similarity": round(similarity, 4)})
    return sorted(found, key=lambda d: (not d["leak"], -d["similarity"]))


def _out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Each image's class probabilities from a logistic regression trained on the other folds."""
    folds = int(min(5, np.bincount(labels).min()))
    # On unit-length features; C chosen on trashnet with injected label errors (C from 0.01 to 50,
    # with and without standardising): the most accurate out of fold (0.80), and the best ranking.
    classifier = LogisticRegression(C=10.0, max_iter=3000)
    probabilities = cross_val_predict(classifier, features, labels, method="predict_proba",
                                      cv=StratifiedKFold(folds, shuffle=True, random_state=seed))  # fmt: skip
    return probabilities, float((probabilities.argmax(axis=1) == labels).mean())


def _label_issues(pred_probs: np.ndarray, labels: np.ndarray, images: list[AuditImage],
                  class_names: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    # n_jobs=1: cleanlab otherwise starts a process pool, which a Celery worker's pool process (a
    # daemon) may not do ("daemonic processes are not allowed to have children"); it is fast alone.
    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [
        {
            "file": images[index].file,
            "split": images[index].split,
            "label": class_names[labels[index]],
            "suggested_label": class_names[int(pred_probs[index].argmax())],
            "label_probability": round(float(pred_probs[index, labels[index]]), 4),
            "suggested_probability": round(float(pred_probs[index].max()), 4),
        }
        for index in ranked
    ]


def _confused_classes(pred_probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    overlapping = find_overlapping_classes(labels=labels, pred_probs=pred_probs)
    return [
        {
            "classes": [class_names[int(row["Class Index A"])], class_names[int(row["Class Index B"])]],
            "images": int(row["Num Overlapping Examples"]),
            "joint_probability": round(float(row["Joint Probability"]), 4),
        }
        for _, row in overlapping.iterrows()
        if row["Num Overlapping Examples"] > 0
    ]


def _outliers(features: torch.Tensor, images: list[AuditImage], class_names: list[str]) -> list[dict[str, Any]]:
    """Images whose mean cosine distance to their nearest neighbours is more than OUTLIER_Z robust
    standard deviations (1.4826 x the median absolute deviation) above the median image's."""
    k = min(NEIGHBOURS, len(images) - 1)
    if k < 1:
        return []
    distances = torch.empty(len(images))
    for start in range(0, len(images), 1024):
        similarity = features[start : start + 1024] @ features.T
        nearest = similarity.topk(k + 1, dim=1).values[:, 1:]  # the first is the image itself
        distances[start : start + 1024] = (1 - nearest).mean(dim=1)
    median = distances.median()
    spread = 1.4826 * (distances - median).abs().median().clamp(min=1e-6)
    scores = (distances - median) / spread
    flagged = torch.nonzero(scores > OUTLIER_Z).flatten().tolist()
    return sorted(
        ({"file": images[i].file, "label": class_names[images[i].label], "split": images[i].split,
          "neighbour_distance": round(distances[i].item(), 4), "score": round(scores[i].item(), 2)}
         for i in flagged),
        key=lambda d: -d["score"],
    )  # fmt: skip
