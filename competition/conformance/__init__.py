"""Conformance checks shipped with the template: every plugin of a kind must pass its kind's check.

A third-party plugin's own test calls one function on its factory, e.g.::

    from competition.conformance.losses import check_loss
    def test_poly1_conforms():
        check_loss(PolyLoss)

Modules: :mod:`.backbones`, :mod:`.losses`, :mod:`.augment` (sample transforms, batch
augmentations, TTA views).
"""
