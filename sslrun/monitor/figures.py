"""The figures a run draws, as matplotlib ``Figure`` objects (no pyplot: headless by construction), and
``save_figure``, which writes one to ``<run dir>/figures/<name>.png`` and to TensorBoard as ``figures/<name>``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

MATCH_COLOUR, MISMATCH_COLOUR = "tab:green", "tab:red"  # retrieval: neighbour of the query's class or not


def save_figure(fig: Figure, run_dir: Path, name: str, writer: SummaryWriter | None = None, step: int = 0,
                dpi: int = 100) -> Path:
    path = run_dir / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)  # the constrained layout already fits the margins
    if writer is not None:  # the PNG as drawn, so TensorBoard and the file show the same picture
        with Image.open(path) as im:
            writer.add_image(f"figures/{name}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    return path


def save_image_grid(images: torch.Tensor, run_dir: Path, name: str, writer: SummaryWriter | None = None,
                    step: int = 0, nrow: int = 8) -> Path:
    """Images [N, C, H, W] in [0, 1] (a method's reconstructions or samples) as one grid, ``nrow`` per row, to
    ``<run dir>/figures/<name>.png`` (the latest) and to TensorBoard as ``figures/<name>`` (one per step)."""
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    path = run_dir / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)
    if writer is not None:
        writer.add_image(f"figures/{name}", grid, step)
    return path


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images [N,C,H,W] back to [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


def _show(ax, image: torch.Tensor, title: str | None = None, colour: str | None = None) -> None:
    """One image [C,H,W] (uint8, or float in [0, 1]) on ``ax``, without ticks; an optional coloured frame."""
    img = image.detach().cpu()
    img = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    img = img.permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7, color=colour or "black")
    if colour:
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2)


def _grid(rows: int, cols: int, cell: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * cell, rows * cell), layout="constrained")
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def augmentation_preview(images: torch.Tensor, views: Sequence[torch.Tensor], mean: Sequence[float],
                         std: Sequence[float], cell: float = 1.0) -> Figure:
    """One row per image: the original (uint8 [n,C,H,W]), then each of its views (normalised float
    batches, as the model sees them, un-normalised for display; small crops keep their size)."""
    n = images.shape[0]
    fig, axes = _grid(n, 1 + len(views), cell)
    shown = [unnormalize(v[:n], mean, std) for v in views]
    for i in range(n):
        _show(axes[i, 0], images[i], "image" if i == 0 else None)
        for j, v in enumerate(shown):
            _show(axes[i, 1 + j], v[i], f"view {j + 1} ({v.shape[-1]} px)" if i == 0 else None)
    return fig


def embedding_map(points: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], title: str,
                  size: float = 6.0) -> Figure:
    """A scatter of 2-D points [N, 2] coloured by class, with a legend of class names."""
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    pts, lab = points.detach().cpu().numpy(), labels.cpu().numpy()
    num = int(lab.max()) + 1 if lab.size else 0
    cmap = "tab10" if num <= 10 else "tab20" if num <= 20 else "viridis"
    scatter = ax.scatter(pts[:, 0], pts[:, 1], c=lab, cmap=cmap, vmin=-0.5, vmax=max(num, 1) - 0.5, s=6)
    if num <= 20:
        handles = [ax.scatter([], [], color=scatter.cmap(scatter.norm(c)), s=20) for c in range(num)]
        names = [classes[c] if c < len(classes) else str(c) for c in range(num)]
        ax.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def attention_mask(attn: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """DINO's thresholded attention (Caron et al., 2021, Fig. 3): per row of ``attn`` [..., N], the
    smallest set of largest entries that holds a ``keep`` fraction of the row's mass (bool, same shape)."""
    val, idx = attn.float().sort(dim=-1)
    cum = (val / val.sum(-1, keepdim=True)).cumsum(-1)
    kept_sorted = cum > (1 - keep)
    return kept_sorted.gather(-1, idx.argsort(-1))


def attention_figure(images: torch.Tensor, attn: torch.Tensor, keep: float = 0.6, cell: float = 1.0) -> Figure:
    """One row per image (uint8 [n,C,H,W]): the image, the last layer's CLS attention of every head
    (``attn`` [n, heads, patches], patches a square grid in raster order), then each head's mask that
    keeps ``keep`` of the attention mass, laid over the image."""
    n, heads, patches = attn.shape
    grid = round(patches ** 0.5)
    if grid * grid != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    maps = attn.detach().float().cpu().reshape(n, heads, grid, grid)
    masks = attention_mask(attn.detach().cpu(), keep).reshape(n, heads, 1, grid, grid).float()
    fig, axes = _grid(n, 1 + 2 * heads, cell)
    h, w = images.shape[-2:]
    for i in range(n):
        _show(axes[i, 0], images[i], "image" if i == 0 else None)
        img = images[i].float().cpu() / 255
        for k in range(heads):
            ax = axes[i, 1 + k]
            ax.imshow(maps[i, k].numpy(), cmap="inferno", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {k + 1}", fontsize=7)
            up = torch.nn.functional.interpolate(masks[i, k][None], size=(h, w), mode="nearest")[0]
            title = f"{keep:.0%} mass, head {k + 1}" if i == 0 else None
            _show(axes[i, 1 + heads + k], img * (0.25 + 0.75 * up), title)
    return fig


def retrieval_figure(queries: torch.Tensor, query_labels: torch.Tensor, neighbours: torch.Tensor,
                     neighbour_labels: torch.Tensor, classes: Sequence[str], cell: float = 1.0) -> Figure:
    """One row per query image: the query, then its k nearest train images (uint8 ``neighbours``
    [q, k, C,H,W], nearest first), framed green when of the query's class and red when not."""
    q, k = neighbours.shape[:2]
    fig, axes = _grid(q, 1 + k, cell)

    def name(c: int) -> str:
        return classes[c] if 0 <= c < len(classes) else str(c)

    for i in range(q):
        _show(axes[i, 0], queries[i], f"query: {name(int(query_labels[i]))}")
        for j in range(k):
            c = int(neighbour_labels[i, j])
            colour = MATCH_COLOUR if c == int(query_labels[i]) else MISMATCH_COLOUR
            _show(axes[i, 1 + j], neighbours[i, j], name(c), colour)
    return fig
