"""Whether a checkpoint may be continued under the config given now.

A resume continues the stored run, so the config it continues with must be the stored one: a changed
lr, temperature, batch size or dataset would silently train a mix of two configs while ``.hydra/`` and
metrics.json name only the new one. Only keys that do not change what one step computes may differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SslrunError

# Keys a resume may change: how long to train, how often to log or save, and how to evaluate at the end.
# Raising trainer.epochs (or max_minutes) trains a finished run further; its schedules stretch to the new end.
SAFE_TO_CHANGE = ("trainer.epochs", "trainer.max_minutes", "trainer.log_every", "trainer.checkpoint_every",
                  "trainer.resume", "trainer.resume_force", "trainer.device", "eval.", "monitor.figures.",
                  "monitor.knn_every", "monitor.knn_every_steps", "monitor.rank_every", "expected.")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` for a nested dict/list config (list items keyed by their position)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key that differs and is not safe to change."""
    a, b = flatten(saved), flatten(current)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_TO_CHANGE)]


def check_resumable(ck: dict, current: dict, path: Path, force: bool) -> None:
    """Refuse (SslrunError) to continue ``ck`` under ``current`` (the resolved config as a dict) when a
    key that changes training differs, or when the stored run is another method's; ``force`` accepts
    the differences (but never another method)."""
    saved = ck.get("config") or {}
    old, new = (c.get("method", {}).get("_target_") for c in (saved, current))
    if old and new and old != new:
        raise SslrunError(f"{path} is a checkpoint of {old.rsplit('.', 1)[-1]}, not of {new.rsplit('.', 1)[-1]}: "
                          "give this run its own directory (drop hydra.run.dir) or set trainer.resume=never.")
    diff = changed_keys(saved, current)
    if diff and not force:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8]) + (" ..." if len(diff) > 8 else "")
        raise SslrunError(
            f"Not resuming {path}: the config differs from the one it was trained with in {len(diff)} key(s) "
            f"({shown}). Continuing would train on a mix of the two configs. Run it in a new directory (drop "
            "hydra.run.dir / hydra.sweep.dir), or rerun with the stored values; to continue anyway set "
            f"trainer.resume_force=true. Keys that may always change: "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in SAFE_TO_CHANGE)}.")


def finished_message(ck: dict, trainer: Any, path: Path) -> str | None:
    """Why the stored run has nothing left to train under the ``trainer`` limits given now, or None."""
    state = ck.get("state", {})
    if state.get("epoch", 0) >= trainer.epochs:
        why = f"all {trainer.epochs} epochs are done"
    elif trainer.max_minutes and ck.get("seconds", 0.0) >= trainer.max_minutes * 60:
        why = f"its trainer.max_minutes={trainer.max_minutes} budget is used"
    else:
        return None
    return (f"{path} holds a finished run ({why}); its results are in metrics.json beside it, and nothing would "
            "be retrained. Give a new run its own directory (drop hydra.run.dir / hydra.sweep.dir), evaluate this "
            f"one with eval.only=true eval.checkpoint={path}, or train it further by raising trainer.epochs "
            "(or trainer.max_minutes).")
