"""Weighted kNN classification (Wu et al., 2018): votes weighted by exp(cos/T) of the k nearest."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _neighbours_torch(train: torch.Tensor, test: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, idx = [], []
    for i in range(0, test.shape[0], chunk):  # chunked so memory stays at chunk x N_train
        s, j = (test[i:i + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


def _neighbours_faiss(train: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss  # optional backend: exact inner-product search, on the GPU with faiss-gpu

    index = faiss.IndexFlatIP(train.shape[1])
    if hasattr(faiss, "StandardGpuResources") and train.is_cuda:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), train.device.index or 0, index)
    index.add(train.cpu().numpy())
    s, j = index.search(test.cpu().numpy(), k)
    return torch.from_numpy(s).to(test.device), torch.from_numpy(j).to(test.device)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, backend: str = "torch",
                chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al., 2018, Eq. 6 with weights exp(cos/T)).

    Args:
        train_feats: bank features [N_train, D], any scale (l2-normalised here).
        train_labels: bank labels [N_train], integers in [0, num_classes).
        test_feats: query features [N_test, D].
        k: neighbours per query, capped at N_train. temperature: T of the vote weights.

    Returns:
        Scores [N_test, num_classes]: the summed vote weights of each class among the k neighbours, and
        ``-inf`` for a class with no neighbour at all, so that no top-k can credit a class nobody voted for.
        The weights are exp((cos - max cos)/T): the same ranking as exp(cos/T), without overflow at small T.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    if backend == "faiss":
        sims, idx = _neighbours_faiss(train, test, k)
    else:
        sims, idx = _neighbours_torch(train, test, k, chunk)
    weights = ((sims - sims[:, :1]) / temperature).exp()  # sims are sorted: column 0 is each row's max
    neighbour_labels = train_labels.to(test.device)[idx]
    scores = torch.zeros(test.shape[0], num_classes, device=test.device).scatter_add_(1, neighbour_labels, weights)
    votes = torch.zeros_like(scores).scatter_add_(1, neighbour_labels, torch.ones_like(weights))
    return scores.masked_fill_(votes == 0, float("-inf"))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the top-k scores, for each k (k capped at the class count).

    A class scored ``-inf`` (kNN: no neighbour voted for it) is never a hit, even when it falls inside the
    top k because fewer than k classes got a vote.
    """
    labels = labels.to(scores.device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    hit = (top.indices == labels[:, None]) & (top.values > float("-inf"))
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}
