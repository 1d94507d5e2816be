"""Helpers for tests that run sslrun end to end, the way a user does."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Small, fast settings for end-to-end runs on synthetic data.
FAST = ["dataset=synthetic", "dataset.num_train=256", "dataset.num_test=128", "backbone=small_cnn",
        "backbone.width=8", "backbone.feat_dim=32", "method.proj_hidden_dim=64", "trainer.batch_size=64",
        "trainer.epochs=1", "trainer.log_every=1", "eval.linear.epochs=3", "monitor.knn_bank_size=128",
        "monitor.knn_query_size=64"]


def sslrun(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does, in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "sslrun.cli", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"sslrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def method_config(name: str):
    """The ``method`` node of conf/method/<name>.yaml (the file itself is a global package with defaults)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml").method


def engine_step(method, opt, views, state, index=None) -> dict:
    """One training step of a method, with its hooks in the order the engine calls them."""
    import torch

    out = method(views, torch.arange(views[0].shape[0]) if index is None else index)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    method.on_after_backward(state)
    opt.step()
    state.step += 1
    method.on_after_step(state)
    return out


def compose(*overrides: str):
    """The config ``sslrun <overrides>`` would run, composed in-process (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def write_caption_set(folder, count: int, label: bool) -> None:
    """Images of the synthetic dataset's classes as PNGs, captioned with their class name, in open_clip's CSV."""
    import csv

    from PIL import Image

    from sslrun.data.datasets import synthetic

    names = ["red fox", "blue whale", "green frog", "old truck"]
    data = synthetic(num_train=count, num_test=count // 2, num_classes=4, image_size=16, channels=3, seed=0)
    for split, images in (("train", data.train), ("test", data.test)):
        (folder / split).mkdir(parents=True)
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"] + (["label"] if label else []))
            for i in range(len(images)):
                Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(folder / split / f"{i}.png")
                name = names[int(images.labels[i])]
                w.writerow([f"{split}/{i}.png", f"a picture of a {name}"] + ([name] if label else []))
