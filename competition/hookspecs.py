"""Every extension point of the template, grouped by phase: the contract with plugins.

A plugin is a module (or object) with functions named like these hooks and marked with
``competition.hookimpl``. Built-in plugins live in ``plugins/``; third-party ones are found through
the ``competition`` entry-point group.

Two kinds of hooks:

* ``competition_register_*``: every plugin contributes a mapping ``{name: factory}`` (for metrics
  and weights ``{name: Metric}``, ``{name: WeightsPackage}``); the config picks a component by
  name. A later plugin (a user's) overrides a built-in of the same name.
* ``competition_create_*``: one plugin answers (``firstresult``); built-ins are ``trylast`` so a
  user's plugin wins.

Hooks build callables once, at setup; the training loop calls those callables.
No hook runs per batch.
"""

from __future__ import annotations

from competition import hookspec

# -- setup ----------------------------------------------------------------------------------------


@hookspec
def competition_configure(config):
    """See the resolved, frozen :class:`competition.config.Config` as a run starts.

    Not historic: one process may run many configs (a tuning study), and a plugin registered
    later must not receive every earlier run's config.
    """


# -- components -----------------------------------------------------------------------------------


@hookspec
def competition_register_backbones():
    """Return ``{name: factory}`` of backbones.

    ``factory(model_config, num_classes) -> torch.nn.Module``. The module takes float images in
    [0, 1], shape (B, 3, H, W), normalises them itself and returns logits (B, num_classes). It may
    offer ``param_groups()`` (a list of ``{"params", "lr_scale"}`` dicts), ``data_config`` (a dict
    with ``mean``, ``std``, ``input_size``, ``crop_pct``, ``interpolation``), ``stages()`` (the
    modules of its stages, shallow to deep) and ``embed(x)`` (pooled features).
    The mapping may be lazy (a ``collections.abc.Mapping`` over a whole model zoo).
    """


@hookspec
def competition_register_losses():
    """Return ``{name: factory}`` of losses.

    ``factory(num_classes, class_counts, **params) -> torch.nn.Module`` whose
    ``forward(logits, targets)`` accepts hard targets (LongTensor, (B,)) and soft targets (float,
    (B, num_classes), rows summing to one) and returns a scalar. A loss that changes over
    training (deferred re-weighting, ``ldam_drw``) offers ``set_epoch(epoch, epochs)``: the engine
    calls it before each training epoch (``epoch`` from 0, of ``epochs``), resumed runs included.
    """


@hookspec
def competition_register_samplers():
    """Return ``{name: factory}`` of training samplers; ``data.sampler.name`` picks one.

    ``factory(targets, num_classes, generator, **params) -> torch.utils.data.Sampler`` over the
    fold's training rows: ``targets`` are their class indices (int numpy array, (N,)); iteration
    yields indices in ``[0, N)``, ``len(sampler)`` of them (one epoch), drawn only from the
    ``torch.Generator`` it is given (the loader re-seeds it every epoch, so a resumed run draws the
    same order). A sampler may offer ``set_epoch(epoch, epochs)``, called before each training
    epoch. :func:`competition.conformance.samplers.check_sampler` tests that contract.
    """


@hookspec
def competition_register_sample_transforms():
    """Return ``{name: factory}`` of per-sample CPU transforms (run in DataLoader workers).

    ``factory(image_size, **params) -> transform``; ``transform(image)`` maps an HWC uint8 numpy
    array to an HWC uint8 numpy array. A transform may offer ``set_seed(seed)``; the loader calls it
    in each worker so runs are reproducible.
    """


@hookspec
def competition_register_batch_augments():
    """Return ``{name: factory}`` of batch augmentations, run on the model's device.

    ``factory(**params) -> augment``; ``augment(images, targets) -> (images, targets)`` with images
    float (B, 3, H, W) in [0, 1] and targets soft (B, num_classes). Shape, dtype and device are
    kept; targets still sum to one. ``augment.mixes`` (bool) says whether it mixes samples (mixing
    can be switched off for the last epochs); ``augment.attach(model)``, when present, is called
    once after the model is built (feature-level augmentations such as manifold mixup).
    """


@hookspec
def competition_register_tta():
    """Return ``{name: factory}`` of test-time augmentation views.

    ``factory(**params) -> view``; ``view(images) -> images`` for float (B, 3, H, W) in [0, 1]
    (the size may change for models with global pooling). A group (``d4``, ``ten_crop``) returns a
    list of views instead. Predictions are merged over the views as ``tta_merge`` says (mean of
    probabilities or of logits); views that compare equal are predicted once.
    """


@hookspec
def competition_register_metrics():
    """Return ``{name: metric}`` of validation metrics; the config key ``metric`` picks one.

    Each value is a :class:`competition.metrics.Metric` whose ``name`` is its key.
    ``metric(targets, probs) -> float`` takes integer targets (N,) and class probabilities (N, K)
    (float64, rows sum to one; a fold may lack a class) and must not modify them or depend on row
    order; ``higher_is_better`` tells checkpoint selection, tuning and ensembling which way is
    better. :func:`competition.conformance.metrics.check_metric` tests that contract.
    """


@hookspec
def competition_register_weights():
    """Return ``{name: package}`` of pretrained weights; ``model.pretrained=<name>`` picks one.

    Each value is a :class:`plugins.pretrained.WeightsPackage` (or any object with the same
    fields): ``arch``, the timm architecture the weights fit (``model.backbone`` must be it);
    ``load(model) -> dict`` of tensors in the timm model's key names (a classifier that does not
    fit is dropped, any other mismatch is an error); ``install``, how to get the weights, shown
    when they are missing. Weights are read from disk, never downloaded at run time.
    """


@hookspec(firstresult=True)
def competition_create_model(config, num_classes):
    """Return the ``torch.nn.Module`` to train for ``config.model``; the first answer wins.

    The built-in answer (``trylast``) looks ``config.model.backbone`` up among the registered
    backbones. See :func:`competition_register_backbones` for what the module must do.
    """


# -- tuning ---------------------------------------------------------------------------------------


@hookspec
def competition_search_space(trial, config):
    """Return ``{"dotted.key": value}`` suggested from the Optuna ``trial`` for this config."""


# -- events (loggers, trackers, pruning) ----------------------------------------------------------


@hookspec
def competition_fold_start(fold, run_dir, config):
    """A fold starts, in any verb that produces a run (train, a tune trial, baseline, predict,
    ensemble); ``run_dir`` is the run's folder (``pathlib.Path``)."""


@hookspec
def competition_epoch_end(fold, epoch, metrics, run_dir):
    """An epoch ended; ``metrics`` is the row written to ``fold_<k>/log.csv`` (a dict)."""


@hookspec
def competition_fold_end(fold, result, run_dir):
    """A fold finished and is recorded; ``result`` is its :class:`competition.runs.FoldResult`."""


@hookspec
def competition_run_end(run_dir, cv):
    """A run finished; ``cv`` is the content of ``cv.json`` (a dict)."""
