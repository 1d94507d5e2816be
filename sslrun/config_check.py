"""Catch config mistakes before any work starts, with the key, the bad value and the fix."""

from __future__ import annotations

import difflib
from numbers import Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import SslrunError
from .report.expected import check_expected


def _number(cfg: DictConfig, key: str, integer: bool = False, positive: bool = True,
            allow_none: bool = False, minimum: float | None = None) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else Real):
        raise SslrunError(f"{key}={value!r} must be {kind}" + (" or null" if allow_none else "") +
                          f"; set it on the command line, e.g. {key}={1 if integer else 0.1}.")
    if positive and value <= 0:
        raise SslrunError(f"{key}={value} must be positive; set it to a value above 0.")
    if minimum is not None and value < minimum:
        raise SslrunError(f"{key}={value} must be at least {minimum}.")


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...], other_ok: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices and not (other_ok and isinstance(value, str)):
        raise SslrunError(f"{key}={value!r} is not a valid choice; use one of: {', '.join(choices)}.")


CONF = Path(__file__).resolve().parent.parent / "conf"
# Groups read key by key by the code (nothing instantiates them), so a key they do not define would be
# silently ignored: Hydra's own hint for a misspelled key, `+trainer.epoch=3`, would train 100 epochs.
# (An unknown key in an instantiated group fails when its class is built, naming the key.)
PLAIN_GROUPS = ("trainer", "eval", "monitor")


def _unknown_keys(node: DictConfig, known: DictConfig, prefix: str) -> None:
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
            hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
            raise SslrunError(f"{prefix}.{key} is not a key of the {prefix.split('.')[0]} group, so it would be "
                              f"ignored.{hint} The keys are listed by `sslrun --cfg job`.")
        if isinstance(node[key], DictConfig) and isinstance(known[key], DictConfig):
            _unknown_keys(node[key], known[key], f"{prefix}.{key}")


def _top_level_keys() -> list[str]:
    """The config's top-level keys: one per group of conf/config.yaml's defaults, and an experiment's target."""
    groups = [next(iter(d)) for d in OmegaConf.load(CONF / "config.yaml").defaults if isinstance(d, DictConfig)]
    return [g for g in groups if not g.startswith(("experiment", "override "))] + ["expected"]


def check_config(cfg: DictConfig) -> None:
    """Static checks of the composed config; data-dependent ones happen once the dataset is loaded."""
    known = _top_level_keys()
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise SslrunError(f"{key} is not a config group or key, so it would be ignored."
                              + (f" Did you mean {close[0]}?" if close else "")
                              + f" The top-level keys are: {', '.join(known)}.")
    for group in PLAIN_GROUPS:
        _unknown_keys(cfg[group], OmegaConf.load(CONF / group / "default.yaml"), group)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.log_every", "trainer.checkpoint_every",
                "eval.batch_size", "eval.knn.k", "eval.linear.epochs", "eval.linear.batch_size"):
        _number(cfg, key, integer=True)
    for key in ("optimizer.lr", "eval.knn.temperature", "eval.linear.lr"):
        _number(cfg, key)
    _number(cfg, "optimizer.weight_decay", positive=False, minimum=0)
    _number(cfg, "optimizer.warmup_epochs", positive=False, minimum=0)
    _number(cfg, "trainer.max_minutes", allow_none=True)
    # Sizes and counts of the dataset group (each dataset has some of them); null where its YAML allows.
    for key in ("image_size", "channels", "num_train", "num_test", "num_classes", "limit_train", "limit_test"):
        if key in cfg.dataset:
            _number(cfg, f"dataset.{key}", integer=True, allow_none=key.startswith("limit"))
    _method_ranges(cfg)
    _number(cfg, "trainer.seed", integer=True, positive=False)
    _choice(cfg, "trainer.precision", ("auto", "bf16", "fp32"))
    _choice(cfg, "eval.knn.backend", ("torch", "faiss"))
    _choice(cfg, "trainer.resume", ("auto", "never"), other_ok=True)
    if cfg.eval.only and not cfg.eval.checkpoint:
        raise SslrunError("eval.only=true needs a checkpoint to evaluate: add "
                          "eval.checkpoint=<run dir>/checkpoints/last.pt.")
    check_expected(cfg)


def _method_ranges(cfg: DictConfig) -> None:
    """Method keys whose meaning fixes their range, by the field's names: a temperature divides (0 gives NaN, which
    would be blamed on the lr), a loss weight or β below 0 turns a loss into one to maximise, a queue length is a
    count."""
    for key, value in cfg.method.items():
        if isinstance(value, (DictConfig, list)) or value is None:
            continue
        if key.endswith(("temperature", "_temp")):
            _number(cfg, f"method.{key}")
        elif key.endswith("_weight") or key in ("beta", "lambd"):
            _number(cfg, f"method.{key}", positive=False, minimum=0)
        elif key in ("queue_size", "queue_length", "embed_queue"):
            _number(cfg, f"method.{key}", integer=True, positive=False, minimum=0)


def check_against_data(cfg: DictConfig, num_pretrain: int) -> None:
    from . import dist  # torch: imported here so that the static checks stay light

    if cfg.trainer.batch_size % dist.world_size():
        raise SslrunError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must split evenly "
                          f"over the {dist.world_size()} processes; use a multiple of {dist.world_size()}.")
    if cfg.trainer.batch_size > num_pretrain:
        raise SslrunError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the pretraining set "
                          f"({num_pretrain} images of dataset {cfg.dataset.get('name', '?')}); lower "
                          f"trainer.batch_size to at most {num_pretrain}.")


def misspelled_override(args: list[str]) -> str | None:
    """The first ``a.b=value`` on a command line whose key the composed config lacks, as a message with the closest
    key there, e.g. ``trainer.epoch`` -> ``trainer.epochs`` (Hydra's own hint for it, ``+trainer.epoch=3``, would
    add a key that nothing reads). None when every key exists, or when the group choices do not compose (Hydra
    then reports that itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith(("-cn", "--config-name", "-cd", "--config-dir", "-cp", "--config-path", "hydra.searchpath"))
           for a in args):
        return None  # another primary config or search path: sslrun's own conf/ is not what Hydra will compose
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says it
        return None
    plain = [o for o in overrides if o.is_add() is False and not o.is_delete() and "." in o.key_or_group
             and o.package is None and not o.key_or_group.startswith("hydra.")]
    choices = [o.input_line for o in overrides if o not in plain and not o.key_or_group.startswith("hydra")]
    if not plain:
        return None
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=choices)
    except Exception:  # noqa: BLE001 - the choices themselves are what Hydra refused
        return None
    for o in plain:
        parent_key, _, key = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key)
        if isinstance(parent, DictConfig) and key not in parent.keys():  # `in` is False for a ??? (missing) value
            close = difflib.get_close_matches(key, [str(k) for k in parent], n=1)
            return (f"{o.key_or_group} is not a key of {parent_key}, so it would be ignored" +
                    (f": did you mean {parent_key}.{close[0]}?" if close else ".") + f" Adding it with "
                    f"+{o.key_or_group}=... would not help either: nothing reads it. `sslrun --cfg job` lists the keys.")
    return None
