"""``competition export RUN... OUT``: a self-contained offline inference bundle (Kaggle code
competitions, internet off).

A consumer of finished runs (:meth:`RunRecord.open`): the bundle holds the fold weights of a run
or of a blend's members (as safetensors), the runs' resolved configs, ``bundle.json`` (class list,
submission format, and per model its backbone, normalisation, pooling, head, decode side, eval
crops, TTA views and fold files; per run its folds and blend weights), ``predict.py`` (the
standalone script of :mod:`competition.bundle`) and ``inference.ipynb``. Several runs are averaged
with equal weights; fit weights on OOF with ``competition ensemble`` and export the blend instead.

The export refuses, with the setting to change, what the script cannot reproduce: an eval pipeline
other than centre crops, TTA views other than the built-ins of ``plugins/tta.py`` (D4, scale,
crop and their groups), a model that is not the built-in :class:`plugins.backbones.Classifier`,
rank-average blends, and runs of other verbs (baseline: no network weights; adjust, decouple:
post-hoc steps the script does not repeat). It then checks the bundle's copy of each network
against the repository's on a random batch and, where the run's test images are at hand, the
bundle's probabilities against the run's on a few of them. The folder is written beside ``OUT``
and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from competition.bundle import TEMPLATE, notebook
from competition.config import REPO_ROOT, Config, plain_name
from competition.engine import load_checkpoint
from competition.errors import CompetitionError, ConfigError, DataError
from competition.io import write_json, write_text
from competition.manager import components, get_plugin_manager, resolve
from competition.runs import RUNS_DIR, RunRecord, package_versions, resolve_reference

BUNDLE_FORMAT = "competition-bundle/1"
#: Verbs whose runs predict with the fold weights of ``weights_run()`` and the run's own config.
WEIGHT_VERBS = ("train", "predict", "pseudo")
#: Blend methods the script reproduces: a weighted mean of probabilities, or the geometric mean.
LINEAR_BLENDS = ("mean", "hill", "optimize")
VERIFY_IMAGES = 8
PACKAGES = ("torch", "timm", "numpy", "pandas", "Pillow", "safetensors")


# -- what the bundle can reproduce ----------------------------------------------------------------


def _sizes(config: Config) -> tuple[int, int]:
    """(eval size, decode side) as :class:`competition.workspace.Workspace` computes them."""
    data = config.data
    eval_size = data.eval_image_size or data.image_size
    return eval_size, round(max(data.image_size, eval_size) / data.crop_pct)


def _eval_crops(config: Config, run: Path, pm) -> list[int]:
    """The crop sizes of ``augment.eval``: centre crops that never resize (OpenCV stays home)."""
    eval_size, side = _sizes(config)
    available = components("sample_transforms", pm)
    crops, size = [], side
    for i, spec in enumerate(config.augment.eval):
        key = f"augment.eval[{i}]"
        builtin = spec.name in available and available.provider(spec.name) == "plugins.augment_cpu"
        if spec.name != "CenterCrop" or not builtin:
            raise ConfigError(
                f"export {run}: {key}={spec.name} is not reproduced by the bundle's script (it "
                "imports no albumentations, kornia or OpenCV); it reproduces the default eval "
                "pipeline, [CenterCrop]. Predict with it (competition predict "
                f"{run} 'augment.eval=[CenterCrop]') and export that run."
            )
        resolve("sample_transforms", spec.name, key, pm)(eval_size, **spec.params)  # validates
        pct = spec.params.get("crop_pct")
        crop = min(size, eval_size) if pct is None else max(1, round(size * pct))
        if crop != eval_size:
            raise ConfigError(
                f"export {run}: {key}=CenterCrop{spec.params or ''} crops {crop} px of {size} and "
                f"resizes to {eval_size} with OpenCV, which the bundle cannot reproduce exactly. "
                "Drop crop_pct (use data.crop_pct) and export a run predicted that way."
            )
        crops.append(crop)
        size = crop
    if size != eval_size:
        raise ConfigError(
            f"export {run}: augment.eval ends at {size} px, not the eval size {eval_size}: "
            "end it with CenterCrop"
        )
    return crops


def _views(config: Config, run: Path, pm) -> list[dict]:
    """The run's TTA views as the repository expands them (groups, each view once), as data."""
    from competition.predict import tta_views
    from plugins.tta import D4, Crop, Scale

    out = []
    for view in tta_views(config.tta, pm):
        if type(view) is D4:
            out.append({"kind": "d4", "k": view.k, "flip": view.flip})
        elif type(view) is Scale:
            size = list(view.size) if view.size is not None else None
            out.append({"kind": "scale", "size": size, "factor": view.factor})
        elif type(view) is Crop:
            out.append(
                {
                    "kind": "crop",
                    "position": view.position,
                    "fraction": view.fraction,
                    "flip": view.flip,
                }
            )
        else:
            names = ", ".join(spec.name for spec in config.tta)
            raise ConfigError(
                f"export {run}: tta=[{names}] has a view the bundle's script cannot reproduce "
                f"({type(view).__module__}.{type(view).__name__}, from a plugin); it reproduces "
                "the built-in views of plugins/tta.py (D4 elements and d4, scale, multiscale, "
                f"crop, five_crop, ten_crop). Predict with those (competition predict {run} "
                "'tta=[identity, hflip]') and export that run."
            )
    return out


def _repository_model(config: Config, num_classes: int, run: Path, pm):
    from plugins.backbones import Classifier

    model = pm.hook.competition_create_model(config=config, num_classes=num_classes)
    if type(model) is not Classifier:
        raise ConfigError(
            f"export {run}: its model is {type(model).__module__}.{type(model).__name__} (from a "
            "plugin's competition_create_model); the bundle rebuilds only the built-in "
            "plugins.backbones.Classifier (timm backbone, avg/gem pooling, linear/cosine head)"
        )
    return model


def _blend_method(record: RunRecord, where: str) -> str:
    method = str(record.produced_by.get("method", "mean"))
    if method in LINEAR_BLENDS or method.startswith("simplex weights"):  # older blends: linear
        return "mean"
    if method == "geometric":
        return "geometric"
    raise ConfigError(
        f"export {where}: a '{method}' blend is not reproduced by the bundle (a rank average "
        "ranks each class over the whole test set); blend with --method mean, hill, optimize "
        "or geometric and export that blend"
    )


def _node(record: RunRecord, folds: list[int], builder, trail: tuple[str, ...]) -> dict:
    """The bundle's recipe for ``record``: a model, or a blend of member recipes."""
    verb = record.produced_by.get("verb", "train")
    where = " -> ".join((*trail, record.name))
    if verb == "ensemble":
        method, members = _blend_method(record, where), []
        for member in record.produced_by.get("members", []):
            path = resolve_reference(member["run"])
            if not (path / "config.yaml").is_file():
                raise ConfigError(
                    f"export {where}: blend member {member['run']} is gone ({path}); a bundle "
                    "needs every member's fold weights. Restore it or export another run."
                )
            node = _node(RunRecord.open(path), folds, builder, (*trail, record.name))
            temperature = member.get("temperature")
            members.append(
                {
                    "run": path.name,
                    "weight": float(member["weight"]),
                    "temperature": None if temperature is None else float(temperature),
                    "node": node,
                }
            )
        return {"blend": record.name, "method": method, "members": members}
    if verb == "baseline":
        raise ConfigError(
            f"export {where}: a baseline run (frozen features + k-NN / NCM / logistic "
            "regression) has no network weights to bundle. Export a trained run, or a blend "
            "of trained runs."
        )
    if verb not in WEIGHT_VERBS:
        raise ConfigError(
            f"export {where}: runs made by '{verb}' are not reproduced by the bundle (it knows "
            f"{', '.join(WEIGHT_VERBS)} runs and blends of them)"
        )
    return {"model": builder.model(record, folds)}


# -- the bundle -----------------------------------------------------------------------------------


def check_out(out: Path, runs: list[RunRecord], force: bool) -> Path:
    """``OUT`` resolved: a folder outside every run, new, empty, or a bundle to replace (force)."""
    out = Path(out)
    plain_name(out.name, "export OUT (its last part)")
    target = out.resolve()
    protected = {RUNS_DIR.resolve()} | {r.path.resolve().parent for r in runs}
    protected |= {r.path.resolve() for r in runs}
    for place in sorted(protected):
        if target == place or target.is_relative_to(place) or place.is_relative_to(target):
            raise ConfigError(
                f"export OUT={out}: {'inside' if target.is_relative_to(place) else 'holds'} "
                f"{place}; runs/ belongs to the run record. Choose a folder of its own, e.g. "
                f"bundles/{runs[0].name}"
            )
    if REPO_ROOT.is_relative_to(target):
        raise ConfigError(f"export OUT={out}: that holds the repository; choose a new folder")
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"export OUT={out}: a file is there; choose a folder name")
        if any(target.iterdir()):
            if not force:
                raise ConfigError(
                    f"export OUT={out}: exists and is not empty. Pass --force to replace the "
                    "bundle there, or choose another folder."
                )
            manifest = target / "bundle.json"
            if not manifest.is_file() or BUNDLE_FORMAT not in manifest.read_text()[:200]:
                raise ConfigError(
                    f"export OUT={out}: not a bundle written by export (no bundle.json); --force "
                    "only replaces bundles. Move it away or choose another folder."
                )
    return target


def _competition_spec(config: Config, classes: list[str]) -> dict:
    cc = config.competition
    kaggle = cc.layout == "kaggle"
    return {
        "name": cc.name,
        "layout": cc.layout,
        "id_column": cc.id_column if kaggle else "id",
        "label_column": cc.label_column if kaggle else "label",
        "image_pattern": cc.image_pattern,
        "submission_format": cc.submission_format,
        "test_images": cc.test_images if kaggle else cc.test_dir,
        "sample_submission": cc.sample_submission if kaggle else None,
        "test_csv": cc.test_csv if kaggle else None,
        "classes": classes,
    }


class _Builder:
    """Collects models, weight files and configs of the runs into a manifest."""

    def __init__(self, folder: Path, classes: list[str]):
        self.folder, self.classes = folder, classes
        self.pm = get_plugin_manager()
        self.models: list[dict] = []
        self.model_of: dict[Path, int] = {}  # run path -> index in models
        self.files: dict[tuple[Path, int], str] = {}
        self.names: dict[str, Path] = {}  # folder name in the bundle -> run path

    def _unique(self, name: str, path: Path) -> str:
        candidate, n = name, 1
        while self.names.get(candidate, path) != path:
            n += 1
            candidate = f"{name}-{n}"
        self.names[candidate] = path
        return candidate

    def config_copy(self, record: RunRecord) -> str:
        name = self._unique(record.name, record.path.resolve())
        relative = f"configs/{name}.yaml"
        if not (self.folder / relative).is_file():
            write_text(self.folder / relative, (record.path / "config.yaml").read_text())
        return relative

    def model(self, record: RunRecord, folds: list[int]) -> int:
        """Index of ``record``'s model in the manifest; its ``folds`` weights are in the bundle."""
        index = self.model_of.get(record.path.resolve())
        if index is None:
            index = self.model_of[record.path.resolve()] = len(self.models)
            self.models.append(self._spec(record))
        spec = self.models[index]
        self._weights(record, spec, folds)
        return index

    def _spec(self, record: RunRecord) -> dict:
        config, run, classes = record.config, record.path, self.classes
        weights = record.weights_run()
        eval_size, side = _sizes(config)
        return {
            "run": record.name,
            "config": self.config_copy(record),
            "weights_run": weights.name,
            "backbone": config.model.backbone,
            "timm_kwargs": dict(getattr(config.model, "kwargs", None) or {}),
            "pooling": config.model.pooling,
            "head": config.model.head,
            "num_classes": len(classes),
            "channels_last": config.model.channels_last,
            "amp": config.amp,
            "side": side,
            "resize": config.data.resize,
            "eval_size": eval_size,
            "crops": _eval_crops(config, run, self.pm),
            "tta": _views(config, run, self.pm),
            "tta_merge": getattr(config, "tta_merge", "mean_probs"),
            "batch_size": config.data.eval_batch_size or config.data.batch_size * 2,
            "files": {},
        }

    def _weights(self, record: RunRecord, spec: dict, folds: list[int]) -> None:
        from safetensors.torch import save_file

        from competition.bundle import predict as script

        config, run, weights = record.config, record.path, record.weights_run()
        model = _repository_model(config, len(self.classes), run, self.pm)
        spec["mean"] = model.mean.flatten().tolist()
        spec["std"] = model.std.flatten().tolist()
        folder = self._unique(weights.name, weights.path.resolve())
        checked = False
        for fold in folds:
            path = weights.fold_dir(fold) / "best.pt"
            key = (path.resolve(), fold)
            if key not in self.files:
                fix = (
                    f"it is fold {fold} of {weights.path}; retrain that fold or export another run"
                )
                state = load_checkpoint(path, str(path), fix)["model"]
                if not checked:  # the script's copy of the network must match the repository's
                    _same_network(model, script.Net(spec), state, run, spec["eval_size"])
                    checked = True
                relative = f"weights/{folder}/fold_{fold}.safetensors"
                target = self.folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
                save_file(tensors, str(target), metadata={"run": weights.name, "fold": str(fold)})
                self.files[key] = relative
            spec["files"][str(fold)] = self.files[key]


def _same_network(model, net, state: dict, run: Path, size: int) -> None:
    """Refuse unless the script's ``Net`` gives the repository model's logits on a random batch."""
    try:
        model.load_state_dict(state)
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"export {run}: the bundle's copy of the model does not take its weights "
            f"({str(exc)[:200]}); the bundle cannot reproduce this model"
        ) from None
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=generator)
    with torch.inference_mode():
        ours, theirs = net.eval()(images), model.eval()(images)
    gap = float((ours - theirs).abs().max())
    if not gap <= 1e-5:
        raise ConfigError(
            f"export {run}: the bundle's copy of the model differs from the repository's "
            f"(logits up to {gap:.2g} apart on a random batch): model.backbone="
            f"{model.name}, pooling, head or model kwargs the script does not rebuild"
        )


def _verify(folder: Path, manifest: dict, group: dict, record: RunRecord, log) -> float | None:
    """Max |bundle - run| of the test probabilities on the first images (None: data not here)."""
    from competition.bundle import predict as script
    from competition.data import read_competition

    try:
        test = read_competition(record.config).test
    except (DataError, ConfigError) as exc:
        log(f"export: {record.name}: test data not at hand ({str(exc)[:120]}); not verified")
        return None
    if test is None:
        return None
    folds = group["folds"]
    expected = np.mean([record.fold_probs(f, "test") for f in folds], axis=0)[:VERIFY_IMAGES]
    sub = {**manifest, "groups": [{**group, "weight": 1.0}]}
    device = record.config.device  # the device the run predicted on, where it is here
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "auto"
    predictor = script.Predictor(sub, script.select_device(device), root=folder)
    got = predictor.predict(list(test["path"])[:VERIFY_IMAGES])
    return float(np.abs(got - expected).max())


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export(
    run_dirs: list[str | Path],
    out: str | Path,
    force: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    log=print,
) -> dict:
    """Write the bundle of ``run_dirs`` (equal weights when several) to ``out``; a summary dict."""
    if not run_dirs:
        raise ConfigError("export: give at least one run folder, e.g. runs/exp1")
    runs = [RunRecord.open(d) for d in run_dirs]
    target = check_out(Path(out), runs, force)
    first = runs[0]
    classes = first.classes()
    comp = _competition_spec(first.config, classes)
    for run in runs[1:]:
        if run.classes() != classes:
            raise ConfigError(f"export: {run.path} has other classes than {first.path}")
        other = _competition_spec(run.config, classes)
        differ = [k for k in comp if k != "name" and other[k] != comp[k]]
        if differ:
            raise ConfigError(
                f"export: {run.path} and {first.path} differ in competition "
                f"{', '.join(differ)}; a bundle predicts one competition"
            )
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.export-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        builder = _Builder(temp, classes)
        groups = []
        for run in runs:
            folds = run.done_folds()
            if not folds:
                raise ConfigError(f"export {run.path}: no finished fold; train it first")
            if len(folds) < run.config.folds.k:
                log(
                    f"export: {run.name} finished {len(folds)} of {run.config.folds.k} folds; "
                    "the bundle predicts with those (like its .partial.csv submission)"
                )
            group = {
                "run": run.name,
                "config": builder.config_copy(run),
                "verb": run.produced_by.get("verb", "train"),
                "weight": 1.0 / len(runs),
                "folds": folds,
                "node": _node(run, folds, builder, ()),
            }
            groups.append(group)
        manifest = _manifest(comp, classes, builder.models, groups)
        write_json(temp / "bundle.json", manifest)
        shutil.copyfile(TEMPLATE, temp / "predict.py")
        write_text(temp / "inference.ipynb", notebook(target.name, manifest))
        write_text(temp / "README.md", _readme(target.name, manifest))
        checked = {}
        if verify:
            for group, run in zip(groups, runs, strict=True):
                gap = _verify(temp, manifest, group, run, log)
                if gap is not None and not gap <= tolerance:
                    raise CompetitionError(
                        f"export {run.path}: the bundle's test probabilities differ from the "
                        f"run's by up to {gap:.2g} (tolerance {tolerance:g}) on its first "
                        f"{VERIFY_IMAGES} test images. If the run predicted on another device "
                        "(a GPU with amp), export there or pass a larger --tolerance."
                    )
                checked[run.name] = gap
        _replace(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return {
        "path": str(target),
        "bytes": _size(target),
        "models": len(builder.models),
        "networks": len(builder.files),
        "runs": [g["run"] for g in groups],
        "verified": checked,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _manifest(comp: dict, classes: list[str], models: list[dict], groups: list[dict]) -> dict:
    versions = package_versions(PACKAGES)
    return {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "packages": versions,
        "classes": classes,
        "competition": comp,
        "models": models,
        "groups": groups,
    }


def _readme(name: str, manifest: dict) -> str:
    comp = manifest["competition"]
    runs = ", ".join(
        f"{g['run']} (folds {g['folds']}, weight {g['weight']:.3g})" for g in manifest["groups"]
    )
    sample = (
        f" --sample-submission DATA/{comp['sample_submission']}"
        if comp["sample_submission"]
        else ""
    )
    return f"""# {name}: offline inference bundle

Made by `competition export` from {runs}.

    python predict.py --images DATA/{comp["test_images"]}{sample} --out submission.csv

needs torch, timm, numpy, pandas, pillow and safetensors (versions it was made with:
{", ".join(f"{k} {v}" for k, v in manifest["packages"].items())}). `inference.ipynb` runs it on
Kaggle (`/kaggle/input/...`). `bundle.json` describes every model; `configs/` holds the runs'
resolved configs; `weights/` the fold weights (safetensors).
"""


def _replace(temp: Path, target: Path) -> None:
    """Move the finished bundle into place; an old bundle there goes only once the new one is in."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(temp, target)
    if old is not None:
        shutil.rmtree(old)


__all__ = ["BUNDLE_FORMAT", "check_out", "export"]
