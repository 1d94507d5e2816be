"""The KD tutorial's teacher and hint-student recipes in plain PyTorch, sharing no code with sslrun: an oracle that
tells sslrun's training apart from the data when a distillation row misses its band.

    python scripts/kd_plain_pytorch.py teacher <cifar10 folders>                      # DeepNN, cross-entropy
    python scripts/kd_plain_pytorch.py hint <cifar10 folders> --teacher <run>/checkpoints/last.pt

``<cifar10 folders>`` holds ``train/<class>/*`` and ``test/<class>/*`` (the JPEG copy; torchvision's ImageFolder
and PIL decode them). The recipe is shared/reference/knowledge_distillation.md's: ToTensor, ImageNet mean/std,
batch 128 shuffled, Adam 1e-3, 10 epochs, ``torch.manual_seed(42)`` before building the network; the hint student
adds a conv3x3 16->32 regressor on its last feature map, loss 0.25 MSE(regressor, teacher map) + 0.75 CE, the
teacher (an sslrun ``method=supervised`` checkpoint of ``backbone=kd_deepnn``) frozen in eval mode. Prints the
test accuracy after every epoch. ``--limit N`` trains on the first N images (a smoke run).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchvision import datasets, transforms


def load(folder: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(folder, transform=tf)
    n = min(limit or len(ds), len(ds))
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n] if limit else range(n)
    return torch.stack([ds[i][0] for i in index]), torch.tensor([ds.targets[i] for i in index])


def conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]


class DeepNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv(3, 128), *conv(128, 64), nn.MaxPool2d(2), *conv(64, 64), *conv(64, 32),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.classifier(torch.flatten(self.features(x), 1)), None


class LightNNRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv(3, 16), nn.MaxPool2d(2), *conv(16, 16), nn.MaxPool2d(2))
        self.regressor = nn.Conv2d(16, 32, 3, padding=1)
        self.classifier = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(torch.flatten(f, 1)), self.regressor(f)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum((net(x[i:i + 500])[0].argmax(1) == y[i:i + 500]).sum().item() for i in range(0, len(x), 500))
    net.train()
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", choices=["teacher", "hint"])
    parser.add_argument("data")
    parser.add_argument("--teacher", help="sslrun checkpoint of the teacher (hint)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    if args.row == "hint" and not args.teacher:
        parser.error("hint needs --teacher <run>/checkpoints/last.pt")
    start = time.time()
    (xtr, ytr), (xte, yte) = load(f"{args.data}/train", args.limit), load(f"{args.data}/test", args.limit)
    teacher = None
    if args.row == "hint":
        teacher = DeepNN()
        state = torch.load(args.teacher, map_location="cpu", weights_only=False)["method"]
        teacher.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
        teacher.eval()
        print(f"teacher test {accuracy(teacher, xte, yte):.4f}", flush=True)
    torch.manual_seed(42)
    net = DeepNN() if teacher is None else LightNNRegressor()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        perm, total, steps = torch.randperm(len(xtr)), 0.0, 0
        for i in range(0, len(xtr), 128):
            b = perm[i:i + 128]
            logits, regressed = net(xtr[b])
            loss = nn.functional.cross_entropy(logits, ytr[b])
            if teacher is not None:
                with torch.no_grad():
                    target = teacher.features(xtr[b])
                loss = 0.25 * nn.functional.mse_loss(regressed, target) + 0.75 * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch + 1} loss {total / steps:.4f} test {accuracy(net, xte, yte):.4f} "
              f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
