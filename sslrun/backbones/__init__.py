"""Backbones: nn.Modules that map images to a feature vector of size ``feat_dim``.

Every backbone exposes ``feat_dim`` and ``first_layer`` / ``last_layer`` (module names the gradient
monitors read; MoCo v3's instability shows first in the patch projection, i.e. the first layer).
"""
