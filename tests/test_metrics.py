"""Metrics: each built-in against a value worked out by hand, the registry, conformance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pluggy
import pytest
from sklearn.metrics import roc_auc_score

from competition import PROJECT, hookimpl, hookspecs
from competition.conformance.metrics import check_metric
from competition.errors import PluginError
from competition.manager import components
from competition.metrics import Metric, get_metric, log_loss


def one_hot_argmax(predicted, num_classes):
    """Probabilities whose argmax is ``predicted`` (0.7 on it, the rest spread evenly)."""
    probs = np.full((len(predicted), num_classes), 0.3 / (num_classes - 1))
    probs[np.arange(len(predicted)), predicted] = 0.7
    return probs


# targets and argmax predictions shared by the argmax metrics: class 0 right, class 1 missed
# (taken for 0), class 2 right 3 times out of 4 (once taken for 1)
TARGETS = np.array([0, 1, 2, 2, 2, 2])
PREDICTED = np.array([0, 0, 2, 2, 2, 1])


def test_accuracy():
    assert get_metric("accuracy")(TARGETS, one_hot_argmax(PREDICTED, 3)) == pytest.approx(4 / 6)


def test_balanced_accuracy_is_mean_recall():
    # recalls: class 0 1/1, class 1 0/1, class 2 3/4
    value = get_metric("balanced_accuracy")(TARGETS, one_hot_argmax(PREDICTED, 3))
    assert value == pytest.approx((1 + 0 + 3 / 4) / 3)


def test_macro_f1_counts_an_absent_class_as_zero():
    # K=4, class 3 never occurs: F1 class 0 = 2/3 (P 1/2, R 1), class 1 = 0, class 2 = 6/7 (P 1,
    # R 3/4), class 3 = 0
    value = get_metric("macro_f1")(TARGETS, one_hot_argmax(PREDICTED, 4))
    assert value == pytest.approx((2 / 3 + 6 / 7) / 4)


def test_log_loss_clips_and_renormalises():
    metric = get_metric("log_loss")
    assert not metric.higher_is_better and metric.fn is log_loss
    probs = np.array([[0.5, 0.25, 0.25], [0.2, 0.8, 0.0]])
    assert metric([0, 1], probs) == pytest.approx((math.log(2) - math.log(0.8)) / 2)
    # a zero probability on the true class costs -log(1e-15), not infinity
    assert metric([0], np.array([[0.0, 1.0]])) == pytest.approx(-math.log(1e-15), rel=1e-9)


def test_qwk_by_hand():
    # kappa = 1 - sum(w O) / sum(w E), w = (i - j)^2, E = outer(target counts, predicted counts)/N
    # O: (0,0) (1,2) (2,2) (2,1): sum w O = 2; counts (1,1,2) both ways: sum w E = 22/4
    value = get_metric("qwk")(np.array([0, 1, 2, 2]), one_hot_argmax([0, 2, 2, 1], 3))
    assert value == pytest.approx(1 - 2 / 5.5)  # 7/11


def test_qwk_keeps_grade_distances_when_a_grade_is_absent():
    # K=4, grade 2 absent: grades 1 and 3 are 2 apart. O: (0,0) (1,3) (3,3) (3,1): sum w O = 8;
    # counts (1,1,0,2) both ways: sum w E = 54/4. Weighing by position among the grades present
    # (sklearn without labels) would give 7/11.
    value = get_metric("qwk")(np.array([0, 1, 3, 3]), one_hot_argmax([0, 3, 3, 1], 4))
    assert value == pytest.approx(1 - 8 / 13.5)  # 11/27


def test_map_at_3_scores_one_over_rank():
    probs = np.array(
        [
            [0.4, 0.3, 0.2, 0.1],  # true 0: rank 1 -> 1
            [0.4, 0.3, 0.2, 0.1],  # true 1: rank 2 -> 1/2
            [0.4, 0.3, 0.2, 0.1],  # true 2: rank 3 -> 1/3
            [0.4, 0.3, 0.2, 0.1],  # true 3: rank 4 -> 0
            [0.0, 0.5, 0.5, 0.0],  # true 2, tied with class 1: the lower index ranks first -> 1/2
        ]
    )
    value = get_metric("map_at_3")(np.array([0, 1, 2, 3, 2]), probs)
    assert value == pytest.approx((1 + 1 / 2 + 1 / 3 + 0 + 1 / 2) / 5)


# -- the registry ---------------------------------------------------------------------------------

BUILTIN = ["accuracy", "balanced_accuracy", "macro_f1", "log_loss", "qwk", "map_at_3"]


def test_builtins_come_from_the_metrics_plugin():
    metrics = components("metrics")
    for name in BUILTIN:
        assert metrics.provider(name) == "plugins.metrics"
        assert get_metric(name) is metrics[name] and get_metric(name).name == name


def test_unknown_metric_names_close_ones_and_lists_all():
    with pytest.raises(PluginError) as info:
        get_metric("acuracy")
    message = str(info.value)
    assert message.startswith("metric: unknown metric 'acuracy'.")
    assert "Did you mean: accuracy" in message
    assert all(name in message.split("Available:")[1] for name in BUILTIN)


def _manager(*plugins) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"plugin{i}")
    return pm


def test_a_plugin_on_its_own_manager_provides_its_metric():
    top1 = Metric("top1", lambda t, p: float(np.mean(p.argmax(1) == t)))

    class Own:
        @hookimpl
        def competition_register_metrics(self):
            return {"top1": top1}

    pm = _manager(Own())
    assert get_metric("top1", pm) is top1
    with pytest.raises(PluginError, match="unknown metric 'accuracy'"):
        get_metric("accuracy", pm)  # the built-ins are not in this manager


def test_a_registration_that_is_not_a_named_metric_is_refused():
    class Bare:
        @hookimpl
        def competition_register_metrics(self):
            return {"plain": lambda t, p: 0.0, "renamed": Metric("other", lambda t, p: 0.0)}

    pm = _manager(Bare())
    with pytest.raises(PluginError, match=r"plugin 'plugin0' registers 'plain' as <function"):
        get_metric("plain", pm)
    with pytest.raises(PluginError, match=r"Metric\('renamed', fn, higher_is_better=...\)"):
        get_metric("renamed", pm)


# -- conformance ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("name", sorted(components("metrics")))
def test_registered_metric_conforms(name):
    check_metric(components("metrics")[name])


def _accuracy(t, p):
    return float(np.mean(p.argmax(1) == t))


def _mean_recall(t, p):
    """Mean per-class recall that averages over all K classes: NaN when a fold lacks one."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean([np.mean(p.argmax(1)[t == c] == c) for c in range(p.shape[1])]))


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        (Metric("upside_down", _accuracy, higher_is_better=False), "not better than random"),
        (Metric("first_row", lambda t, p: float(p[0, t[0]])), "shuffling the rows changed"),
        (Metric("constant", lambda t, p: np.float32(0.5)), "not better than random"),
        (Metric("nan", lambda t, p: float("nan")), "score is nan"),
        (
            Metric("in_place", lambda t, p: _accuracy(t, p.sort(axis=1) or p)),
            "modified its inputs",
        ),
        (Metric("binary_auc", lambda t, p: roc_auc_score(t, p[:, 1])), r"K=5.*raised ValueError"),
        (Metric("recall_of_every_class", _mean_recall), "without class 4: score is nan"),
    ],
)
def test_conformance_catches(broken, complaint):
    with pytest.raises(AssertionError, match=complaint):
        check_metric(broken)
