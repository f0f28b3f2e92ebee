"""The public Python API, which ``import kvc`` exposes lazily (docs/api.md).

Each function validates its arguments as the matching ``kvc`` command validates its options (the
commands call these functions) and returns a result object whose ``to_json()`` is what the command
writes with ``--json``. Bad input raises :class:`kvc.errors.KvcError` with the command's message.

``progress``, where taken, is called as ``progress(done, total, what)``: items done of ``total``
(windows, layers, runs or evaluation steps) and a short description of the current step.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .analysis.report import Options as AnalysisOptions
from .analysis.report import Report, analyze_capture, select_tensors
from .ci import budget as budgets
from .compression import engine
from .compression import sweep as sweeps
from .compression.options import compute_dtype, configured
from .compression.options import method as configure
from .compression.protocol import Compressor
from .errors import KvcError
from .gpu import require_device
from .io.capture import CaptureFile
from .io.safetensors import save_safetensors
from .io.atomic import check_outputs, write_json
from .metrics.pareto import METRICS, VIEWS, view_points
from .metrics.seeds import combine, seed_list
from .model import capture as recorder
from .model.load import (DTYPES, check_positions, input_device, model_revision, open_model, resolve_device, text_config,
                         weights_description)
from .model.synth import SpikedSpec, synthesize
from .model.text import framing, load_corpus, token_windows
from .planning import allocate as allocation
from .planning import compressor as planning
from .planning import planfile
from .selection import parse_layers
from .threads import cpu_threads

Progress = Callable[[int, int, str], None]
PathLike = str | os.PathLike


def _quiet(done: int, total: int, what: str) -> None:
    """The default ``progress``: says nothing."""


class _Ticker:
    """Counts finished items and reports them to ``progress``."""

    def __init__(self, progress: Progress | None, total: int, what: str):
        self.progress, self.total, self.what, self.done = progress or _quiet, total, what, 0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self.progress(self.done, self.total, self.what)

    def say(self, what: str) -> None:
        self.progress(self.done, self.total, what)


def _spec(value: str | Sequence[int] | None) -> str | None:
    """A layer or position selection as the command line spells it: 'all', '0,2,5-9', 'last:N'."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(int(v)) for v in value)


def _names(value: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b']."""
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


# ----------------------------------------------------------------------------- captures


class Capture(CaptureFile):
    """A capture file (docs/format.md), open for reading; tensors load lazily, one at a time.

    Returned by :func:`capture`, :func:`load`, :func:`synth` and :func:`decompress`; every function
    that takes a capture also takes its path.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    meta : kvc.io.capture.CaptureMeta
        Its metadata: ``model``, ``model_revision``, ``num_layers``, ``num_heads``, ``num_kv_heads``,
        ``head_dim``, ``rope`` (None without RoPE), ``seq_len``, ``num_seqs``, ``text_source``, ...
    layers : list of int
        The layers the file holds.
    summary : kvc.model.capture.CaptureSummary or None
        For a capture just made by :func:`capture`: bytes written, seconds, peak RSS, framing and
        attention of the run; None otherwise.

    Methods
    -------
    tensor(layer, name, dtype=None, device=None)
        One tensor: ``k``, ``k_pre`` (keys before RoPE), ``v`` [S, H_kv, T, D]; ``q``, ``q_pre``
        [S, H_q, Tq, D]. A missing one raises KvcError naming what the layer holds.
    has(layer, name)
        Whether the file holds that tensor.
    """

    def __init__(self, path: PathLike, summary: recorder.CaptureSummary | None = None):
        super().__init__(path)
        self.summary = summary

    @property
    def decompressed_from(self) -> dict | None:
        """For a file written by :func:`decompress`: the compressed file, method and parameters."""
        raw = self.meta.extra.get("decompressed_from")
        return None if raw is None else json.loads(raw)

    def __repr__(self) -> str:
        return (f"Capture({str(self.path)!r}: {self.meta.model}, {len(self.layers)} layers, "
                f"{self.meta.num_seqs} x {self.meta.seq_len} tokens)")


def _open(capture: CaptureFile | PathLike) -> CaptureFile:
    if isinstance(capture, CaptureFile):
        return capture
    if not isinstance(capture, (str, os.PathLike)):
        raise KvcError(f"capture: expected a Capture or the path of a capture file, got {type(capture).__name__}")
    return Capture(capture)


def load(path: PathLike) -> Capture:
    """Open a capture file (``kvc capture``, ``kvc synth``, ``kvc decompress``).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its format and metadata are checked before anything is read.

    Returns
    -------
    Capture
    """
    return Capture(path)


def load_model(model: PathLike | None = None, *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", trust_remote_code: bool = False, device_map: str | None = None,
               max_memory: str | None = None) -> tuple[Any, Any]:
    """A model and its tokenizer as kvc loads them (``kvc capture --model``): to pass to
    :func:`capture` and :func:`evaluate` (``tokenizer=``) several times without loading it again, or
    to generate inside :func:`kvc.compressing`.

    Parameters
    ----------
    model : str, os.PathLike or None
        A hub id, a local transformers directory or a GGUF file (dequantized to float32 unless
        ``dtype`` says otherwise); None: the default model, SmolLM2-135M-Instruct.
    revision, dtype, device, trust_remote_code, device_map, max_memory
        As for :func:`capture`.

    Returns
    -------
    (model, tokenizer)
        The transformers model in eval mode on ``device`` (a causal LM with its LM head, an encoder
        as its bare model) and its tokenizer.
    """
    cpu_threads()
    if not (model is None or isinstance(model, (str, os.PathLike))):
        raise KvcError(f"model: expected a hub id, a directory or a GGUF file, got {type(model).__name__}")
    _, lm, tok = open_model(model, revision=revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory)
    return lm, tok


def capture(model: Any = None, text: PathLike | None = None, *, out: PathLike, seq_len: int = 512,
            num_seqs: int = 4, layers: str | Sequence[int] = "all", query_positions: str | Sequence[int] = "all",
            batch_size: int = 1, tokenizer: Any = None, revision: str | None = None, dtype: str = "auto",
            device: str = "auto", trust_remote_code: bool = False, device_map: str | None = None,
            max_memory: str | None = None, special_tokens: bool = True, force: bool = False,
            progress: Progress | None = None) -> Capture:
    """Run text through a model and write its keys, values and queries per layer (``kvc capture``).

    Parameters
    ----------
    model : str, os.PathLike, transformers model or None
        A hub id, a local transformers directory or a GGUF file (None: the default model,
        SmolLM2-135M-Instruct); or a loaded transformers model, used as it is, with ``tokenizer``.
    text : str or os.PathLike, optional
        A UTF-8 text file (default: the English documentation shipped with CPython).
    out : str or os.PathLike
        The capture file to write (an existing one only with ``force``).
    seq_len, num_seqs : int
        Tokens per window and number of windows (consecutive runs of the text).
    layers : str or sequence of int
        'all' or a selection like '0,2,5-9'.
    query_positions : str or sequence of int
        'all', 'last:N' or a list of positions whose queries are stored.
    batch_size : int
        Windows per forward pass.
    tokenizer : transformers tokenizer, optional
        The tokenizer of a loaded ``model`` (a model named by id or path brings its own).
    revision, dtype, device, trust_remote_code
        As the command's options: hub revision; auto|float32|bfloat16|float16; auto|cpu|cuda|cuda:N.
    device_map, max_memory : str, optional
        ``device_map="auto"``: a model larger than the device or RAM, its layers placed by accelerate
        over the GPUs, the CPU and disk within ``max_memory`` ('0=20GB,cpu=60GB'); ``device`` is then
        not used.
    special_tokens : bool
        Frame each window like a fresh input of the model (its BOS, or [CLS] ... [SEP]).
    force : bool
        Overwrite ``out``.
    progress : callable, optional
        ``progress(done, total, what)`` over the windows.

    Returns
    -------
    Capture
        The written file, with ``summary`` set.
    """
    cpu_threads()
    if batch_size < 1:
        raise KvcError("--batch-size must be >= 1")
    out = Path(out)
    check_outputs([out], force, inputs=[text, model if isinstance(model, (str, os.PathLike)) else None])
    tick = _Ticker(progress, num_seqs, "capturing")
    corpus = load_corpus(None if text is None else str(text))
    source, lm, tok = open_model(model, tokenizer=tokenizer, revision=revision, dtype=dtype, device=device,
                                 trust_remote_code=trust_remote_code, device_map=device_map,
                                 max_memory=max_memory, status=tick.say,
                                 check=lambda config: check_positions(config, seq_len, "--seq-len"))
    frame = framing(tok, special_tokens)
    input_ids = token_windows(tok, corpus, seq_len, num_seqs, frame)
    selected = parse_layers(_spec(layers), text_config(lm.config).num_hidden_layers)
    positions = recorder.parse_query_positions(_spec(query_positions), seq_len)
    meta = {"model": source.name, "model_revision": model_revision(source, revision),
            "text_source": corpus.source, "text_sha256": corpus.sha256,
            "special_tokens": frame.to_meta(), "weights": weights_description(source, lm)}
    tick.say("capturing")
    summary = recorder.capture(lm, input_ids, out, meta=meta, layers=selected, q_positions=positions,
                               batch_size=batch_size, force=force, progress=tick)
    return Capture(out, summary)


def synth(out: PathLike, *, layers: int = 2, kv_heads: int = 2, heads: int = 4, head_dim: int = 64,
          seq_len: int = 256, num_seqs: int = 1, strengths: Sequence[float] = (6.0, 4.0, 3.0),
          sigma: float = 1.0, noise: str = "white", outlier_channels: Sequence[int] = (),
          outlier_scale: float = 8.0, rope: bool = True, dtype: str = "float32", seed: int = 0,
          force: bool = False) -> Capture:
    """Write a synthetic capture from the spiked random-matrix model (``kvc synth``): a known answer.

    Keys before RoPE and values of every (layer, sequence, KV head) are ``sigma * sqrt(max(n, d)) *
    sum_i strengths[i] u_i v_i^T`` plus white or colored noise; ``outlier_channels`` are scaled by
    ``outlier_scale``; with ``rope``, keys and queries are rotated and ``k_pre``/``q_pre`` stored.
    The ground truth is in ``meta.extra["truth"]``.

    Returns
    -------
    Capture
    """
    cpu_threads()
    if dtype not in DTYPES:
        raise KvcError(f"--dtype must be one of {', '.join(DTYPES)}")
    out = Path(out)
    check_outputs([out], force)
    spec = SpikedSpec(num_layers=layers, num_kv_heads=kv_heads, num_heads=heads, head_dim=head_dim,
                      seq_len=seq_len, num_seqs=num_seqs, strengths=[float(s) for s in strengths],
                      sigma=sigma, noise=noise, outlier_channels=[int(c) for c in outlier_channels],
                      outlier_scale=outlier_scale, rope=rope, seed=seed)
    tensors, meta = synthesize(spec, DTYPES[dtype])
    save_safetensors(out, tensors, meta.to_strings(), force=force)
    return Capture(out)


# ----------------------------------------------------------------------------- analysis


@dataclass(repr=False)
class Analysis(Report):
    """Spectra, ranks, shrinkage and outlier channels of every (layer, KV head, tensor): the result
    of :func:`analyze` (docs/analyze.md).

    Attributes
    ----------
    heads : list of dict
        One record per (layer, KV head, tensor[, sequence or block]): ``rank``, ``bulk_edge``,
        ``sigma``, ``energy_lowrank``, ``predicted_bit_saving``, ``outlier_channels``, ``bands``, ...
    rope : list of dict
        Keys before against after RoPE, per head (when the capture has both).
    summary : dict
        Per-layer medians, the MLA-style latent ranks of the joint K/V (``latent``), the heads with
        the least to gain, the reading, run information.
    spectra : dict
        (layer, tensor) -> singular values [groups, heads, min(n, d)] (torch.Tensor).
    capture : CaptureFile
        The capture analyzed.
    tensors : list of str
        The tensors analyzed (of k_pre, k, v).

    Methods
    -------
    to_json()
        ``{"heads", "rope", "summary"}``: what ``kvc analyze --json`` writes.
    plot(directory, force=False)
        Write the PNG figures (scree, rank heatmap, channel magnitudes); returns their paths.
    """

    capture: CaptureFile
    tensors: list[str]

    def plot(self, directory: PathLike, force: bool = False) -> list[Path]:
        from .analysis import plots  # matplotlib only when asked for

        paths = [Path(directory) / name for name in plots.PLOT_FILES]
        check_outputs(paths, force)
        plots.write_all(self, self.capture, self.tensors, paths, force)
        return paths

    def __repr__(self) -> str:
        return f"Analysis({len(self.heads)} records of {', '.join(self.tensors)} in {self.capture.path})"


def analyze(capture: CaptureFile | PathLike, *, layers: str | Sequence[int] = "all",
            tensors: str | Sequence[str] | None = None, block: int | None = None, per_seq: bool = False,
            rank_rule: str = "eoptshrinkq", outlier_factor: float = 6.0, outlier_topk: int | None = None,
            device: str = "auto", progress: Progress | None = None) -> Analysis:
    """Random-matrix analysis of a capture's keys and values, per head (``kvc analyze``).

    Parameters
    ----------
    capture : Capture or path
    layers : str or sequence of int
        'all' (every layer the file holds) or a selection like '0,2,5-9'.
    tensors : str or sequence of str, optional
        Of k_pre, k, v (default: those in the file).
    block : int, optional
        Analyze blocks of this many consecutive tokens of each sequence (eOptShrinkQ uses 128).
    per_seq : bool
        One matrix per sequence instead of pooling the sequences.
    rank_rule : {'eoptshrinkq', 'matlab'}
    outlier_factor : float
        Outlier channel: RMS above this many times the median channel RMS.
    outlier_topk : int, optional
        Flag the K channels of largest RMS instead.
    device : str
        auto|cpu|cuda|cuda:N.
    progress : callable, optional
        ``progress(done, total, what)`` over the layers.

    Returns
    -------
    Analysis
    """
    cpu_threads()
    options = AnalysisOptions(rank_rule=rank_rule, outlier_factor=outlier_factor, outlier_topk=outlier_topk,
                              per_seq=per_seq, block=block)
    torch_device = resolve_device(device)
    cap = _open(capture)
    chosen_layers = cap.select_layers(_spec(layers))
    chosen = select_tensors(cap, chosen_layers, tensors)
    report = analyze_capture(cap, chosen_layers, chosen, options, torch_device,
                             progress=_Ticker(progress, len(chosen_layers), "analyzing"))
    return Analysis(report.heads, report.rope, report.summary, report.spectra, cap, chosen)


# ----------------------------------------------------------------------------- compression


def method(name: str, **options: Any) -> Compressor:
    """A configured compressor, e.g. ``kvc.method("turboquant", bits=2.5)``, for :func:`compress`,
    :func:`evaluate` or direct use (``encode(layer)``/``decode(encoded, layer)``).

    Options are checked as ``kvc compress --name value`` checks them (names, types, declared
    constraints; those on the head dimension on the first layer); a string is converted as on the
    command line. ``compressor.params()`` gives every option's value.
    """
    return configure(name, **options)


class _Result:
    """A result over the JSON its command writes with ``--json``; fields read from it."""

    def __init__(self, report: dict):
        self._json = report

    def to_json(self) -> dict:
        return copy.deepcopy(self._json)


def _field(key: str, optional: bool = False) -> property:
    """A read-only attribute of a :class:`_Result`: its JSON's ``key`` (None when ``optional`` and absent)."""
    return property(lambda self: self._json.get(key) if optional else self._json[key])


class Compression(_Result):
    """One method over a capture: fully counted bits per entry and fidelity per layer and head; the
    result of :func:`compress` (docs/compress.md).

    Attributes
    ----------
    method : str
    params : dict
        Every option's value.
    bits_per_entry : float
        Stored bits (every array counted) per K and V entry.
    bits_per_entry_paper : float or None
        The method paper's own count, where it differs.
    heads : list of dict
        One row per (layer, KV head, tensor of k, v, kv): ``bits_per_entry``, ``mse_rel``,
        ``ip_bias_rel``, ``ip_slope``, ``attn_kl``, ``attn_out_rel``, ...
    summary : dict
        tensor (k, v, kv) -> the metrics averaged over heads, and its bits per entry (with several
        seeds: their mean over the seeds).
    seeds : dict or None
        With ``seeds > 1``: ``{"seeds", "level", "summary": {tensor: {metric: {"mean", "half_width",
        "ci_low", "ci_high", "n"}}}}``, the 95 % Student-t intervals over the seeds.
    entries : int
        K and V entries compressed.
    array_bytes : int
        Bytes of the stored arrays (0 with ``keep=False``).
    run : kvc.compression.engine.RunResult
        Per-layer results and the encoded arrays.

    Methods
    -------
    to_json()
        What ``kvc compress --json`` writes.
    save(path, force=False)
        Write the compressed file (``kvc compress --out``), which :func:`decompress` reads.
    """

    def __init__(self, run: engine.RunResult, capture: CaptureFile, report: dict | None = None):
        super().__init__(run.to_json() if report is None else report)
        self.run, self.capture = run, capture

    method = _field("method")
    params = _field("params")
    bits_per_entry = _field("bits_per_entry")
    bits_per_entry_paper = _field("bits_per_entry_paper")
    heads = _field("heads")
    summary = _field("summary")
    seeds = _field("seeds", optional=True)

    @property
    def entries(self) -> int:
        return 2 * sum(r.entries * len(r.bits["k"]) for r in self.run.layers)

    @property
    def array_bytes(self) -> int:
        return sum(e.nbits() for e in self.run.encoded.values()) // 8

    def save(self, path: PathLike, force: bool = False) -> Path:
        if self.method == "plan":
            raise KvcError("a plan's compression cannot be written to a compressed file yet (kvc decompress "
                           "reads single methods); measure it without --out")
        if not self.run.encoded:
            raise KvcError("this compression kept no encoded arrays (compress(..., keep=False))")
        engine.write_compressed(path, self.run, self.capture, force=force)
        return Path(path)

    def __repr__(self) -> str:
        return f"Compression({self.method}: {self.bits_per_entry:.4f} bits per entry, {self.capture.path})"


def compress(capture: CaptureFile | PathLike, method: str | Compressor | None = None, *,
             plan: PathLike | None = None, layers: str | Sequence[int] = "all",
             device: str = "auto", dtype: str = "float32", query_stride: int = 1, keep: bool = True,
             seeds: int = 1, progress: Progress | None = None, **options: Any) -> Compression:
    """Compress a capture with one method and measure it (``kvc compress``).

    Parameters
    ----------
    capture : Capture or path
    method : str or Compressor
        A method name (:func:`methods`), ``"EVICTOR+COMPRESSOR"``, or :func:`method`'s result
        (:func:`load_plan`'s too).
    plan : path, optional
        A plan file (:func:`plan`, docs/plan.md) instead of a method: each (layer, K or V, KV head)
        with its own method; its model shape must be the capture's.
    layers : str or sequence of int
        'all' or a selection like '0,2,5-9' of the layers the file holds.
    device : str
        auto|cpu|cuda|cuda:N.
    dtype : {'float32', 'float64'}
        Compute dtype.
    query_stride : int
        Measure with every N-th captured query (the method sees all).
    keep : bool
        Keep the encoded arrays, for :meth:`Compression.save`.
    seeds : int
        Run the method with this many seeds (its ``seed``, ``seed + 1``, ...): ``summary`` holds the
        means and ``seeds`` the 95 % Student-t intervals; the arrays and ``heads`` are the first seed's.
    progress : callable, optional
        ``progress(done, total, what)`` over the layers (of every seed).
    **options
        The method's options, e.g. ``bits=2``, ``group_size=32``, ``seed=0``.

    Returns
    -------
    Compression
    """
    cpu_threads()
    compressor = _method_or_plan(method, plan, options)
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    cap = _open(capture)
    selected = cap.select_layers(_spec(layers))
    if isinstance(compressor, planning.PlanCompressor):
        meta = cap.meta
        compressor.plan.check_geometry(meta.num_kv_heads, meta.head_dim, f"capture {cap.path}", meta.num_layers)
    torch_device, torch_dtype = require_device(device), compute_dtype(dtype)
    seed_values = seed_list(compressor.options.seed, seeds)
    tick = _Ticker(progress, len(selected) * len(seed_values), compressor.name)
    runs = []
    for s in seed_values:
        torch.manual_seed(s)
        runs.append(engine.run(compressor.reseeded(s), cap, selected, torch_device, torch_dtype, keep_encoded=keep and not runs,
                               query_stride=query_stride, progress=lambda _: tick()))
    report = combine([r.to_json() for r in runs], seed_values) if len(runs) > 1 else None
    return Compression(runs[0], cap, report)


def decompress(path: PathLike, out: PathLike | None = None, *, queries: CaptureFile | PathLike | None = None,
               device: str = "auto", force: bool = False, progress: Progress | None = None) -> Capture:
    """Decode a compressed file (:meth:`Compression.save`, ``kvc compress --out``) into a capture
    file (``kvc decompress``): K, V and K before RoPE, as the method reconstructs them.

    Parameters
    ----------
    path : str or os.PathLike
        The compressed file.
    out : str or os.PathLike, optional
        The capture file to write (default: a temporary file, removed with the returned object).
    queries : Capture or path, optional
        The source capture, whose queries are copied so the result can be measured again.
    device : str
    force : bool
        Overwrite ``out``.
    progress : callable, optional
        ``progress(done, total, what)`` over the layers.

    Returns
    -------
    Capture
    """
    cpu_threads()
    torch_device = resolve_device(device)
    temporary = out is None
    if temporary:
        fd, name = tempfile.mkstemp(prefix="kvc-decompressed-", suffix=".safetensors")
        os.close(fd)
        out, force = Path(name), True
    out = Path(out)
    check_outputs([out], force, inputs=[path, queries if isinstance(queries, (str, os.PathLike)) else None])
    tick = _Ticker(progress, len(engine.CompressedFile(path).layers), "decoding")
    source_q = None if queries is None else _open(queries).path
    engine.decompress(path, out, torch_device, queries=source_q, force=force, progress=lambda _: tick())
    result = Capture(out)
    if temporary:
        weakref.finalize(result, out.unlink, missing_ok=True)
    return result


class Sweep(_Result):
    """Methods x bit widths x key placement on one capture: the result of :func:`sweep`
    (docs/results.md).

    Attributes
    ----------
    runs : list of dict
        One per (method, bits, keys) run: ``method``, ``bits``, ``keys``, ``params``, ``view``
        (k_pre or k), ``values``, ``result`` (as :meth:`Compression.to_json`), ``e2e`` (with e2e).
    skipped, failures : list of dict
        Runs not made (impossible parameters) and loud method failures, each with its ``reason``.
    savings : dict
        "METHOD_vs_REFERENCE" -> view -> per point, the reference's bits at equal mse and the saving.
    pareto : dict
        view -> metric -> method -> Pareto front [(bits per entry, error, bits asked)].
    e2e_rank_correlation : dict or None
        Spearman correlation of each tensor proxy with the perplexity delta (with e2e).
    metrics : dict
        metric -> its axis label, for every metric plotted (``pareto_{metric}.png``).

    Methods
    -------
    to_json()
        What ``kvc sweep`` writes to sweep.json.
    points(view, metric)
        method -> every run's (bits per entry, error, bits asked) in that view, by bits per entry:
        the points the Pareto fronts are taken from (error as plotted: lower is better).
    plot(directory, force=False)
        Write one PNG of Pareto fronts per metric (``pareto_{metric}.png``); returns their paths.
    save(directory, force=False)
        Write sweep.json and the plots (``kvc sweep --out-dir``); returns their paths.
    """

    metrics = {metric: label for metric, (label, _) in METRICS.items()}

    runs = _field("runs")
    skipped = _field("skipped")
    failures = _field("failures")
    savings = _field("savings")
    pareto = _field("pareto")
    e2e_rank_correlation = _field("e2e_rank_correlation")

    def points(self, view: str, metric: str) -> dict[str, list[tuple[float, float, float]]]:
        if view not in VIEWS or metric not in METRICS:
            raise KvcError(f"no view {view!r} or metric {metric!r}: views {', '.join(VIEWS)}; metrics "
                           f"{', '.join(METRICS)}")
        return view_points(self.runs, view, metric)

    def plot(self, directory: PathLike, force: bool = False) -> list[Path]:
        paths = [Path(directory) / f"pareto_{metric}.png" for metric in METRICS]
        check_outputs(paths, force)
        for metric, path in zip(METRICS, paths):
            sweeps.plot(self.runs, metric, self._json["methods"], path, force)
        return paths

    def save(self, directory: PathLike, force: bool = False) -> list[Path]:
        path = Path(directory) / "sweep.json"
        check_outputs([path, *(Path(directory) / f"pareto_{metric}.png" for metric in METRICS)], force)
        paths = self.plot(directory, force)
        write_json(path, self._json, force=force)
        return [path, *paths]

    def __repr__(self) -> str:
        return f"Sweep({len(self.runs)} runs, {len(self.skipped)} skipped, {len(self.failures)} failed)"


def sweep(capture: CaptureFile | PathLike, *,
          methods: str | Sequence[str] = ("eoptshrinkq", "svdq", "turboquant", "kivi", "kvquant"),
          bits: Sequence[float] = (1, 1.5, 2, 2.5, 3, 4), keys: str | Sequence[str] = ("pre", "post"),
          compare: str | Sequence[tuple[str, str]] = (("eoptshrinkq", "turboquant"),),
          options: Mapping[str, Any] | None = None, layers: str | Sequence[int] = "all",
          device: str = "auto", dtype: str = "float32", seed: int = 0, query_stride: int = 1,
          e2e: bool = False, model: str | None = None, seeds: int = 1, progress: Progress | None = None) -> Sweep:
    """Run methods x bit widths x key placement; Pareto fronts and bit savings (``kvc sweep``).

    Parameters
    ----------
    capture : Capture or path
    methods : str or sequence of str
        Methods with a ``bits`` option.
    bits : sequence of float
        The ``bits`` values; a method that cannot take one skips it, saying why.
    keys : str or sequence of {'pre', 'post'}
        Key placements to run, for methods with a ``keys`` option.
    compare : str or sequence of (method, reference)
        Pairs for the equal-mse bit saving ('a:b,c:d' as on the command line).
    options : mapping, optional
        ``{"[method.]key": value}``, passed to the methods that have the option.
    layers, device, dtype, seed, query_stride
        As for :func:`compress`.
    e2e : bool
        Also run each method inside the model (:func:`evaluate`'s perplexity) and rank-correlate the
        proxies with it; ``model``: the model for it (default: the capture's).
    seeds : int
        Run each job with this many seeds (``seed``, ``seed + 1``, ...): each run's summary holds
        the means and ``seeds`` the 95 % Student-t intervals; the savings and Pareto fronts use the
        means, and each saving carries its bounds over the intervals and ``ci_overlap``.
    progress : callable, optional
        ``progress(done, total, what)`` over the runs.

    Returns
    -------
    Sweep
    """
    cpu_threads()
    if isinstance(compare, str):
        compare = [tuple(p.split(":")) for p in _names(compare)]
    cap = _open(capture)
    selected = cap.select_layers(_spec(layers))
    report = sweeps.sweep(cap, selected, _names(methods), bits, _names(keys), compare, options or {},
                          require_device(device), compute_dtype(dtype), seed, query_stride, e2e, model, progress,
                          seeds)
    return Sweep(report)


# ----------------------------------------------------------------------------- inside the model


class Evaluation(_Result):
    """A method's compressed cache inside the model against the uncompressed one: the result of
    :func:`evaluate` (docs/eval.md).

    Attributes
    ----------
    method : str
    params : dict
    bits_per_entry : float
        Stored bits per K and V entry over every compressed prefill.
    perplexity : dict
        ``ppl_base``, ``ppl``, ``delta``, ``delta_rel``, ``kl`` (next-token KL), ``top1_agree``, and
        the same per context length under ``contexts``.
    retrieval : dict or None
        Needle accuracy (``single``: depth x length grids; ``multi``: several needles per context).
    proxies : dict or None
        :meth:`Compression.summary`-style tensor metrics on the perplexity prefills.
    decoding : dict or None
        With ``decode_every``: ``every``, ``recompressions`` and the ``bits_per_entry`` of the
        recompressed caches.

    Methods
    -------
    to_json()
        What ``kvc eval --json`` writes.
    plot(path, force=False)
        Write the depth x length retrieval heatmap (PNG).
    """

    method = _field("method")
    params = _field("params")
    bits_per_entry = _field("bits_per_entry")
    perplexity = _field("perplexity")
    retrieval = _field("retrieval", optional=True)
    proxies = _field("proxies", optional=True)
    decoding = _field("decoding", optional=True)

    def plot(self, path: PathLike, force: bool = False) -> Path:
        from .eval.evaluate import plot_retrieval  # transformers and matplotlib only when asked for

        if self.retrieval is None:
            raise KvcError("this evaluation ran no retrieval test (retrieval=False): nothing to plot")
        path = Path(path)
        check_outputs([path], force)
        plot_retrieval(self._json, path, force)
        return path

    def __repr__(self) -> str:
        p = self.perplexity
        return (f"Evaluation({self.method}: {self.bits_per_entry:.4f} bits per entry, perplexity "
                f"{p['ppl_base']:.4f} -> {p['ppl']:.4f})")


def evaluate(method: str | Compressor | None = None, model: Any = None, text: PathLike | None = None, *,
             plan: PathLike | None = None,
             contexts: str | Sequence[int] = (256, 512, 1024), windows: int = 2, continuation: int = 64,
             depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 1, needles: int = 4,
             retrieval: bool = True, special_tokens: bool = True, decode_every: int | None = None,
             proxies: bool = True, query_stride: int = 1, tokenizer: Any = None,
             revision: str | None = None, dtype: str = "auto", device: str = "auto",
             trust_remote_code: bool = False, device_map: str | None = None, max_memory: str | None = None,
             progress: Progress | None = None, **options: Any) -> Evaluation:
    """Perplexity and needle retrieval with a method's compressed cache, against the uncompressed
    one, in the model (``kvc eval``).

    Parameters
    ----------
    method : str or Compressor
        As for :func:`compress`; ``**options`` are its options.
    plan : path, optional
        A plan file instead of a method (as for :func:`compress`).
    model : str, os.PathLike, transformers model or None
        As for :func:`capture` (a causal LM); ``tokenizer`` with a loaded model.
    text : str or os.PathLike, optional
        As for :func:`capture`.
    contexts : str or sequence of int
        Context lengths in tokens ('256,1k' or [256, 1024]): perplexity contexts and needle haystacks.
    windows, continuation : int
        Perplexity text windows per context, continuation tokens scored per window.
    depths : sequence of float
        Needle depths, fractions of the context.
    trials, needles : int
        Needle prompts per (depth, length) cell; facts in one multi-needle context (0: none).
    retrieval : bool
        Run the needle tests.
    special_tokens : bool
        Start each context like a fresh input of the model (its BOS, if it adds one).
    decode_every : int, optional
        Feed each perplexity continuation in blocks of this many tokens and recompress (re-evict)
        the whole cache with the method after each block (docs/eval.md); None: the prefill only.
    proxies : bool
        Also measure :func:`compress`'s tensor metrics on the perplexity contexts.
    query_stride : int
        The proxies use every N-th query of each context (as for :func:`compress`; the method sees all).
    revision, dtype, device, trust_remote_code, device_map, max_memory
        As for :func:`capture`.
    progress : callable, optional
        ``progress(done, total, what)`` over the evaluation steps.

    Returns
    -------
    Evaluation
    """
    cpu_threads()
    from .eval import evaluate as ev  # transformers only when asked for

    compressor = _method_or_plan(method, plan, options)
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    if isinstance(contexts, str):
        contexts = budgets.parse_contexts(contexts, "--contexts")
    settings = ev.Settings(contexts=tuple(int(c) for c in contexts), windows=windows, continuation=continuation,
                           depths=tuple(float(d) for d in depths), trials=trials, needles=needles,
                           retrieval=retrieval, special_tokens=special_tokens, decode_every=decode_every)
    ev.check(settings)
    tick = _Ticker(progress, ev.steps(settings, 1), "eval")
    corpus = load_corpus(None if text is None else str(text))
    source, lm, tok = open_model(model, tokenizer=tokenizer, revision=revision, dtype=dtype, device=device,
                                 trust_remote_code=trust_remote_code, device_map=device_map,
                                 max_memory=max_memory, status=tick.say,
                                 check=lambda config: ev.check_model(config, settings))
    torch.manual_seed(compressor.options.seed)
    start = time.perf_counter()

    def step(what: str) -> None:
        tick.what = what
        tick()

    if isinstance(compressor, planning.PlanCompressor):
        shape = budgets.geometry_from_config(lm.config, source.name)
        compressor.plan.check_geometry(max(shape.kv_heads), shape.key_dim, f"model {source.name}", shape.num_layers)
    result = ev.evaluate(lm, tok, corpus, [compressor], settings, measure=proxies, progress=step,
                         query_stride=query_stride)[0]
    result["model"] = source.name
    result["run"] = {"device": str(input_device(lm)), "query_stride": query_stride,
                     "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."), "text_source": corpus.source,
                     "seconds": round(time.perf_counter() - start, 3)}
    return Evaluation(result)


# ----------------------------------------------------------------------------- budgets


class Budget(_Result):
    """KV-cache memory across context lengths, fp16 against compressed: the result of :func:`budget`
    (docs/budget.md).

    Attributes
    ----------
    geometry : dict
        ``name``, ``num_layers``, ``kv_heads`` and ``windows`` per layer, ``key_dim``, ``value_dim``.
    batch : int
    fp16 : dict
        ``bits_per_entry`` (16) and ``bytes_per_token``.
    compressed : dict or None
        The compressed form: ``method``, ``k_bits``, ``v_bits``, ``fp16_tokens``, ``source``,
        ``bytes_per_token``.
    contexts : list of dict
        Per context length: bytes ``per_token``, ``per_sequence`` and ``total`` (the batch) of
        ``fp16`` and ``compressed``, and their ``ratio``.

    Methods
    -------
    to_json()
        What ``kvc budget --json`` writes.
    """

    geometry = _field("geometry")
    batch = _field("batch")
    fp16 = _field("fp16")
    compressed = _field("compressed")
    contexts = _field("contexts")

    def __repr__(self) -> str:
        return f"Budget({self.geometry['name']}, {len(self.contexts)} contexts, batch {self.batch})"


def budget(model: str | None = None, *, layers: int | None = None, kv_heads: int | None = None,
           head_dim: int | None = None, sliding_window: int | None = None, sliding_layers: str | None = None,
           context: str | Sequence[int] = "1024,4k,32k,128k", batch: int = 1,
           method: str | Compressor | None = None, from_json: PathLike | None = None,
           measured: Compression | dict | None = None, **options: Any) -> Budget:
    """KV-cache bytes per token, per sequence and per batch across context lengths (``kvc budget``).

    Parameters
    ----------
    model : str, optional
        Hub id, directory, config.json or GGUF file whose geometry to use (default: the default model).
    layers, kv_heads, head_dim, sliding_window, sliding_layers
        An explicit geometry instead ('all', '0-4,6' or 'pattern:N' for the sliding layers).
    context : str or sequence of int
        Context lengths ('1024,4k' with k = 1024, or a list of token counts).
    batch : int
        Sequences held at once.
    method : str or Compressor, optional
        A compressed form by the method's nominal bits per entry (the methods whose ``kvc.methods()``
        entry has ``nominal_bits``), a name or ``kvc.method(...)``.
    **options
        The method's options (as for :func:`compress`), checked as ``kvc compress`` checks them,
        including the constraints on the head dimension.
    from_json : path, optional
        The measured bits per entry of a ``kvc compress --json`` file instead.
    measured : Compression or dict, optional
        The measured bits per entry of a :func:`compress` result (or its ``to_json()``) instead.

    Returns
    -------
    Budget
    """
    cpu_threads()
    if measured is not None and (from_json is not None or method is not None):
        raise KvcError("pass one of measured=, from_json= or method=")
    if options and method is None:
        raise KvcError(f"method options ({', '.join(options)}) need method=")
    compressor = None if method is None else configured(method, options)
    geometry, compression = budgets.budget_inputs(model, layers, kv_heads, head_dim, sliding_window, sliding_layers,
                                                  compressor, None if from_json is None else Path(from_json))
    if measured is not None:
        result = measured.to_json() if isinstance(measured, Compression) else measured
        compression = budgets.measured_compression(result, source="kvc.compress")
    contexts = budgets.parse_contexts(context if isinstance(context, str) else ",".join(map(str, context)))
    return Budget(budgets.budget(geometry, contexts, batch, compression))


# ----------------------------------------------------------------------------- plans


def _method_or_plan(method: str | Compressor | None, plan: PathLike | None, options: Mapping[str, Any]) -> Compressor:
    """The compressor of a method with its options, or of a plan file (not both)."""
    if plan is None:
        if method is None:
            raise KvcError("give a method (--method) or a plan file (--plan)")
        return configured(method, options)
    if method is not None or options:
        raise KvcError("give a method (--method) or a plan file (--plan), not both")
    return load_plan(plan)


def load_plan(path: PathLike) -> Compressor:
    """A plan file (:func:`plan`, docs/plan.md), validated, as a compressor: for :func:`compress`,
    :func:`evaluate` and :func:`kvc.compressing` (its model shape is checked on each layer)."""
    if not isinstance(path, (str, os.PathLike)):
        raise KvcError(f"plan: expected the path of a plan file, got {type(path).__name__}")
    return planning.PlanCompressor(planfile.read_plan(path), str(path))


class Plan(_Result):
    """A method and bit width per (layer, K or V, KV head) within a budget: the result of :func:`plan`
    (docs/plan.md).

    Attributes
    ----------
    budget : float
        Average bits per entry asked (from ``memory`` when given so).
    bits_per_entry : float
        The plan's fully counted stored bits per entry on the capture (what ``kvc compress --plan``
        counts there).
    error : float
        Predicted total: sum over (layer, KV head) of the relative squared attention-output errors
        of K and of V.
    attn_out_rel : float
        Predicted mean over (layer, KV head) of sqrt(e_K + e_V), comparable to ``kvc compress``'s.
    heads : list of dict
        One row per (layer, tensor, KV head): ``method``, ``label``, ``options``, ``bits_per_entry``, ``error``.
    per_layer : list of dict
        Bits per entry of K, V and both per layer.
    uniform : list of dict
        Every candidate applied to every head: bits per entry, predicted error and attn_out_rel.
    spec : kvc.planning.planfile.PlanSpec
        The plan itself.
    points : kvc.planning.allocate.RateDistortion
        The measured points, to plan again at another budget (``plan(..., points=result)``).

    Methods
    -------
    to_json()
        What ``kvc plan --json`` writes.
    save(path, force=False)
        Write the plan file (TOML, docs/plan.md).
    plot(path, force=False)
        Write the heatmap of bits per layer and head (PNG).
    """

    budget = _field("budget")
    bits_per_entry = _field("bits_per_entry")
    error = _field("error")
    attn_out_rel = _field("attn_out_rel")
    heads = _field("heads")
    per_layer = _field("per_layer")
    uniform = _field("uniform")

    def __init__(self, report: dict, spec: planfile.PlanSpec, points: allocation.RateDistortion):
        super().__init__(report)
        self.spec, self.points = spec, points

    def save(self, path: PathLike, force: bool = False) -> Path:
        planfile.write_plan(path, self.spec, force=force)
        return Path(path)

    def plot(self, path: PathLike, force: bool = False) -> Path:
        from .planning import plots  # matplotlib only when asked for

        path = Path(path)
        check_outputs([path], force)
        plots.heatmap(self._json, path, force)
        return path

    def __repr__(self) -> str:
        return (f"Plan({self.bits_per_entry:.4f} bits per entry within {self.budget:g}, predicted "
                f"attn_out_rel {self.attn_out_rel:.4f})")


def plan(capture: CaptureFile | PathLike, budget: float | None = None, *, memory: str | None = None,
         model: str | None = None, context: int | str | None = None, batch: int = 1,
         methods: str | Sequence[str] = allocation.DEFAULT_METHODS,
         bits: Sequence[float] = allocation.DEFAULT_BITS, options: Mapping[str, Any] | None = None,
         layers: str | Sequence[int] = "all", device: str = "auto", dtype: str = "float32",
         query_stride: int = 1, points: Plan | None = None, predict: bool = False,
         progress: Progress | None = None) -> Plan:
    """A method and bit width per (layer, K or V, KV head) minimizing the predicted attention-output
    error within a budget (``kvc plan``, docs/plan.md, docs/methods.md#plan).

    Parameters
    ----------
    capture : Capture or path
        The calibration capture: every candidate is measured on it.
    budget : float, optional
        Average stored bits per K and V entry, fully counted (as ``kvc compress`` counts them).
    memory, model, context, batch
        Instead of ``budget``: the bytes ('40GB') the KV cache of ``batch`` sequences of ``context``
        tokens ('32k') of ``model`` (as for :func:`budget`; default: the default model) may take;
        the budget is 16 x memory / fp16 bytes (kvc budget's arithmetic).
    methods : str or sequence of str
        Per-tensor candidate methods; ``bits``: their widths (a method without ``bits`` once, a
        width a method cannot take skipped); ``options``: ``{"[method.]key": value}``.
    layers, device, dtype, query_stride
        As for :func:`compress` (the plan covers ``layers``).
    points : Plan, optional
        A plan of the same capture whose measured points to reuse (no measurement).
    predict : bool
        Predict the errors of the candidates with a closed form (turboquant at whole bits,
        eoptshrinkq, svdq) from one measured anchor per head instead of measuring them
        (docs/methods.md#plan-predict); the plan is then measured and ``report["prediction"]``
        holds the predicted against the measured totals.
    progress : callable, optional
        ``progress(done, total, what)`` over layers x candidates.

    Returns
    -------
    Plan
    """
    cpu_threads()
    if (budget is None) == (memory is None):
        raise KvcError("give a budget in bits per entry (--budget) or a memory size (--memory), not both")
    if memory is not None:
        if context is None:
            raise KvcError("--memory needs --context (tokens per sequence, e.g. 32k)")
        contexts = budgets.parse_contexts(str(context))
        if len(contexts) != 1:
            raise KvcError(f"--context {context!r}: give one context length")
        geometry, _ = budgets.budget_inputs(model)
        budget = allocation.memory_budget(memory, geometry, contexts[0], batch)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise KvcError(f"--budget must be a number of bits per entry, got {budget!r}")
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    cap = _open(capture)
    if points is not None:
        rd, measured = points.points, points.to_json()
        if measured["capture"] != str(cap.path):
            raise KvcError(f"points= were measured on {measured['capture']}, not {cap.path}")
        skipped = measured["skipped"]
    else:
        cands, skipped = allocation.candidates(_names(methods), list(bits), dict(options or {}))
        selected = cap.select_layers(_spec(layers))
        torch_device, torch_dtype = require_device(device), compute_dtype(dtype)
        allocation.check_budget(budget)  # before measuring
        tick = _Ticker(progress, len(selected) * len(cands), "measuring")
        points_of = allocation.predict if predict else allocation.measure
        rd = points_of(cap, cands, selected, torch_device, torch_dtype, query_stride, tick)
    spec = allocation.allocate(rd, float(budget), cap.meta, str(cap.path))
    report = allocation.report(spec, rd, skipped, str(cap.path))
    if rd.predicted:
        report["prediction"] = {"predicted_candidates": rd.predicted, **allocation.prediction_error(
            cap, spec, require_device(device), compute_dtype(dtype), query_stride)}
    return Plan(report, spec, rd)
