import math

import pytest
import torch
import torch.nn.functional as F
from runner import engine_step, method_config, write_caption_set

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.clip import CLIP, TextTransformer, clip_loss

pytest.importorskip("open_clip")


def small_clip(**kw) -> CLIP:
    torch.manual_seed(0)
    args = {"embed_dim": 16, "context_length": 12, "text_width": 32, "text_layers": 2, "text_heads": 2,
            "init_temperature": 0.07, "max_logit_scale": 100.0, **kw}
    return CLIP(SmallCNN(in_channels=1, width=4, feat_dim=16), **args)


def test_loss_matches_the_formula_and_hand_values():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    txt = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    s = torch.tensor(3.0)
    logits = s * img @ txt.T
    # -log of the softmax at the pair, over the row (image -> texts) and over the column (text -> images)
    i2t = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    assert clip_loss(img, txt, s).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)
    # Two perfectly paired orthogonal embeddings: each side is log(1 + e^-s).
    eye = torch.eye(2)
    assert clip_loss(eye, eye, s).item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)


def test_loss_is_symmetric_in_images_and_texts():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    s = torch.tensor(1 / 0.07)
    assert clip_loss(img, txt, s).item() == pytest.approx(clip_loss(txt, img, s).item(), rel=1e-6)


def test_temperature_starts_at_0_07_learns_and_is_clamped_at_100():
    method = small_clip()
    assert method.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    captions = ["a cat", "a dog", "a red ship", "one more dog"]
    method.on_fit_start(FitInfo(4, 1, 1, 1, captions=captions))
    out = method([torch.randn(4, 1, 8, 8)], torch.arange(4))
    out["loss"].backward()
    assert method.logit_scale.grad is not None and method.logit_scale.grad != 0
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        method.logit_scale.fill_(10.0)  # e^10 = 22026
    method.on_after_step(TrainState())
    assert method.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


def test_text_encoder_is_causal_and_pools_at_the_end_of_text_token():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=50, context_length=8, width=16, layers=2, heads=2, embed_dim=8).eval()
    tokens = torch.tensor([[48, 5, 6, 7, 49, 0, 0, 0]])  # start, three words, end (the largest id), padding
    changed = tokens.clone()
    changed[0, 3] = 9
    a, b = text.token_features(tokens), text.token_features(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # positions before the change never see it
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    padded = tokens.clone()
    padded[0, 5:] = 7  # anything after the end token is invisible to it
    torch.testing.assert_close(text(tokens), text(padded))
    torch.testing.assert_close(text(tokens), a[:, 4] @ text.text_projection)


def test_captions_are_required_and_a_short_run_learns_the_pairs():
    method = small_clip()
    with pytest.raises(SslrunError, match="dataset=imagetext"):
        method.on_fit_start(FitInfo(4, 1, 1, 1))
    # Four images of distinct brightness patterns, each with its own caption: CLIP must learn which is which.
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 8, 8, generator=g).repeat(4, 1, 1, 1) + 0.1 * torch.randn(16, 1, 8, 8, generator=g)
    captions = ["a cat", "a dog", "a red ship", "an old truck"] * 4
    method.on_fit_start(FitInfo(16, 1, 40, 40, captions=captions))
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    state = TrainState()
    first = engine_step(method, opt, [images], state)["loss"].item()
    for _ in range(40):
        last = engine_step(method, opt, [images], state)["loss"].item()
    assert last < 0.5 * first
    method.eval()
    head = method.zero_shot_head(["cat", "dog", "red ship", "old truck"], ["a {}", "an {}"])
    assert head.shape == (4, 16)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(4))
    # Retrieval within the training pairs: each image's nearest caption is its own.
    with torch.no_grad():
        sims = method.encode_image(images[:4]) @ method.encode_text(method.tokenize(captions[:4])).T
    assert sims.argmax(1).tolist() == [0, 1, 2, 3]


def test_the_yaml_builds_the_method():
    from hydra.utils import instantiate

    method = instantiate(method_config("clip"), backbone=SmallCNN(in_channels=1, width=4, feat_dim=16))
    assert method.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert method.max_log_scale == pytest.approx(math.log(100))


TINY_CLIP = ["method=clip", "dataset=imagetext", "dataset.image_size=16", "dataset.num_workers=0", "backbone=small_cnn",
             "backbone.width=8", "backbone.feat_dim=32", "method.embed_dim=16",
             "method.text_width=32", "method.text_layers=1", "method.text_heads=2", "trainer.batch_size=32",
             "trainer.epochs=1", "trainer.log_every=1", "eval.linear.epochs=3", "monitor.knn_bank_size=64",
             "monitor.knn_query_size=32", "monitor.figures.enabled=false"]


@pytest.mark.slow
def test_clip_runs_end_to_end_on_an_image_caption_set(tmp_path):
    from runner import read_metrics, sslrun

    write_caption_set(tmp_path / "labelled", 64, label=True)
    write_caption_set(tmp_path / "unlabelled", 64, label=False)
    for name in ("labelled", "unlabelled"):
        sslrun(*TINY_CLIP, f"dataset.train_file={tmp_path / name / 'train.csv'}",
               f"dataset.test_file={tmp_path / name / 'test.csv'}", f"hydra.run.dir={tmp_path / ('run_' + name)}")
    metrics = read_metrics(tmp_path / "run_labelled")
    for key in ("knn_top1", "linear_top1", "zeroshot_top1", "zeroshot_top5"):
        assert 0.0 <= metrics[key] <= 1.0
    unlabelled = read_metrics(tmp_path / "run_unlabelled")
    assert unlabelled["steps"] == 2
    assert not set(unlabelled) & {"knn_top1", "linear_top1", "zeroshot_top1"}  # no labels: no probes
