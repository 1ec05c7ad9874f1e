"""Inference forwards on a faster runtime, proven equal to eager PyTorch (``inference.runtime``).

:func:`inference_forward` turns a model in eval mode and the method to run (``forward`` for
logits, ``embed`` for baseline features) into a callable batch -> tensor:

* ``eager``: the model as it is.
* ``onnxruntime``: the method exported once per input shape (C, H, W) with a dynamic batch axis by
  ``torch.onnx.export(dynamo=True)`` (https://pytorch.org/docs/stable/onnx_export.html; needs the
  ``onnx`` and ``onnxscript`` packages) and run by an ONNX Runtime CPU ``InferenceSession`` with
  torch's thread count (https://onnxruntime.ai/docs/performance/tune-performance/threading.html).
  Graphs are cached in ``<cache>/onnx/`` under the SHA-1 of the architecture, every parameter and
  buffer, the method, the shape and the exporter's versions: other weights never reuse a file.
  Spatial sizes are not exported as dynamic axes: ``torch.export`` specialises (or stalls on)
  TensorFlow-style "same" padding, so each multi-scale TTA size gets its own graph.
* ``compile``: ``torch.compile`` (https://pytorch.org/docs/stable/generated/torch.compile.html).
* ``auto``: on the CPU, ONNX Runtime when the ``onnx`` extra is installed and the call predicts at
  least :data:`AUTO_MIN_IMAGES` images (the one-off export, about 15 s for EfficientNet-Lite0 on
  2 cores, pays for itself), else eager with channels_last weights and inputs (oneDNN's faster
  layout for convolutions); eager on CUDA and MPS.

A runtime other than eager applies to fp32 inference only: with autocast on (:func:`amp_dtype`
not None) the forward is eager. Every other forward is checked on the first batch of each input
shape against eager: it is used only if ``max |fast - eager| <= RTOL * max(1, max |eager|)``;
otherwise, or when the runtime is missing or fails, the forward is eager, with one log line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from competition.config import REPO_ROOT, Config
from competition.device import amp_dtype
from competition.io import atomic_path

#: Tolerance of the equality check, relative to the output's scale: max(1, max |eager output|).
RTOL = 1e-4
#: The most the exported graphs may take on disk; the least recently used go first.
CACHE_LIMIT_BYTES = 1 << 30
#: ``auto`` exports to ONNX only for a call of at least this many images (views included).
AUTO_MIN_IMAGES = 1000
#: Packages the ``onnxruntime`` runtime needs (the ``onnx`` extra): runtime, exporter, its IR.
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
RUNTIMES = ("auto", "eager", "compile", "onnxruntime")

_SAID: set = set()  # messages already logged in this process (one line per cause, not per fold)


def onnx_dir(config: Config) -> Path:
    """``<data.cache_dir>/../onnx`` (``.cache/onnx`` by default): exported graphs."""
    return (REPO_ROOT / config.data.cache_dir).parent / "onnx"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _say(log: Callable, key, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        log(message)


def missing_onnx_packages() -> list[str]:
    """The packages of the ``onnx`` extra that cannot be imported here."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def choose(
    runtime: str, device: torch.device, amp: bool | str = False, images: int | None = None
) -> tuple[str, str | None]:
    """(kind, why not the runtime asked): kind is eager, channels_last, compile or onnxruntime."""
    if runtime not in RUNTIMES:
        raise ValueError(f"inference.runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "eager":
        return "eager", None
    dtype = amp_dtype(device, amp)
    if dtype is not None:
        why = f"amp={amp} runs autocast ({dtype}); runtimes apply to fp32 inference (amp=false)"
        return "eager", None if runtime == "auto" else why
    if runtime == "compile":
        return "compile", None
    if device.type != "cpu":
        why = f"ONNX Runtime is used on the CPU only, not {device.type}"
        return "eager", None if runtime == "auto" else why
    missing = missing_onnx_packages()
    if runtime == "onnxruntime":
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            return "eager", f"{', '.join(missing)} {verb} not installed (pip install '.[onnx]')"
        return "onnxruntime", None
    if not missing and (images is None or images >= AUTO_MIN_IMAGES):
        return "onnxruntime", None
    return "channels_last", None


class _Method(torch.nn.Module):
    """``model.<method>`` as a module's forward, for export and compile."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "forward":
            return self.model(x)
        return getattr(self.model, self.method)(x)


def _versions() -> str:
    from importlib import metadata

    names = ("torch", "onnx", "onnxscript")
    return ",".join(f"{n}={metadata.version(n)}" for n in names)


def graph_key(model: torch.nn.Module, method: str, shape: tuple[int, ...]) -> str:
    """SHA-1 of what an exported graph depends on: architecture, weights, method, shape."""
    digest = hashlib.sha1()
    kind = type(model)
    head = f"{kind.__module__}.{kind.__qualname__}|{model!r}|{method}|{shape}|{_versions()}"
    digest.update(head.encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def prune_graphs(cache_dir: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Delete the least recently used graphs until ``cache_dir`` holds at most ``limit`` bytes
    (:data:`CACHE_LIMIT_BYTES`); every fold and input size has its own graph (~14 MB for Lite0), so
    the cache would otherwise grow with every run. Returns the deleted files."""
    limit = CACHE_LIMIT_BYTES if limit is None else limit
    graphs = sorted(Path(cache_dir).glob("*.onnx"), key=lambda g: g.stat().st_mtime)
    total = sum(g.stat().st_size for g in graphs)
    deleted = []
    for graph in graphs:
        if total <= limit:
            break
        if graph != keep:
            total -= graph.stat().st_size
            graph.unlink(missing_ok=True)
            deleted.append(graph)
    return deleted


def export_onnx(model: torch.nn.Module, method: str, shape: tuple[int, ...], path: Path) -> None:
    """Export ``model.<method>`` for inputs (batch, *shape), batch dynamic, atomically."""
    example = torch.rand(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    chatter = io.StringIO()  # the exporter prints its progress; keep the log to our one line
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(chatter),
        atomic_path(path) as tmp,
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Method(model, method).eval(),
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["output"],
            external_data=False,
        )


class Forward:
    """``model.<method>`` on the chosen runtime; falls back to eager for good on any failure."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        kind: str,
        runtime: str,
        cache_dir: Path | None = None,
        log: Callable = _stderr,
    ):
        self.model, self.method, self.kind, self.runtime = model, method, kind, runtime
        self.cache_dir = Path(cache_dir) if cache_dir else REPO_ROOT / ".cache" / "onnx"
        self.log = log
        self.eager = model if method == "forward" else getattr(model, method)
        self.fast: dict[tuple, Callable] = {}  # input shape (C, H, W) -> proven forward
        self.max_diff: dict[tuple, float] = {}
        self._compiled = None
        self._channels_last = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "eager":
            return self.eager(x)
        shape = tuple(x.shape[1:])
        fast = self.fast.get(shape)
        if fast is None:
            return self._prove(shape, x)
        return fast(x)

    def _fail(self, why: str) -> None:
        self.kind = "eager"
        _say(
            self.log,
            ("fail", self.runtime, why),
            f"inference.runtime={self.runtime}: {why}; using eager PyTorch",
        )

    def _prove(self, shape: tuple, x: torch.Tensor) -> torch.Tensor:
        """Build the runtime for ``shape``, check it on ``x`` against eager; eager's output."""
        expected = self.eager(x)
        try:
            fast = self._build(shape)
            got = fast(x)
        except Exception as exc:  # any exporter, compiler or session error: eager, said once
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            self._fail(f"{self.kind} failed on {self.method} ({type(exc).__name__}: {lines[0]})")
            return expected
        reference = expected.float()
        diff = (got.float().to(reference.device) - reference).abs().max().item()
        scale = max(1.0, reference.abs().max().item())
        if got.shape != expected.shape or not diff <= RTOL * scale:
            self._fail(
                f"{self.kind} differs from eager on {self.method} at {shape} (max |diff| "
                f"{diff:.3g} > {RTOL:g} x {scale:.3g})"
            )
            return expected
        self.fast[shape], self.max_diff[shape] = fast, diff
        _say(
            self.log,
            ("ok", self.runtime, self.kind, self.method),
            f"inference.runtime={self.runtime}: {self.method} on {self.kind} (equal to eager: max "
            f"|diff| {diff:.2g} <= {RTOL:g} x {scale:.3g})",
        )
        return expected

    def _build(self, shape: tuple) -> Callable:
        if self.kind == "onnxruntime":
            return self._session(shape)
        if self.kind == "compile":
            if self._compiled is None:
                self._compiled = torch.compile(_Method(self.model, self.method))
            return self._compiled
        if self._channels_last is None:  # a copy: the caller's model keeps its layout
            model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            self._channels_last = _Method(model, self.method)
        model = self._channels_last
        return lambda x: model(
            x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        )

    def _session(self, shape: tuple) -> Callable:
        import onnxruntime as ort

        key = graph_key(self.model, self.method, shape)
        name = "x".join(str(s) for s in shape)
        path = self.cache_dir / f"{type(self.model).__name__}-{self.method}-{name}-{key}.onnx"
        if path.is_file():
            os.utime(path)  # recently used: kept by prune_graphs
        else:
            export_onnx(self.model, self.method, shape, path)
            prune_graphs(self.cache_dir, keep=path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: torch works between them (decode, views, softmax) and
        # spinning ORT threads would take its cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            array = x.detach().to("cpu", torch.float32).contiguous().numpy()
            return torch.from_numpy(session.run(None, {input_name: array})[0])

        return run


class _Forwards(dict):
    """A model's built forwards, kept on the model (and freed with it); a copy starts empty."""

    def __deepcopy__(self, memo):  # sessions and compiled code cannot be copied or pickled
        return _Forwards()

    def __reduce__(self):
        return (_Forwards, ())


def _weights_state(model: torch.nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def inference_forward(
    model: torch.nn.Module,
    method: str = "forward",
    device: torch.device | str = "cpu",
    runtime: str = "eager",
    amp: bool | str = False,
    cache_dir: Path | None = None,
    images: int | None = None,
    log: Callable = _stderr,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable batch -> ``model.<method>(batch)`` on the runtime ``inference.runtime`` names.

    Built once per model, method and runtime, then reused (graphs, sessions and compiled code
    stay warm) until the model's weights change. ``images``: how many images the call predicts
    (``auto`` exports only for many); ``cache_dir``: where exported graphs go (:func:`onnx_dir`).
    """
    device = torch.device(device)
    kind, why = choose(runtime, device, amp, images)
    if why:
        _say(
            log,
            ("choose", runtime, why),
            f"inference.runtime={runtime}: {why}; using eager PyTorch",
        )
    key = (method, kind, runtime, str(device), str(cache_dir))
    cached = model.__dict__.setdefault("_inference_forwards", _Forwards())
    state = _weights_state(model)
    entry = cached.get(key)
    if entry is None or entry[0] != state:
        entry = cached[key] = (state, Forward(model, method, kind, runtime, cache_dir, log))
    return entry[1]


__all__ = [
    "AUTO_MIN_IMAGES",
    "CACHE_LIMIT_BYTES",
    "ONNX_PACKAGES",
    "RTOL",
    "RUNTIMES",
    "Forward",
    "choose",
    "export_onnx",
    "graph_key",
    "inference_forward",
    "missing_onnx_packages",
    "onnx_dir",
    "prune_graphs",
]
