"""Plugin discovery: built-ins, a third-party entry point, errors, the hook contract."""

import inspect
import textwrap
from pathlib import Path

import pytest

from competition import hookspecs
from competition.conformance.losses import check_loss
from competition.errors import PluginError
from competition.manager import DEFAULT_PLUGINS, KINDS, components, get_plugin_manager, resolve

POLY_PLUGIN = '''
import torch
from competition import hookimpl


class PolyLoss(torch.nn.Module):
    """Poly-1 loss (Leng et al. 2022): cross-entropy + epsilon * (1 - p_t); hard or soft targets."""

    def __init__(self, num_classes, class_counts=None, epsilon=1.0):
        super().__init__()
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits, targets):
        if targets.ndim == 1:
            targets = torch.nn.functional.one_hot(targets, self.num_classes).float()
        log_p = logits.log_softmax(1)
        pt = (targets * log_p.exp()).sum(1)
        return (-(targets * log_p).sum(1) + self.epsilon * (1 - pt)).mean()


@hookimpl
def competition_register_losses():
    return {"poly1": PolyLoss}
'''


def _install_dist(root: Path, module: str, source: str, entry: str) -> None:
    """A real installed distribution: a module plus a .dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module.replace('_', '-')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[competition]\n{entry} = {module}\n")


@pytest.fixture
def fresh_manager():
    get_plugin_manager.cache_clear()
    yield
    get_plugin_manager.cache_clear()


def test_builtin_plugins_provide_every_kind():
    pm = get_plugin_manager()
    for name in DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None
    for kind in KINDS:
        assert len(components(kind)) > 0, kind
    assert "resnet10t" in components("backbones")
    assert components("losses").provider("cross_entropy") == "plugins.losses"


def test_third_party_plugin_through_an_entry_point(tmp_path, monkeypatch, fresh_manager):
    _install_dist(tmp_path, "my_poly_plugin", POLY_PLUGIN, "my_poly")
    monkeypatch.syspath_prepend(str(tmp_path))
    losses = components("losses")
    assert "poly1" in losses and losses.provider("poly1") == "my_poly"
    assert "cross_entropy" in losses  # built-ins are still there
    check_loss(losses["poly1"], num_classes=5)  # the shipped conformance suite, as a user runs it


def test_a_user_plugin_overrides_a_builtin_of_the_same_name(fresh_manager):
    class Override:
        from competition import hookimpl

        @hookimpl
        def competition_register_losses(self):
            return {"cross_entropy": "mine"}

    pm = get_plugin_manager()
    pm.register(Override(), name="override")
    assert components("losses")["cross_entropy"] == "mine"


def test_a_broken_plugin_is_named_with_its_package(tmp_path, monkeypatch, fresh_manager):
    _install_dist(tmp_path, "broken_plugin", "import not_a_module_anywhere\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginError, match=r"plugin 'broken'.*package 'broken-plugin'.*pip uninstall"
    ):
        get_plugin_manager()


def test_unknown_component_lists_close_names():
    with pytest.raises(PluginError) as info:
        resolve("losses", "crossentropy", "loss.name")
    message = str(info.value)
    assert "loss.name: unknown loss 'crossentropy'" in message
    assert "Did you mean: cross_entropy" in message
    with pytest.raises(PluginError, match=r"Did you mean: .*resnet10t"):
        resolve("backbones", "resnet10", "model.backbone")


def _hookspec_names():
    return [
        name
        for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("competition_")
    ]


@pytest.mark.parametrize("name", _hookspec_names())
def test_every_hook_is_documented_and_tested(name):
    """The contract: each hook has a docstring and at least one test that names it."""
    spec = getattr(hookspecs, name)
    assert spec.__doc__ and len(spec.__doc__.strip()) > 20, f"{name} has no docstring"
    tests = Path(__file__).parent
    sources = [p.read_text() for p in tests.glob("test_*.py") if p.name != Path(__file__).name]
    assert any(name in source for source in sources), f"no test names {name}"


MISSPELLED = """
from competition import hookimpl


@hookimpl
def competition_register_loss():
    return {}
"""


def test_a_misspelled_hook_is_named_not_ignored(tmp_path, monkeypatch, fresh_manager):
    _install_dist(tmp_path, "typo_plugin", MISSPELLED, "typo")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="Did you mean competition_register_losses"):
        get_plugin_manager()
