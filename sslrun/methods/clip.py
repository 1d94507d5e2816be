"""CLIP (Radford et al., ICML 2021): an image encoder and a text encoder trained to pair each image with its
caption among the batch, with the symmetric InfoNCE and a learnable temperature.

The text encoder is the paper's (Sec. 2.4; openai/CLIP ``model.py``) at a configurable size: BPE tokens (CLIP's
own 49408-token vocabulary, from open-clip-torch), learned position embeddings, pre-LayerNorm transformer
blocks under a causal mask, a final LayerNorm, the features at the end-of-text token, a linear projection.
The image encoder is the configured backbone and a linear projection into the same space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import FitInfo, Method, TrainState
from .losses import in_fp32


def load_tokenizer(context_length: int):
    """CLIP's BPE tokenizer (open_clip's ``SimpleTokenizer``; its vocabulary ships inside the package, so it
    works offline): ``tokenizer(list_of_str) -> LongTensor [n, context_length]``, each row ``<start> ... <end>``
    zero-padded, truncated to end with ``<end>``.

    Raises:
        SslrunError: open-clip-torch is not installed.
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise SslrunError(f"method=clip needs CLIP's tokenizer from open-clip-torch, which is not installed ({e}). "
                          "Install it with: pip install -e \".[clip]\" (or pip install open-clip-torch).") from e
    return SimpleTokenizer(context_length=context_length)


@in_fp32
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al., 2021, Fig. 3): the mean of the cross entropies of the
    image->text and the text->image logits ``logit_scale * image @ text.T``, whose targets are the diagonal.

    Under DDP every process scores its own rows against the texts (and images) of all processes, gathered
    with their gradients (open_clip's ``local_loss`` with ``gather_with_grad``): the same loss and gradients
    as one process holding the global batch.

    Args:
        image: l2-normalised image embeddings; row i is paired with ``text[i]``.
        text: l2-normalised text embeddings.
        logit_scale: the inverse temperature ``exp(t)``, a scalar (at most 100, see ``CLIP.on_after_step``).

    Shape:
        image, text: [N, D]; returns a scalar.
    """
    all_image, all_text = dist.gather_with_grad(image), dist.gather_with_grad(text)
    targets = torch.arange(image.shape[0], device=image.device) + dist.rank() * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


class TextTransformer(nn.Module):
    """CLIP's text encoder: tokens [B, L] -> embeddings [B, embed_dim] (not normalised).

    Pre-LayerNorm blocks (``nn.TransformerEncoderLayer``, GELU, MLP 4x width) under a causal mask, so that a
    position sees only the tokens before it; the output is read at the end-of-text token, the largest token id
    in each row (as in openai/CLIP ``encode_text``). Initialised as openai/CLIP ``initialize_parameters``.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int) -> None:
        super().__init__()
        if width % heads:
            raise SslrunError(f"method.text_width={width} must be a multiple of method.text_heads={heads}.")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context_length),
                             persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
        for layer in self.transformer.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(layer.linear1.weight, std=fc_std)
            nn.init.normal_(layer.linear2.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position features [B, L, width] after the final LayerNorm."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, mask=self.causal_mask, is_causal=True)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_features(tokens)
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id of the vocabulary
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


class CLIP(Method):
    """CLIP (Radford et al., ICML 2021): contrastive image-caption pretraining.

    Each step pairs the first view of each image with the caption of that image (looked up by the dataset
    ``index`` among the captions tokenised once at ``on_fit_start``) and minimises ``clip_loss`` with the
    learnable logit scale ``exp(t)``, ``t`` initialised to log(1/0.07) and clipped so that the scale stays at
    most 100 (the paper, Sec. 2.5; open_clip clamps it after each optimizer step, as here).

    Args:
        backbone: the image encoder's trunk, images [B,C,H,W] -> features [B, backbone.feat_dim].
        embed_dim: the joint embedding width D.
        context_length: tokens per caption (CLIP: 77); longer captions are truncated.
        text_width, text_layers, text_heads: the text transformer (CLIP's smallest: 512, 12, 8).
        init_temperature: the starting temperature (0.07, i.e. logit scale 1/0.07).
        max_logit_scale: the largest logit scale (100).

    The probes evaluate ``backbone``; zero-shot classification uses ``encode_image`` and ``zero_shot_head``.
    Needs ``FitInfo.captions`` (``dataset=imagetext``).
    """

    num_large_crops = 1      # one view per image, paired with its caption
    min_batch_reason = "each image's negatives are the other captions of the batch: at batch 1 the loss is exactly 0"

    def __init__(self, backbone: nn.Module, embed_dim: int, context_length: int, text_width: int, text_layers: int,
                 text_heads: int, init_temperature: float, max_logit_scale: float) -> None:
        super().__init__()
        if not (init_temperature > 0 and max_logit_scale > 1):
            raise SslrunError(f"method.init_temperature={init_temperature} must be positive and "
                              f"method.max_logit_scale={max_logit_scale} above 1.")
        self.backbone = backbone
        self.image_projection = nn.Linear(backbone.feat_dim, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=backbone.feat_dim ** -0.5)
        self.tokenizer = load_tokenizer(context_length)
        self.text = TextTransformer(self.tokenizer.vocab_size, context_length, text_width, text_layers, text_heads,
                                    embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.caption_tokens: torch.Tensor | None = None  # [num_samples, context_length], set by on_fit_start

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context_length] on the model's device."""
        return self.tokenizer(texts).to(self.logit_scale.device)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] of normalised images [B,C,H,W]."""
        return F.normalize(self.image_projection(self.backbone(x)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings [B, D] of token ids [B, context_length]."""
        return F.normalize(self.text(tokens), dim=-1)

    def on_fit_start(self, info: FitInfo) -> None:
        captions = info.captions
        if captions is None:
            raise SslrunError("method=clip learns from image-caption pairs, and this dataset has no captions: use "
                              "dataset=imagetext with dataset.train_file=<CSV or JSONL of image paths and captions> "
                              "(scripts/make_imagetext.py writes one from Fashion-MNIST or CIFAR-10).")
        if len(captions) != info.num_samples:
            raise SslrunError(f"{len(captions)} captions for {info.num_samples} pretraining images: the dataset must "
                              "give one caption per image.")
        self.caption_tokens = self.tokenize(list(captions))

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.caption_tokens is None:
            raise SslrunError("CLIP.forward ran before on_fit_start gave it the captions (FitInfo.captions).")
        image = self.encode_image(views[0])
        text = self.encode_text(self.caption_tokens[index.to(self.caption_tokens.device)].to(image.device))
        scale = self.logit_scale.exp()
        return {"loss": clip_loss(image, text, scale), "z": image, "logit_scale": scale.detach()}

    @torch.no_grad()
    def on_after_step(self, state: TrainState) -> None:
        # "clipped to prevent scaling the logits by more than 100" (Sec. 2.5); open_clip's train.py clamps
        # the parameter itself after every step, so the optimizer's next update starts inside the range.
        self.logit_scale.clamp_(0, self.max_log_scale)

    @torch.no_grad()
    def zero_shot_head(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        """Zero-shot classifier weights [C, D]: each class's prompts (every template filled with its name)
        encoded, averaged, and l2-normalised (the prompt ensembling of CLIP's notebook)."""
        if not templates or not class_names:
            raise SslrunError("Zero-shot classification needs class names and at least one prompt template "
                              "(eval.zero_shot.templates).")
        weights = []
        for name in class_names:
            tokens = self.tokenize([t.format(name) for t in templates])
            weights.append(F.normalize(self.encode_text(tokens).float().mean(0), dim=-1))
        return torch.stack(weights)
