"""Data audit before training (``competition check CONFIG``): every image is opened, decoded and
hashed once, and every problem is listed, not the first one only.

Errors (the check exits non-zero):

* ``unreadable``: not an image PIL can identify (an empty file, a ``.mat`` file, an HTML page);
* ``truncated`` / ``corrupt``: the header reads but the pixels do not decode;
* ``format_mismatch``: the content does not match the extension (a PNG named ``.jpg``);
* ``conflicting_labels``: byte-identical training images with different labels.

Warnings:

* ``duplicate``: byte-identical training images with the same label (optimistic CV when the copies
  fall into different folds: drop one, or give them one ``competition.group_column`` value);
* ``train_test_duplicate``: a test (or holdout) image byte-identical to a training image (leakage);
* ``near_duplicate``: perceptual hashes within ``threshold`` bits, within train or train/test;
* ``imbalance``: largest / smallest class above :data:`IMBALANCE_WARNING`;
* ``odd_mode``: images in a PIL mode other than RGB or L (alpha, palette, 16-bit, CMYK, ...).

Exact duplicates are found by the SHA-1 of the file bytes. Near duplicates use the perceptual hash
pHash (Zauner 2010, "Implementation and Benchmarking of Perceptual Image Hash Functions", master's
thesis, Upper Austria University of Applied Sciences; as implemented by the ``imagehash`` package,
https://github.com/JohannesBuchner/imagehash): the image in grey at 32x32, its 2-D DCT, and one bit
per coefficient of the 8x8 lowest frequencies, set when above their median; two images are compared
by the Hamming distance of their 64-bit hashes. The default :data:`NEAR_DUPLICATE_BITS` = 4 comes
from the shared TrashNet set (2,527 photos): at <= 4 bits the audit reports 24 pairs, 21 of them the
same object photographed twice and 3 of small objects on the same plain background; at 6 bits about
half the new pairs, and at 8-10 most, are different objects: near duplicates are warnings to look
at. JPEGs are hashed from a reduced-scale DCT decode (PIL draft mode) that still reads every byte.

:func:`unreadable_images` and :func:`raise_if_unreadable` are the cheap part (header, extension and,
for JPEG, the end-of-image marker) that ``train`` and ``folds`` run up front.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from competition.config import Config
from competition.data import read_competition
from competition.errors import CompetitionError, DataError

NEAR_DUPLICATE_BITS = 4  # Hamming distance (of 64 bits) at or below which two images are near
IMBALANCE_WARNING = 10.0  # largest / smallest class count above which the audit warns
PLAIN_MODES = ("RGB", "L")  # modes that decode without a choice (no alpha, palette or rescaling)
MAX_LISTED = 20  # bad files listed in a DataError before "... and N more"

# the severity of each kind of finding
KINDS = {
    "unreadable": "error",
    "truncated": "error",
    "corrupt": "error",
    "format_mismatch": "error",
    "conflicting_labels": "error",
    "duplicate": "warning",
    "train_test_duplicate": "warning",
    "near_duplicate": "warning",
    "imbalance": "warning",
    "odd_mode": "warning",
}
COLUMNS = ["severity", "kind", "split", "file", "other_file", "detail"]

# PIL formats each extension may hold (MPO: a JPEG with extra frames, as some cameras write)
SUFFIX_FORMATS = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".jpe": ("JPEG", "MPO"),
    ".jfif": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".gif": ("GIF",),
    ".bmp": ("BMP", "DIB"),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
}

_MODE_NOTES = {
    "RGBA": "colour with alpha",
    "LA": "grey with alpha",
    "P": "palette",
    "PA": "palette with alpha",
    "1": "1-bit",
    "CMYK": "print colours",
    "YCbCr": "YCbCr",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit integer",
    "F": "32-bit float",
}


# -- one image -------------------------------------------------------------------------------------


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "the file is empty"
    return f"it starts with {data[:16]!r}"


def _decode_problem(exc: Exception) -> tuple[str, str]:
    text = f"{type(exc).__name__}: {exc}"
    truncated = "truncated" in str(exc).lower() or isinstance(exc, EOFError)
    kind = "truncated" if truncated else "corrupt"
    fix = "re-download or re-export the file" if kind == "truncated" else "replace the file"
    return kind, f"the pixels do not decode ({text}): {fix}"


def _mismatch(path: Path, image_format: str | None) -> tuple[str, str] | None:
    suffix = path.suffix.lower()
    expected = SUFFIX_FORMATS.get(suffix)
    if image_format is None or expected is None or image_format in expected:
        return None
    return (
        "format_mismatch",
        f"the content is {image_format} but the extension {path.suffix} says {expected[0]}: "
        f"re-save the file as {expected[0]} or give it the right extension",
    )


def _open_header(source, path: Path, head: bytes) -> tuple[dict, list[tuple[str, str]], bool]:
    """Open and verify the header: (format, size, mode), problems, whether the pixels may load."""
    info: dict = {"format": None, "width": None, "height": None, "mode": None}
    try:
        with Image.open(source) as image:
            info.update(
                format=image.format, width=image.size[0], height=image.size[1], mode=image.mode
            )
            image.verify()
    except UnidentifiedImageError:
        detail = f"not an image PIL can identify ({_describe_bytes(head)})"
        return info, [("unreadable", detail)], False
    except Exception as exc:  # verify() raises many types for broken files
        if info["format"] is None:
            text = f"{type(exc).__name__}: {exc}"
            return info, [("unreadable", f"cannot open as an image ({text})")], False
        problems = [_decode_problem(exc)]
        mismatch = _mismatch(path, info["format"])
        return info, [*([mismatch] if mismatch else []), *problems], False
    mismatch = _mismatch(path, info["format"])
    return info, [mismatch] if mismatch else [], True


def _load(source) -> Image.Image:
    """Decode the pixels: JPEGs at a reduced DCT scale (same entropy decoding, so truncation still
    shows; 2-3x faster), other formats in full. The caller closes the image."""
    image = Image.open(source)
    try:
        image.draft("L", (64, 64))
        image.load()
    except BaseException:
        image.close()
        raise
    return image


def _inspect(path: Path) -> dict:
    """Everything the audit needs from one file: hashes, header facts, problems."""
    path = Path(path)
    info = {
        "sha1": None,
        "phash": None,
        "format": None,
        "width": None,
        "height": None,
        "mode": None,
    }
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {**info, "problems": [("unreadable", f"cannot read the file ({exc})")]}
    info["sha1"] = hashlib.sha1(data).hexdigest()
    header, problems, loadable = _open_header(io.BytesIO(data), path, data[:16])
    info.update(header)
    if loadable:
        try:
            with _load(io.BytesIO(data)) as image:
                info["phash"] = _phash(image)
        except Exception as exc:
            problems.append(_decode_problem(exc))
    return {**info, "problems": problems}


def _phash(image: Image.Image) -> str | None:
    import imagehash  # imported where used: the cheap check in train/folds does not need it

    try:
        return str(imagehash.phash(image))
    except Exception:  # an exotic mode imagehash cannot convert: no near-duplicate check for it
        return None


def _jpeg_complete(path: Path) -> bool:
    """Whether a JPEG ends with its end-of-image marker (ignoring trailing padding). Entropy-coded
    data never holds FF D9, so a file cut inside its pixels always fails this."""
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - 1024))
        tail = file.read().rstrip(b"\x00\r\n\t ")
    return tail.endswith(b"\xff\xd9")


def _header_problems(path: Path) -> list[tuple[str, str]]:
    """The cheap check: header, verify, extension; JPEGs by their end marker, decoding only the
    files without one (trailing bytes are legal); other formats than JPEG and PNG are decoded."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as exc:
        return [("unreadable", f"cannot read the file ({exc})")]
    info, problems, loadable = _open_header(path, path, head)
    if not loadable or info["format"] == "PNG":  # PNG verify() already checked every chunk
        return problems
    if info["format"] in ("JPEG", "MPO") and _jpeg_complete(path):
        return problems
    try:
        with _load(path):
            pass
    except Exception as exc:
        problems.append(_decode_problem(exc))
    return problems


def _map(function, items: list, workers: int, log=None, what: str = "checked") -> list:
    """``function`` over ``items`` in a process pool (in order), logging every tenth."""
    n = len(items)
    step = max(1, n // 10)
    results = []

    def done(result) -> None:
        results.append(result)
        if log is not None and (len(results) % step == 0 or len(results) == n):
            log(f"{what} {len(results)}/{n} images")

    if workers > 1 and n > 64:
        chunksize = max(1, min(64, n // (workers * 8)))
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(function, items, chunksize=chunksize):
                done(result)
    else:
        for item in items:
            done(function(item))
    return results


# -- the cheap check -------------------------------------------------------------------------------


def unreadable_images(paths: list[Path], workers: int = 1) -> list[tuple[Path, str]]:
    """Every file of ``paths`` whose header does not open, verify or match its extension, or
    (JPEG without an end marker, formats other than JPEG/PNG) whose pixels do not decode.

    Returns ``(path, reason)`` pairs in the order of ``paths``, each path once.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    found = _map(_header_problems, unique, max(1, workers))
    return [
        (path, "; ".join(detail for _, detail in problems))
        for path, problems in zip(unique, found, strict=True)
        if problems
    ]


def raise_if_unreadable(
    table: pd.DataFrame, what: str, workers: int = 1, *, csv_rows: bool = True
) -> None:
    """Raise :class:`DataError` listing every unreadable image of ``table`` (columns id, path).

    ``what`` names the source in the message and the fix, e.g. ``"train.csv"``. With ``csv_rows``
    the table's index is taken as the CSV's data rows (row = index + 2, after the header).
    """
    bad = dict(unreadable_images(list(table["path"]), workers))
    if not bad:
        return
    lines = []
    for index, image_id, path in zip(table.index, table["id"], table["path"], strict=True):
        if Path(path) in bad:
            where = f"row {index + 2}, id {image_id!r}" if csv_rows else f"id {image_id!r}"
            lines.append(f"  {where}: {path}: {bad[Path(path)]}")
    shown = lines[:MAX_LISTED]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more ({len(lines)} in all)")
    raise DataError(
        f"{what}: {len(lines)} unreadable image(s):\n"
        + "\n".join(shown)
        + f"\nRemove these rows from {what} or replace the files."
    )


# -- the audit -------------------------------------------------------------------------------------


@dataclass
class Audit:
    """The audit's result: one finding per problem or pair, and a summary of the data."""

    findings: pd.DataFrame  # severity, kind, split, file, other_file, detail
    summary: dict = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return int((self.findings["severity"] == "error").sum())

    @property
    def warnings(self) -> int:
        return int((self.findings["severity"] == "warning").sum())

    def to_markdown(self, max_rows: int = 200) -> str:
        """A readable report: images per split, classes, sizes, modes, findings."""
        s = self.summary
        lines = [
            f"# Data audit: {s.get('competition', '')}",
            "",
            f"Data folder `{s.get('root', '')}` (files below are relative to it). "
            f"**{self.errors} error(s), {self.warnings} warning(s).**",
            "",
            _table(["split", "images"], list(s.get("images", {}).items())),
            "",
            "## Classes (train)",
            "",
        ]
        classes = s.get("classes", {})
        total = sum(classes.values()) or 1
        lines += [
            _table(
                ["class", "images", "share"],
                [(c, n, f"{n / total:.1%}") for c, n in classes.items()],
            ),
            "",
            f"Imbalance ratio (largest / smallest class): {s.get('imbalance_ratio', 0):.2f}",
            "",
            "## Image sizes and modes",
            "",
        ]
        sizes = s.get("sizes", {})
        if sizes.get("distinct"):
            width, height = sizes["width"], sizes["height"]
            lines += [
                f"{sizes['distinct']} distinct size(s); width {width['min']}-{width['max']} "
                f"(median {width['median']}), height {height['min']}-{height['max']} "
                f"(median {height['median']}).",
                "",
                _table(["width x height", "images"], list(sizes["most_common"].items())),
                "",
            ]
        lines += [
            _table(["mode", "images"], list(s.get("modes", {}).items())),
            "",
            _table(["format", "images"], list(s.get("formats", {}).items())),
            "",
            "## Findings",
            "",
        ]
        if self.findings.empty:
            lines.append("No problems found.")
            return "\n".join(lines) + "\n"
        counts = self.findings.groupby(["severity", "kind"], sort=False).size()
        lines += [
            _table(["severity", "kind", "count"], [(*k, n) for k, n in counts.items()]),
            "",
            _table(COLUMNS, self.findings.head(max_rows).itertuples(index=False)),
        ]
        if len(self.findings) > max_rows:
            lines += ["", f"... and {len(self.findings) - max_rows} more finding(s) not shown."]
        return "\n".join(lines) + "\n"


def _table(headers: list[str], rows) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _hash_signs(hexes: list[str]) -> np.ndarray:
    """pHash hex strings -> (n, bits) float32 of +-1, so that a . b = bits - 2 * Hamming."""
    raw = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), -1)
    return np.unpackbits(raw, axis=1).astype(np.float32) * 2 - 1


def _distances(a: np.ndarray, b: np.ndarray):
    """Hamming distances of ``a`` against ``b`` in row blocks: yields (start, block)."""
    bits = a.shape[1]
    rows = max(1, 2**22 // max(1, len(b)))
    for start in range(0, len(a), rows):
        yield start, np.rint((bits - a[start : start + rows] @ b.T) / 2).astype(np.int32)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def audit(
    config: Config,
    log=print,
    *,
    workers: int | None = None,
    threshold: int = NEAR_DUPLICATE_BITS,
) -> Audit:
    """Audit every image of the competition in ``config``: see the module docstring.

    ``workers`` processes decode and hash (default: ``data.num_workers``, at least one);
    ``threshold`` is the pHash Hamming distance (of 64 bits) up to which images are near duplicates.
    Missing files still raise :class:`DataError` from :func:`read_competition`.
    """
    try:
        import imagehash  # noqa: F401
    except ImportError:
        raise CompetitionError(
            "the data audit needs the imagehash package: pip install imagehash"
        ) from None
    competition = read_competition(config)
    cc = config.competition
    root = config.data_root()
    workers = max(1, config.data.num_workers if workers is None else workers)
    kaggle = cc.layout == "kaggle"
    test_source = cc.test_csv or cc.sample_submission or "test"

    def rel(path) -> str:
        path = Path(path)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    # one record per table row; holdout rows that are test images label those test rows
    holdout_labels = {}
    if competition.holdout is not None:
        holdout_labels = dict(
            zip(competition.holdout["path"], competition.holdout["label"], strict=True)
        )
    records = []

    def add(split: str, table: pd.DataFrame, source: str, labels) -> None:
        for index, image_id, path, label in zip(
            table.index, table["id"], table["path"], labels, strict=True
        ):
            where = f"{source} row {index + 2}, id {image_id!r}" if kaggle else f"id {image_id!r}"
            records.append(
                {"split": split, "id": image_id, "label": label, "path": Path(path), "where": where}
            )

    add("train", competition.train, cc.train_csv if kaggle else "train", competition.train["label"])
    test_paths = set()
    if competition.test is not None:
        test = competition.test
        test_paths = set(test["path"])
        add("test", test, test_source, [holdout_labels.get(p) for p in test["path"]])
    if competition.holdout is not None:
        holdout = competition.holdout[~competition.holdout["path"].isin(test_paths)]
        add("holdout", holdout, cc.solution_csv or "holdout", holdout["label"])

    paths = list(dict.fromkeys(r["path"] for r in records))
    log(f"auditing {len(paths)} images of {competition.name} with {workers} worker(s)")
    infos = dict(zip(paths, _map(_inspect, paths, workers, log, "audited"), strict=True))
    for record in records:
        record.update({k: v for k, v in infos[record["path"]].items() if k != "problems"})

    findings: list[dict] = []

    def finding(kind: str, split: str, file, other, detail: str) -> None:
        findings.append(
            {
                "severity": KINDS[kind],
                "kind": kind,
                "split": split,
                "file": rel(file) if file else "",
                "other_file": rel(other) if other else "",
                "detail": detail,
            }
        )

    # files: unreadable, truncated, corrupt, extension
    seen = set()
    for record in records:
        if record["path"] in seen:
            continue
        seen.add(record["path"])
        for kind, detail in infos[record["path"]]["problems"]:
            finding(kind, record["split"], record["path"], None, f"{record['where']}: {detail}")

    # exact duplicates within train (anchored on the first copy), then test/holdout against train
    train = [r for r in records if r["split"] == "train"]
    groups: dict[str, list[dict]] = {}
    for record in train:
        if record["sha1"] is not None:
            groups.setdefault(record["sha1"], []).append(record)
    for group in groups.values():
        first = group[0]
        for other in group[1:]:
            pair = f"identical bytes: {first['where']} and {other['where']}"
            if other["label"] != first["label"]:
                finding(
                    "conflicting_labels",
                    "train",
                    first["path"],
                    other["path"],
                    f"{pair} have different labels ({first['label']!r} vs {other['label']!r}): "
                    "correct one label or remove one row",
                )
            else:
                finding(
                    "duplicate",
                    "train",
                    first["path"],
                    other["path"],
                    f"{pair}, both {first['label']!r}: keep one, or give both one group "
                    "(competition.group_column) so they share a fold",
                )
    others = [r for r in records if r["split"] != "train"]
    for record in others:
        match = groups.get(record["sha1"]) if record["sha1"] is not None else None
        if match:
            labels = f"train label {match[0]['label']!r}"
            if record["label"] is not None:
                labels += f", {record['split']} label {record['label']!r}"
            finding(
                "train_test_duplicate",
                f"train/{record['split']}",
                match[0]["path"],
                record["path"],
                f"identical bytes: {match[0]['where']} and {record['where']} ({labels}): "
                "the training set holds this test image",
            )

    # near duplicates: one spanning tree of pairs per cluster within train (closest pairs first),
    # then each test/holdout image against its closest training image
    reps = [g[0] for g in groups.values() if g[0]["phash"] is not None]
    if reps:
        signs = _hash_signs([r["phash"] for r in reps])
        pairs = []
        for start, block in _distances(signs, signs):
            for i, j in zip(*np.nonzero(block <= threshold), strict=True):
                if j > i + start:
                    pairs.append((int(block[i, j]), i + start, int(j)))
        parent = list(range(len(reps)))
        for distance, i, j in sorted(pairs):
            a, b = _find(parent, i), _find(parent, j)
            if a == b:
                continue
            parent[b] = a
            first, other = reps[i], reps[j]
            labels = (
                f"both {first['label']!r}"
                if first["label"] == other["label"]
                else f"labels differ: {first['label']!r} vs {other['label']!r}"
            )
            finding(
                "near_duplicate",
                "train",
                first["path"],
                other["path"],
                f"perceptual hashes {distance}/64 bits apart: {first['where']} and "
                f"{other['where']} ({labels})",
            )
        candidates = [r for r in others if r["phash"] is not None and r["sha1"] not in groups]
        if candidates:
            test_signs = _hash_signs([r["phash"] for r in candidates])
            for start, block in _distances(test_signs, signs):
                nearest = block.argmin(axis=1)
                for k, j in enumerate(nearest):
                    distance = int(block[k, j])
                    if distance > threshold:
                        continue
                    record, match = candidates[start + k], reps[int(j)]
                    finding(
                        "near_duplicate",
                        f"train/{record['split']}",
                        match["path"],
                        record["path"],
                        f"perceptual hashes {distance}/64 bits apart: {match['where']} and "
                        f"{record['where']} (train label {match['label']!r}): a near copy of "
                        "a test image is in the training set",
                    )

    # classes
    counts = dict(zip(competition.classes, competition.class_counts, strict=True))
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    ratio = counts[largest] / max(1, counts[smallest])
    if ratio > IMBALANCE_WARNING:
        finding(
            "imbalance",
            "train",
            None,
            None,
            f"largest class {largest!r} has {counts[largest]} images, smallest {smallest!r} "
            f"{counts[smallest]}: ratio {ratio:.1f} > {IMBALANCE_WARNING:g}; consider a "
            "class-balanced or logit-adjusted loss, or a balanced sampler",
        )

    # modes outside RGB/L, one finding per split and mode
    for split in dict.fromkeys(r["split"] for r in records):
        by_mode: dict[str, list[dict]] = {}
        for record in records:
            if record["split"] == split and record["mode"] is not None:
                by_mode.setdefault(record["mode"], []).append(record)
        for mode, members in sorted(by_mode.items()):
            if mode in PLAIN_MODES:
                continue
            examples = ", ".join(rel(r["path"]) for r in members[:3])
            finding(
                "odd_mode",
                split,
                members[0]["path"],
                None,
                f"{len(members)} image(s) in mode {mode} ({_MODE_NOTES.get(mode, 'unusual')}), "
                f"e.g. {examples}: decoding converts them to RGB (alpha over white, palettes "
                "expanded, 16-bit rescaled); check that suits the data",
            )

    table = pd.DataFrame(findings, columns=COLUMNS)
    if not table.empty:
        order = {kind: i for i, kind in enumerate(KINDS)}
        table = table.sort_values(
            ["severity", "kind", "split", "file", "other_file"],
            key=lambda c: c.map(order) if c.name == "kind" else c,
            kind="stable",
        ).reset_index(drop=True)

    unique = [infos[p] for p in paths]
    decoded = [i for i in unique if i.get("width") is not None]
    summary = {
        "competition": competition.name,
        "root": str(root),
        "images": {
            split: sum(r["split"] == split for r in records)
            for split in dict.fromkeys(r["split"] for r in records)
        },
        "classes": {c: int(n) for c, n in counts.items()},
        "imbalance_ratio": float(ratio),
        "sizes": _size_summary(decoded),
        "modes": dict(Counter(i["mode"] for i in decoded).most_common()),
        "formats": dict(Counter(i["format"] for i in decoded).most_common()),
        "kinds": {k: int(n) for k, n in table["kind"].value_counts(sort=False).items()},
        "errors": int((table["severity"] == "error").sum()),
        "warnings": int((table["severity"] == "warning").sum()),
        "near_duplicate_bits": int(threshold),
    }
    result = Audit(table, summary)
    log(
        f"audit of {competition.name}: {result.errors} error(s), {result.warnings} warning(s) "
        f"in {len(paths)} images"
    )
    return result


def _size_summary(infos: list[dict], top: int = 10) -> dict:
    if not infos:
        return {"distinct": 0, "most_common": {}, "width": {}, "height": {}}
    sizes = Counter((i["width"], i["height"]) for i in infos)
    widths = np.array([i["width"] for i in infos])
    heights = np.array([i["height"] for i in infos])

    def stats(values: np.ndarray) -> dict:
        return {
            "min": int(values.min()),
            "median": float(np.median(values)),
            "max": int(values.max()),
        }

    return {
        "distinct": len(sizes),
        "most_common": {f"{w}x{h}": n for (w, h), n in sizes.most_common(top)},
        "width": stats(widths),
        "height": stats(heights),
    }
