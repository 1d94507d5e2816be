import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    EventAccumulator,
)
from torch.utils.tensorboard import SummaryWriter

from sslrun.monitor.figures import (
    attention_figure,
    attention_mask,
    augmentation_preview,
    embedding_map,
    retrieval_figure,
    save_figure,
)
from sslrun.monitor.maps import pca_2d, tsne_2d


def images(n: int, c: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def assert_png(path, min_side: int = 50) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side


def test_attention_mask_keeps_the_smallest_set_holding_the_mass():
    attn = torch.tensor([[0.1, 0.5, 0.1, 0.3],    # 0.5 + 0.3 = 0.8 >= 0.6; 0.5 alone is not
                         [0.7, 0.2, 0.05, 0.05],  # 0.7 alone holds 0.6
                         [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([[False, True, False, True],
                             [True, False, False, False],
                             [False, True, True, True]])  # ties: any 3 of 4 equal patches; DINO's sort keeps these
    mask = attention_mask(attn, keep=0.6)
    assert mask[:2].tolist() == expected[:2].tolist()
    assert mask[2].sum().item() == 3
    assert attention_mask(attn * 5, keep=0.6)[:2].tolist() == expected[:2].tolist()  # unnormalised rows too


def test_every_figure_is_written_readable_and_in_tensorboard(tmp_path):
    n, classes = 3, ["a", "b", "c"]
    views = [torch.randn(n, 1, 8, 8), torch.randn(n, 1, 8, 8), torch.randn(n, 1, 4, 4)]  # a small crop too
    attn = torch.softmax(torch.randn(n, 2, 4), dim=-1)
    figs = {
        "augmentations": augmentation_preview(images(n), views, (0.5,), (0.25,)),
        "embedding_map": embedding_map(torch.randn(30, 2), torch.arange(30) % 3, classes, "map"),
        "attention": attention_figure(images(n, 3), attn, keep=0.6),
        "retrieval": retrieval_figure(images(n), torch.tensor([0, 1, 2]), images(n * 4).view(n, 4, 1, 8, 8),
                                      torch.tensor([[0, 1, 0, 2]] * n), classes),
    }
    with SummaryWriter(str(tmp_path)) as writer:
        paths = [save_figure(fig, tmp_path, name, writer, step=7) for name, fig in figs.items()]
    for path, name in zip(paths, figs):
        assert path == tmp_path / "figures" / f"{name}.png"
        assert_png(path)
    acc = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {f"figures/{name}" for name in figs}
    assert acc.Images("figures/retrieval")[0].step == 7


def test_attention_figure_needs_a_square_grid():
    with pytest.raises(ValueError, match="square"):
        attention_figure(images(1), torch.ones(1, 2, 5))


def clusters(n_per: int = 40, k: int = 4, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + torch.randn(k * n_per, d, generator=g), labels


def nearest_neighbour_purity(y: torch.Tensor, labels: torch.Tensor) -> float:
    dist = torch.cdist(y, y)
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(1)] == labels).float().mean().item()


def test_tsne_keeps_separated_clusters_apart():
    x, labels = clusters()
    y = tsne_2d(x, perplexity=20, iters=400)
    assert y.shape == (len(x), 2) and torch.isfinite(y).all()
    assert nearest_neighbour_purity(y, labels) > 0.95
    assert torch.equal(tsne_2d(x[:50], iters=20), tsne_2d(x[:50], iters=20))  # seeded: the same map twice


def test_pca_finds_the_leading_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3.0, 0.1, 0.1, 0.1, 0.1]) + 10.0
    y = pca_2d(x)
    assert y.shape == (500, 2)
    for j in range(2):  # each component is (up to sign) one of the two high-variance axes
        corr = torch.corrcoef(torch.stack([y[:, j], x[:, j]]))[0, 1].abs()
        assert corr > 0.99
    assert pca_2d(torch.randn(10, 1)).shape == (10, 2)  # 1-D data: padded
