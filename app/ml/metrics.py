"""Classification metrics from predictions and targets (torch only, no extra dependency)."""

from typing import Any

import torch


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> dict[str, Any]:
    num_classes = len(class_names)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    predictions = logits.argmax(dim=1)
    # confusion[i][j]: images of true class i predicted as class j
    confusion = torch.bincount(targets * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives = confusion.diag().double()
    predicted = confusion.sum(dim=0).double()
    actual = confusion.sum(dim=1).double()
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positives / actual.clamp(min=1), torch.zeros_like(actual))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), torch.zeros_like(denominator))
    result: dict[str, Any] = {
        "val_loss": loss,
        "val_accuracy": true_positives.sum().item() / max(1, len(targets)),
        "macro_f1": f1.mean().item(),
        "per_class": [
            {
                "label": name,
                "precision": precision[i].item(),
                "recall": recall[i].item(),
                "f1": f1[i].item(),
                "support": int(actual[i].item()),
            }
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices.eq(targets[:, None]).any(dim=1)
        result["val_top5_accuracy"] = top5.double().mean().item()
    return result
