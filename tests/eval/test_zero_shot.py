from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from sslrun.data.image_set import DatasetSplits, ImageSet
from sslrun.eval.zero_shot import zero_shot_eval

EVAL = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "eval" / "default.yaml")
NAMES = ["boot", "coat", "bag", "shirt"]


class PerfectEncoder(nn.Module):
    """Hand-built: an image of class k lights pixel k of its first row; a prompt names its class. Both map to the
    one-hot vector of that class in the encoder's own order (the reverse of the dataset's), so the evaluation
    must pair class names with labels to score."""

    order = NAMES[::-1]

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        label = x[:, 0, 0, : len(NAMES)].argmax(1)
        return F.one_hot(torch.tensor([self.order.index(NAMES[k]) for k in label]), len(NAMES)).float()

    def zero_shot_head(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        self.prompts += [t.format(c) for c in class_names for t in templates]
        return F.one_hot(torch.tensor([self.order.index(c) for c in class_names]), len(NAMES)).float()


def splits() -> DatasetSplits:
    labels = torch.arange(20) % len(NAMES)
    images = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    images[torch.arange(20), 0, 0, labels] = 255
    test = ImageSet(images, labels)
    return DatasetSplits("toy", test, test, test, len(NAMES), (0.1,), (0.3,), NAMES)


def test_a_perfect_encoder_scores_one_and_sees_every_prompt():
    encoder = PerfectEncoder()
    results = zero_shot_eval(encoder, splits(), EVAL, torch.device("cpu"))
    assert results == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0}
    assert len(encoder.prompts) == len(NAMES) * len(EVAL.zero_shot.templates)
    assert "a photo of a boot." in encoder.prompts


def test_a_wrong_class_order_is_caught():
    encoder = PerfectEncoder()
    swapped = splits()
    swapped.classes = NAMES[1:] + NAMES[:1]  # names no longer match the labels
    assert zero_shot_eval(encoder, swapped, EVAL, torch.device("cpu"))["zeroshot_top1"] == 0.0


def test_skipped_without_a_text_tower_or_class_names_or_when_disabled():
    off = OmegaConf.merge(EVAL, {"zero_shot": {"enabled": False}})
    assert zero_shot_eval(PerfectEncoder(), splits(), off, torch.device("cpu")) == {}
    assert zero_shot_eval(nn.Linear(2, 2), splits(), EVAL, torch.device("cpu")) == {}
    unnamed = splits()
    unnamed.classes = []
    assert zero_shot_eval(PerfectEncoder(), unnamed, EVAL, torch.device("cpu")) == {}


def test_clip_head_averages_the_templates():
    pytest.importorskip("open_clip")
    from sslrun.backbones.small_cnn import SmallCNN
    from sslrun.methods.clip import CLIP

    torch.manual_seed(0)
    clip = CLIP(SmallCNN(in_channels=1, width=4, feat_dim=16), embed_dim=8, context_length=10, text_width=16,
                text_layers=1, text_heads=2, init_temperature=0.07, max_logit_scale=100.0).eval()
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    head = clip.zero_shot_head(["cat", "dog"], templates)
    with torch.no_grad():
        cat = clip.encode_text(clip.tokenize([t.format("cat") for t in templates])).mean(0)
    torch.testing.assert_close(head[0], F.normalize(cat, dim=0))
    results = zero_shot_eval(clip, splits_for_clip(), EVAL, torch.device("cpu"))
    assert set(results) == {"zeroshot_top1", "zeroshot_top5"}
    assert 0.0 <= results["zeroshot_top1"] <= results["zeroshot_top5"] <= 1.0


def splits_for_clip() -> DatasetSplits:
    s = splits()
    s.classes = ["cat", "dog", "ship", "truck"]
    return s
