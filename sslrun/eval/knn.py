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
    """Class scores [N_test, C] from the k nearest l2-normalised train features."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    if backend == "faiss":
        sims, idx = _neighbours_faiss(train, test, k)
    else:
        sims, idx = _neighbours_torch(train, test, k, chunk)
    weights = (sims / temperature).exp()
    scores = torch.zeros(test.shape[0], num_classes, device=test.device)
    return scores.scatter_add_(1, train_labels.to(test.device)[idx], weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the top-k scores, for each k (k capped at the class count)."""
    labels = labels.to(scores.device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}
