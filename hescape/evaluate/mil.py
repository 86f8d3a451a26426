"""A small gated-attention MIL classifier (Ilse et al. 2018) for slide/donor-level labels."""

from __future__ import annotations

import numpy as np


def _module(dim: int, n_classes: int, hidden: int):
    import torch
    from torch import nn

    class AttentionMIL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Linear(dim, hidden)
            self.u = nn.Linear(dim, hidden)
            self.w = nn.Linear(hidden, 1)
            self.head = nn.Linear(dim, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (patches, dim) -> (n_classes,)
            a = self.w(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x)))
            return self.head((torch.softmax(a, dim=0) * x).sum(dim=0))

    return AttentionMIL()


def fit_predict_mil(
    train_bags: list[np.ndarray],
    train_y: np.ndarray,
    test_bags: list[np.ndarray],
    n_classes: int,
    *,
    epochs: int = 60,
    hidden: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> np.ndarray:
    """Train on bags (each ``patches x D``) with class-balanced CE; return test probabilities."""
    import torch

    torch.manual_seed(seed)
    stack = np.concatenate(train_bags)
    mu, sd = stack.mean(axis=0), stack.std(axis=0) + 1e-6
    to_t = [torch.as_tensor((b - mu) / sd, dtype=torch.float32) for b in train_bags]
    counts = np.bincount(train_y, minlength=n_classes).astype(np.float64)
    weight = torch.as_tensor(
        len(train_y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32
    )
    model = _module(stack.shape[1], n_classes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    y = torch.as_tensor(train_y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(to_t), generator=gen).tolist():
            opt.zero_grad()
            loss_fn(model(to_t[i])[None], y[i : i + 1]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = [model(torch.as_tensor((b - mu) / sd, dtype=torch.float32)) for b in test_bags]
        return torch.softmax(torch.stack(logits), dim=1).numpy()
