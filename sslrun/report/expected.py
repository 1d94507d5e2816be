"""An experiment's ``expected`` block: the figure a recipe should reproduce, checked and judged.

    expected:
      metric: linear_top1     # a key of metrics.json: knn_top1, knn_top5, linear_top1, linear_top5
      value: 0.918            # a fraction, as metrics.json writes it (91.8 % -> 0.918)
      tol: 0.01               # a band on both sides: |got - value| <= tol reproduces
      source: "Chen & He 2021 (SimSiam), App. D"   # paper and table, or repository and file
      floor: false            # optional; true: got >= value - tol reproduces (no upper bound)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

from omegaconf import DictConfig, OmegaConf

from ..errors import SslrunError

METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "classifier_top1", "classifier_top5")
REQUIRED = ("metric", "value", "tol", "source")
OPTIONAL = ("floor",)


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def check_expected(cfg: DictConfig) -> None:
    """Refuse an experiment whose ``expected`` block cannot be judged; no block is fine.

    Raises:
        SslrunError: naming the key and the fix when the block is not a mapping, misses one of
            ``metric, value, tol, source``, has an unknown key, names a metric metrics.json does not
            hold, gives an accuracy outside [0, 1] (a percentage), a negative tolerance, or a
            non-boolean ``floor``.
    """
    if "expected" not in cfg or cfg.expected is None:
        return
    exp = cfg.expected
    where = "the experiment's expected block"
    if not isinstance(exp, DictConfig):
        raise SslrunError(f"expected={exp!r} must be a mapping with {', '.join(REQUIRED)}; write it as "
                          "expected: {metric: knn_top1, value: 0.85, tol: 0.01, source: \"paper, table\"}.")
    missing = [k for k in REQUIRED if k not in exp]
    unknown = [k for k in exp if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise SslrunError(f"In {where}, " + "; ".join(
            ([f"{', '.join(missing)} missing"] if missing else []) + ([f"unknown key(s) {', '.join(unknown)}"]
                                                                      if unknown else [])) +
            f". It takes {', '.join(REQUIRED)} and optionally floor: true.")
    if exp.metric not in METRICS:
        raise SslrunError(f"expected.metric={exp.metric!r} is not a metric a run writes; use one of "
                          f"{', '.join(METRICS)}.")
    for key in ("value", "tol"):
        if not _is_number(exp[key]):
            raise SslrunError(f"expected.{key}={exp[key]!r} must be a finite number.")
    if not 0 <= exp.value <= 1:
        raise SslrunError(f"expected.value={exp.value} is not an accuracy in [0, 1]; metrics.json writes "
                          f"fractions: write {exp.value / 100:g} for {exp.value} %.")
    if exp.tol < 0:
        raise SslrunError(f"expected.tol={exp.tol} must be >= 0: it is the half-width of the band around "
                          "expected.value (for a one-sided target add floor: true).")
    if not isinstance(exp.source, str) or not exp.source.strip():
        raise SslrunError("expected.source must say where the figure comes from (paper and table, or "
                          "repository and file).")
    if "floor" in exp and not isinstance(exp.floor, bool):
        raise SslrunError(f"expected.floor={exp.floor!r} must be true or false.")


def judge(expected: Mapping, metrics: Mapping) -> dict:
    """Whether ``metrics`` reproduce ``expected`` (a checked block, as a plain mapping).

    Returns:
        ``{"got", "delta", "reproduced"}``: got is ``metrics[expected["metric"]]`` (None when absent),
        delta = got - value; reproduced is ``|delta| <= tol`` (a band on both sides), or
        ``delta >= -tol`` when ``floor`` is true; False when the metric is absent or not finite.
    """
    exp = OmegaConf.to_container(expected) if isinstance(expected, DictConfig) else dict(expected)
    got = metrics.get(exp["metric"])
    if not _is_number(got):
        return {"got": got, "delta": None, "reproduced": False}
    delta = got - exp["value"]
    slack = 1e-9  # figures are rounded to 4 decimals: a delta of exactly tol must not fail on float error
    ok = delta >= -exp["tol"] - slack if exp.get("floor", False) else abs(delta) <= exp["tol"] + slack
    return {"got": got, "delta": delta, "reproduced": bool(ok)}
