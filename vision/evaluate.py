"""Components the vision recipes share: config builders, minibatch iteration and accuracy.

`vision/train.py`, `vision/average.py`, `vision/sweep.py`, `vision/train_ensemble.py` and the `vision_domains`
evaluator (`vision/pareto_eval.py`) all build a run's dataset and classifier from its config and score models
with the same accuracy; those helpers live here, below the entry points, because recipes do not import
recipes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from vision.data import MultiDomainDataset, get_dataset
from vision.models import Classifier, build_model, load_classifier_weights

__all__ = [
    "accuracy",
    "build_classifier",
    "build_dataset",
    "eval_batches",
    "evaluate_splits",
    "infinite_batches",
    "resolve_device",
    "source_val_acc",
    "tensor_view",
    "test_acc",
]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_dataset(cfg: DictConfig | Mapping[str, Any], augment: bool | None = None) -> MultiDomainDataset:
    """The run's dataset from `cfg.dataset` (test domains get no augmentation)."""
    d = cfg["dataset"]
    options = dict(d.get("options") or {})
    return get_dataset(
        d["name"],
        data_dir=d.get("data_dir"),
        test_domains=list(cfg["test_envs"]),
        augment=bool(d.get("augment", True)) if augment is None else augment,
        image_size=d.get("image_size"),
        **options,
    )


def build_classifier(cfg: DictConfig | Mapping[str, Any], dataset: MultiDomainDataset, dropout: float) -> Classifier:
    """The classifier from `cfg.model`, then the optional LP head / featurizer inits from `cfg.init`."""
    m = cfg["model"]
    model = build_model(
        m["backbone"],
        num_classes=dataset.num_classes,
        pretrained=m.get("pretrained"),
        freeze_bn=bool(m.get("freeze_bn", False)),
        dropout=dropout,
        in_chans=dataset.input_shape[0],
        **dict(m.get("kwargs") or {}),
    )
    init = cfg.get("init") or {}
    if init.get("featurizer"):
        load_classifier_weights(model, init["featurizer"], prefix="featurizer.")
    if init.get("classifier"):
        load_classifier_weights(model, init["classifier"], prefix="classifier.")
    return model


def tensor_view(data: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x [N, ...], y [N]) when `data` is an in-memory `Subset` of a `TensorDataset` (the digits built-ins), so
    batches are gathered by one index op instead of N `__getitem__` calls; None otherwise."""
    from torch.utils.data import ConcatDataset, Subset, TensorDataset

    if isinstance(data, ConcatDataset):
        parts = [tensor_view(d) for d in data.datasets]
        if any(p is None for p in parts) or not parts:
            return None
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # type: ignore[index]
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset) and len(data.dataset.tensors) == 2:
        index = torch.as_tensor(data.indices, dtype=torch.long)
        x, y = data.dataset.tensors
        return x[index], y[index]
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    return None


def infinite_batches(data: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> Iterator[Any]:
    """Endless shuffled minibatches (reshuffled every epoch with a seeded generator, last partial batch dropped
    unless the split is smaller than one batch)."""
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(data) >= batch_size  # type: ignore[arg-type]
    tensors = tensor_view(data)
    if tensors is not None:
        x, y = tensors
        n = len(y)
        while True:
            perm = torch.randperm(n, generator=generator)
            stop = n - n % batch_size if drop_last else n
            for start in range(0, stop, batch_size):
                index = perm[start : start + batch_size]
                yield x[index], y[index]
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last,
                        num_workers=num_workers)
    while True:
        yield from loader


def eval_batches(data: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered minibatches of `data` (tensor fast path for in-memory datasets)."""
    tensors = tensor_view(data)
    if tensors is None:
        yield from DataLoader(data, batch_size=batch_size)
        return
    x, y = tensors
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` (eval mode) on `data`."""
    if len(data) == 0:  # type: ignore[arg-type]
        return float("nan")
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in eval_batches(data, batch_size):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == torch.as_tensor(y)).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def evaluate_splits(
    model: torch.nn.Module, in_splits: Sequence[Dataset], out_splits: Sequence[Dataset], device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """{"env{i}_in_acc", "env{i}_out_acc"} for every domain i."""
    accs: dict[str, float] = {}
    for i, (ds_in, ds_out) in enumerate(zip(in_splits, out_splits)):
        accs[f"env{i}_in_acc"] = accuracy(model, ds_in, device, batch_size)
        accs[f"env{i}_out_acc"] = accuracy(model, ds_out, device, batch_size)
    return accs


def source_val_acc(accs: Mapping[str, float], source_domains: Sequence[int]) -> float:
    """Training-domain validation: the mean out-split accuracy over the source domains."""
    return sum(accs[f"env{i}_out_acc"] for i in source_domains) / len(source_domains)


def test_acc(accs: Mapping[str, float], test_domains: Sequence[int]) -> float:
    """Test-domain accuracy: the mean over test domains of their `in` split (80 %) accuracy, DomainBed's
    `collect_results` convention."""
    if not test_domains:
        return float("nan")
    return sum(accs[f"env{i}_in_acc"] for i in test_domains) / len(test_domains)
