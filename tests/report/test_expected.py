"""An experiment's expected block: refused when malformed, judged as a band on both sides or a floor."""

import pytest
from omegaconf import OmegaConf

from sslrun.errors import SslrunError
from sslrun.report.expected import check_expected, judge

GOOD = {"metric": "linear_top1", "value": 0.918, "tol": 0.01, "source": "SimSiam, App. D"}


def cfg(**expected):
    return OmegaConf.create({"expected": expected})


def test_a_complete_block_and_no_block_pass():
    check_expected(cfg(**GOOD))
    check_expected(cfg(**GOOD, floor=True))
    check_expected(OmegaConf.create({"trainer": {"epochs": 1}}))


@pytest.mark.parametrize("change, words", [
    ({"value": None}, "missing"),                      # None -> key dropped below
    ({"source": None}, "source missing"),
    ({"tolerance": 0.01}, "unknown key(s) tolerance"),
    ({"metric": "accuracy"}, "not a metric a run writes"),
    ({"value": 91.8}, "write 0.918 for 91.8 %"),
    ({"value": "0.9"}, "must be a finite number"),
    ({"tol": -0.01}, "must be >= 0"),
    ({"tol": float("nan")}, "must be a finite number"),
    ({"source": "  "}, "must say where the figure comes from"),
    ({"floor": "yes"}, "must be true or false"),
])
def test_a_malformed_block_is_refused_with_its_key(change, words):
    block = {**GOOD, **change}
    block = {k: v for k, v in block.items() if v is not None}
    with pytest.raises(SslrunError, match=None) as e:
        check_expected(cfg(**block))
    assert words in str(e.value)


def test_a_block_that_is_not_a_mapping_is_refused():
    with pytest.raises(SslrunError, match="must be a mapping"):
        check_expected(OmegaConf.create({"expected": 0.9}))


def test_the_config_check_refuses_a_malformed_expected_block():
    from hydra import compose, initialize_config_dir
    from runner import ROOT

    from sslrun.config_check import check_config

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        c = compose("config", overrides=["+expected.metric=knn_top1", "+expected.value=84", "+expected.tol=0.01",
                                         "+expected.source=here"])
    with pytest.raises(SslrunError, match="0.84 for 84 %"):
        check_config(c)


def test_a_band_is_judged_on_both_sides():
    exp = {"metric": "knn_top1", "value": 0.80, "tol": 0.01, "source": "s"}
    assert judge(exp, {"knn_top1": 0.805}) == {"got": 0.805, "delta": pytest.approx(0.005), "reproduced": True}
    assert judge(exp, {"knn_top1": 0.79})["reproduced"]          # exactly tol below: inside
    assert judge(exp, {"knn_top1": 0.81})["reproduced"]          # exactly tol above: inside
    assert not judge(exp, {"knn_top1": 0.7899})["reproduced"]    # below the band
    assert not judge(exp, {"knn_top1": 0.8101})["reproduced"]    # above the band: not a floor
    assert judge(exp, {"knn_top1": 0.8101})["delta"] == pytest.approx(0.0101)


def test_a_floor_is_judged_on_one_side_and_a_missing_metric_never_reproduces():
    floor = {"metric": "knn_top1", "value": 0.84, "tol": 0.0, "source": "s", "floor": True}
    assert judge(floor, {"knn_top1": 0.95})["reproduced"]
    assert judge(floor, {"knn_top1": 0.84})["reproduced"]
    assert not judge(floor, {"knn_top1": 0.8399})["reproduced"]
    assert judge(floor, {}) == {"got": None, "delta": None, "reproduced": False}
    assert not judge(floor, {"knn_top1": float("nan")})["reproduced"]
