"""CI gates on KV-cache compression: a TOML policy, evaluated against kvc results (docs/ci.md).

Pure functions: ``parse_policy`` validates a policy (every key checked, unknown ones refused),
``parse_results``/``parse_baseline`` read kvc JSON, ``evaluate`` turns results, the policy and an
optional baseline into pass/fail :class:`Check` rows, and ``render_junit``/``render_markdown``/
``report`` format them. ``run_policy`` (not pure) captures and compresses what the policy's
``[run]`` table names and measures the physical memory of the compressed store.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

import kvc

from .. import __version__
from .budget import Geometry, measured_compression, parse_contexts, sequence_bytes
from ..compression.options import method_options
from ..compression.registry import build, get
from ..errors import KvcError
from ..io import schema
from ..selection import parse_layers
from ..units import human_bytes
from ..model.load import load_config, resolve_device, resolve_model, text_config

SCHEMA = "kvc-check/1"  # the --json report, which is also the baseline format
TENSORS = ("k", "k_pre", "v", "kv")
METRICS = ("bits_per_entry", "mse_rel", "ip_bias_rel", "ip_rmse_rel", "attn_logit_rmse", "attn_kl",
           "attn_out_rel")
SIGNED = ("ip_bias_rel",)  # limited and compared by absolute value
MEMORY_FIGURES = ("array_bytes", "file_bytes", "peak_bytes")
BASELINE_FIGURES = ("bits_per_entry", "mse_rel", "ip_bias_rel", "attn_out_rel", "attn_kl", "file_bytes")
CAPTURE_KEYS = ("model", "layers", "num_seqs", "seq_len", "num_kv_heads", "head_dim", "query_positions")
DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RunSpec:
    """What to capture and compress when no results are given (the ``[run]`` table)."""

    method: str
    params: dict[str, Any]
    model: str | None = None
    text: str | None = None
    seq_len: int = 256
    num_seqs: int = 2
    layers: str = "all"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"


@dataclass(frozen=True)
class BudgetSpec:
    """A KV-cache size limit at a context and batch, on a model's geometry (``[budget]``)."""

    max_gb: float
    context: int
    batch: int = 1
    model: str | None = None


@dataclass(frozen=True)
class Policy:
    """A validated policy; tolerances are fractions (0.05 = 5 %)."""

    run: RunSpec | None = None
    limits: dict[str, float] = dataclasses.field(default_factory=dict)  # overall figures
    tensor_limits: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    budget: BudgetSpec | None = None
    memory_tolerance: float = 0.05
    baseline_tolerance: float = 0.05
    baseline_abs_tolerance: float = 1e-4
    baseline_tolerances: dict[str, float] = dataclasses.field(default_factory=dict)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; relative paths in it are relative to its folder."""
    where = f"policy {path}"
    return parse_policy(schema.load_toml(path, where), Path(path).parent)


def parse_policy(data: dict, base: Path = Path(".")) -> Policy:
    """Validate a parsed policy: every key known, every value of the expected type."""
    _keys(data, "", ("run", "limits", "budget", "memory", "baseline"))
    limits = _table(data, "limits")
    _keys(limits, "limits", METRICS + TENSORS)
    overall = {m: _number(limits[m], f"limits.{m}") for m in METRICS if m in limits}
    tensor_limits = {}
    for tensor in (t for t in TENSORS if t in limits):
        table = _table(limits, tensor, "limits.")
        _keys(table, f"limits.{tensor}", METRICS)
        tensor_limits[tensor] = {m: _number(v, f"limits.{tensor}.{m}") for m, v in table.items()}
    memory = _table(data, "memory")
    _keys(memory, "memory", ("tolerance",))
    baseline = _table(data, "baseline")
    _keys(baseline, "baseline", ("tolerance", "abs_tolerance", "tolerances"))
    tolerances = _table(baseline, "tolerances", "baseline.")
    figures = METRICS + MEMORY_FIGURES
    _keys(tolerances, "baseline.tolerances", figures)
    return Policy(
        run=_run_spec(data["run"], base) if "run" in data else None,
        limits=overall, tensor_limits=tensor_limits,
        budget=_budget_spec(data["budget"]) if "budget" in data else None,
        memory_tolerance=_number(memory.get("tolerance", 0.05), "memory.tolerance"),
        baseline_tolerance=_number(baseline.get("tolerance", 0.05), "baseline.tolerance"),
        baseline_abs_tolerance=_number(baseline.get("abs_tolerance", 1e-4), "baseline.abs_tolerance"),
        baseline_tolerances={f: _number(v, f"baseline.tolerances.{f}") for f, v in tolerances.items()})


def _run_spec(run: Any, base: Path) -> RunSpec:
    schema.mapping(run, "run", "policy", "a table")
    _keys(run, "run", ("method", "params", "model", "text", "seq_len", "num_seqs", "layers", "seed",
                       "device", "dtype"))
    if "method" not in run:
        raise KvcError("policy: run.method is missing (a method name, e.g. 'turboquant')")
    method = _string(run["method"], "run.method")
    seed = _integer(run.get("seed", 0), "run.seed", minimum=0)
    params = _method_params(method, _table(run, "params", "run."), seed)
    layers = run.get("layers", "all")
    if isinstance(layers, list) and layers and all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        layers = ",".join(map(str, layers))
    elif not isinstance(layers, str):
        raise KvcError(f"policy: run.layers must be 'all', a string like '0-3' or a list of layer "
                       f"indices, got {schema.show(layers)}")
    dtype = schema.string(run.get("dtype", "float32"), "run.dtype", "policy", choices=DTYPES)
    text = _string(run["text"], "run.text") if "text" in run else None
    return RunSpec(method=method, params=params,
                   model=_string(run["model"], "run.model") if "model" in run else None,
                   text=str(base / text) if text is not None else None,
                   seq_len=_integer(run.get("seq_len", 256), "run.seq_len", minimum=2),
                   num_seqs=_integer(run.get("num_seqs", 2), "run.num_seqs"),
                   layers=layers, seed=seed, device=_string(run.get("device", "auto"), "run.device"),
                   dtype=dtype)


def _method_params(method: str, params: dict, seed: int) -> dict[str, Any]:
    """The method's options from ``run.params`` (checked as ``kvc.method`` checks them) and ``run.seed``."""
    if "seed" in params:
        raise KvcError("policy: run.params.seed: give the seed as run.seed")
    try:
        cls = get(method)
    except KvcError as err:
        raise KvcError(f"policy: run.method: {err}") from None
    try:
        return build(cls.name, **method_options(cls, params), seed=seed).params()
    except KvcError as err:
        raise KvcError(f"policy: run.params: {err}") from None


def _budget_spec(budget: Any) -> BudgetSpec:
    schema.mapping(budget, "budget", "policy", "a table")
    _keys(budget, "budget", ("max_gb", "context", "batch", "model"))
    for key in ("max_gb", "context"):
        schema.require(budget, key, "policy", f"budget.{key}")
    context = budget["context"]
    if isinstance(context, bool) or not isinstance(context, (int, str)):
        raise KvcError(f"policy: budget.context must be a token count like 4096 or '32k', got "
                       f"{schema.show(context)}")
    try:
        contexts = parse_contexts(str(context))
    except KvcError:
        contexts = []
    if len(contexts) != 1:
        raise KvcError(f"policy: budget.context must be one positive token count like 4096 or '32k', "
                       f"got {schema.show(context)}")
    return BudgetSpec(max_gb=_number(budget["max_gb"], "budget.max_gb"), context=contexts[0],
                      batch=_integer(budget.get("batch", 1), "budget.batch"),
                      model=_string(budget["model"], "budget.model") if "model" in budget else None)


def _keys(table: dict, where: str, allowed: tuple[str, ...]) -> None:
    schema.known_keys(table, allowed, "policy", f"{where}." if where else "")


def _table(data: dict, key: str, prefix: str = "") -> dict:
    return schema.mapping(data.get(key, {}), f"{prefix}{key}", "policy", "a table")


def _number(value: Any, key: str) -> float:
    return schema.number(value, key, "policy", minimum=0)


def _integer(value: Any, key: str, minimum: int = 1) -> int:
    return schema.integer(value, key, "policy", minimum=minimum)


def _string(value: Any, key: str) -> str:
    return schema.string(value, key, "policy", nonempty=True)


# ----------------------------------------------------------------------------- results, baseline


def parse_results(data: Any, source: str) -> list[dict]:
    """Results of a ``kvc compress --json`` file (one) or a ``kvc check --json`` report (all)."""
    if isinstance(data, dict) and "schema" in data:
        return _report_results(data, source, source)
    _check_result(data, source)
    return [{**data, "label": data.get("label", Path(source).name)}]


def parse_baseline(data: Any, source: str) -> list[dict]:
    """The results of a baseline: a ``kvc check --json`` report of the current format version."""
    if not isinstance(data, dict) or "schema" not in data:
        raise KvcError(f"baseline {source}: not a kvc check report (no 'schema' key); write one with "
                       "kvc check --policy POLICY --json FILE")
    return _report_results(data, source, f"baseline {source}")


def _report_results(data: dict, source: str, where: str) -> list[dict]:
    if not str(data["schema"]).startswith("kvc-check/"):
        raise KvcError(f"{where}: not a kvc check report (format {schema.show(data['schema'])})")
    if data["schema"] != SCHEMA:
        raise KvcError(f"{where} has format {schema.show(data['schema'])}, but this kvc ({__version__}) "
                       f"reads {SCHEMA!r}; regenerate it with kvc check --policy POLICY --json FILE --force")
    results = data.get("results")
    if not isinstance(results, list):
        raise KvcError(f"{where}: 'results' must be a list of kvc results")
    for i, r in enumerate(results):
        _check_result(r, f"{where} results[{i}]")
    return [{**r, "label": r.get("label", f"{Path(source).name}#{i}")} for i, r in enumerate(results)]


def _check_result(result: Any, where: str) -> None:
    """A method, a finite bits_per_entry and a summary of tensor rows of numbers (or null); an
    optional string label, objects params and capture, and a ``memory`` section of positive
    entries and byte counts (a measured peak with its method and device)."""
    if not (isinstance(result, dict) and isinstance(result.get("summary"), dict)
            and "method" in result and "bits_per_entry" in result):
        raise KvcError(f"{where}: not kvc results (expected kvc compress --json output with method, "
                       "bits_per_entry and a summary of tensor rows, or a kvc check --json report)")
    schema.string(result["method"], "method", where, nonempty=True)
    schema.number(result["bits_per_entry"], "bits_per_entry", where, minimum=0)
    schema.optional(schema.string, result.get("label"), "label", where)
    for key in ("params", "capture"):
        schema.optional(schema.mapping, result.get(key), key, where)
    for tensor, row in result["summary"].items():
        for metric, value in schema.mapping(row, f"summary.{tensor}", where).items():
            schema.optional(schema.number, value, f"summary.{tensor}.{metric}", where)
    memory = result.get("memory")
    if memory is None:
        return
    schema.mapping(memory, "memory", where)
    for key in ("entries", "nominal_bytes", "array_bytes", "file_bytes"):
        schema.number(schema.require(memory, key, where, f"memory.{key}"), f"memory.{key}", where, positive=True)
    if memory.get("peak_bytes") is not None:
        schema.number(memory["peak_bytes"], "memory.peak_bytes", where, minimum=0)
        for key in ("peak_method", "device"):
            schema.string(schema.require(memory, key, where, f"memory.{key}"), f"memory.{key}", where)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Check:
    """One pass/fail row: ``value`` (None when not reported) against the ``expected`` text."""

    result: str
    name: str
    value: float | None
    expected: str
    passed: bool
    unit: str = ""
    detail: str = ""


def evaluate(results: list[dict], policy: Policy, baseline: list[dict] | None = None,
             geometry: Geometry | None = None) -> list[Check]:
    """Every check of the policy on every result; ``geometry`` is needed by a ``[budget]``."""
    checks = []
    for result in results:
        checks += limit_checks(result, policy)
        if policy.budget is not None:
            checks.append(budget_check(result, policy.budget, geometry))
        checks += memory_checks(result, policy.memory_tolerance)
        if baseline is not None:
            checks += baseline_checks(result, baseline, policy)
    return checks


def limit_checks(result: dict, policy: Policy) -> list[Check]:
    """Maxima on the overall figures and on each tensor's summary.

    Overall: ``bits_per_entry`` is the result's top-level figure; another metric is read from the
    joint ``kv`` row when it reports it, else from every tensor row that does (the key metrics).
    """
    summary, label = result["summary"], result["label"]
    checks = []
    for metric, limit in policy.limits.items():
        if metric == "bits_per_entry":
            rows = [("", result.get("bits_per_entry"))]
        elif metric in summary.get("kv", {}):
            rows = [("kv", summary["kv"][metric])]
        else:
            rows = [(t, summary[t][metric]) for t in TENSORS if metric in summary.get(t, {})] or [("", None)]
        checks += [_at_most(label, _figure(tensor, metric), value, limit) for tensor, value in rows]
    for tensor, limits in policy.tensor_limits.items():
        for metric, limit in limits.items():
            checks.append(_at_most(label, _figure(tensor, metric), summary.get(tensor, {}).get(metric), limit))
    return checks


def _figure(tensor: str, metric: str) -> str:
    name = f"{tensor}.{metric}" if tensor else metric
    return f"|{name}|" if metric in SIGNED else name


def _at_most(label: str, name: str, value: Any, limit: float) -> Check:
    if not _finite(value):
        return Check(label, name, None, f"<= {limit:.4g}", False, detail="not reported in the result")
    return Check(label, name, float(value), f"<= {limit:.4g}", abs(value) <= limit)


def budget_check(result: dict, spec: BudgetSpec, geometry: Geometry) -> Check:
    """KV cache of ``spec.batch`` sequences of ``spec.context`` tokens at the measured bits, in GB."""
    total = sequence_bytes(geometry, spec.context, measured_compression(result)) * spec.batch
    fp16 = sequence_bytes(geometry, spec.context) * spec.batch
    return Check(result["label"], f"KV GB, {spec.context} tokens x {spec.batch}", total / 1e9,
                 f"<= {spec.max_gb:g} GB", total / 1e9 <= spec.max_gb, "GB",
                 f"{geometry.name}; fp16 {fp16 / 1e9:.4g} GB")


def memory_checks(result: dict, tolerance: float) -> list[Check]:
    """Physical bytes (packed arrays; compressed file) within ``tolerance`` of the nominal
    bits_per_entry x entries / 8. Results without a ``memory`` section give no rows."""
    memory = result.get("memory")
    if memory is None:
        return []
    nominal = memory["nominal_bytes"]
    checks = []
    for figure in ("array_bytes", "file_bytes"):
        physical = memory[figure]
        deviation = (physical - nominal) / nominal
        checks.append(Check(result["label"], f"physical {figure}", float(physical),
                            f"within {tolerance:.0%} of nominal {human_bytes(nominal)}",
                            abs(deviation) <= tolerance, "bytes", f"{deviation:+.2%} of nominal"))
    return checks


def baseline_checks(result: dict, baseline: list[dict], policy: Policy) -> list[Check]:
    """Figures no worse than the baseline entry of the same method and parameters.

    Allowed: |baseline| x (1 + tolerance) + abs_tolerance, per tensor row present in both. Compared:
    BASELINE_FIGURES plus those named in ``[baseline.tolerances]``; ``peak_bytes`` only when named
    there and measured the same way on the same device.
    """
    label = result["label"]
    key = _identity(result)
    entry = next((b for b in baseline if _identity(b) == key), None)
    if entry is None:
        return [Check(label, "baseline entry", None, "present", False,
                      detail=f"the baseline has no {result['method']} result with these parameters; "
                             "regenerate it")]
    capture, base_capture = result.get("capture") or {}, entry.get("capture") or {}
    changed = [k for k in CAPTURE_KEYS if k in capture and k in base_capture and capture[k] != base_capture[k]]
    if changed:
        return [Check(label, "baseline capture", None, "same capture", False,
                      detail="; ".join(f"{k}: {base_capture[k]!r} in the baseline, {capture[k]!r} now"
                                       for k in changed) + "; regenerate the baseline")]
    checks = []
    for figure in dict.fromkeys(BASELINE_FIGURES + tuple(policy.baseline_tolerances)):
        tolerance = policy.baseline_tolerances.get(figure, policy.baseline_tolerance)
        for name, now, then in _paired(result, entry, figure):
            allowed = abs(then) * (1 + tolerance) + policy.baseline_abs_tolerance
            unit = "bytes" if figure in MEMORY_FIGURES else ""
            shown = human_bytes(then) if unit else f"{then:.4g}"
            checks.append(Check(label, f"{name} vs baseline", float(now),
                                f"<= baseline {shown} +{tolerance:.0%}", abs(now) <= allowed, unit))
    return checks


def _identity(result: dict) -> tuple[str, str]:
    return str(result.get("method")), json.dumps(result.get("params"), sort_keys=True)


def _paired(result: dict, entry: dict, figure: str) -> Iterator[tuple[str, float, float]]:
    """(name, now, baseline) for each place both report ``figure``."""
    if figure in MEMORY_FIGURES:
        now, then = result.get("memory") or {}, entry.get("memory") or {}
        if figure == "peak_bytes" and any(now.get(k) != then.get(k) for k in ("peak_method", "device")):
            return
        if _finite(now.get(figure)) and _finite(then.get(figure)):
            yield f"memory.{figure}", now[figure], then[figure]
        return
    for tensor in TENSORS:
        a, b = (r["summary"].get(tensor) or {} for r in (result, entry))
        if _finite(a.get(figure)) and _finite(b.get(figure)):
            yield _figure(tensor, figure), a[figure], b[figure]


# ----------------------------------------------------------------------------- output


def format_value(check: Check) -> str:
    if check.value is None:
        return "-"
    if check.unit == "bytes":
        return human_bytes(check.value)
    if check.unit == "GB":
        return f"{check.value:.4g} GB"
    return f"{check.value:.4g}"


def memory_line(result: dict) -> str | None:
    """Physical next to nominal memory of a result, one line (None without a ``memory`` section)."""
    memory = result.get("memory")
    if not isinstance(memory, dict):
        return None
    peak = memory.get("peak_bytes")
    return (f"{result['label']}: compressed store {human_bytes(memory['file_bytes'])} on disk, "
            f"{human_bytes(memory['array_bytes'])} of packed arrays, nominal "
            f"{human_bytes(memory['nominal_bytes'])} ({result['bits_per_entry']:.4g} bits x "
            f"{memory['entries']:,} entries / 8); peak "
            + (f"+{human_bytes(peak)} ({memory['peak_method']}, {memory['device']})" if peak is not None
               else "not measured"))


def report(results: list[dict], checks: list[Check], policy_path: str) -> dict:
    """The --json report (also the baseline format); per-head rows are left out."""
    return {"schema": SCHEMA, "kvc_version": __version__, "policy": policy_path,
            "passed": all(c.passed for c in checks),
            "results": [{k: v for k, v in r.items() if k != "heads"} for r in results],
            "checks": [dataclasses.asdict(c) for c in checks]}


def render_junit(checks: list[Check], seconds: float = 0.0) -> str:
    """JUnit XML: one testsuite, one testcase per check, a <failure> on each failed one."""
    failures = sum(not c.passed for c in checks)
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{seconds:.3f}"}
    suites = ET.Element("testsuites", name="kvc check", **counts)
    suite = ET.SubElement(suites, "testsuite", name="kvc check", **counts)
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=_xml_text(c.result), name=_xml_text(c.name), time="0")
        text = _xml_text(f"{format_value(c)} (expected {c.expected})" + (f"; {c.detail}" if c.detail else ""))
        if not c.passed:
            ET.SubElement(case, "failure", message=text, type="regression").text = text
        else:
            ET.SubElement(case, "system-out").text = text
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def render_markdown(results: list[dict], checks: list[Check]) -> str:
    """A pull-request comment: verdict, one table row per check, physical memory lines."""
    failed = sum(not c.passed for c in checks)
    head = (f"### kvc check: :white_check_mark: pass ({len(checks)} checks)" if not failed else
            f"### kvc check: :x: {failed} of {len(checks)} checks failed")
    lines = [head, "", "| result | check | value | expected | status | detail |",
             "|---|---|---:|---|:---:|---|"]
    for c in sorted(checks, key=lambda c: c.passed):
        cells = [_md_code(c.result), _md_code(c.name), format_value(c), _md_code(c.expected),
                 "pass" if c.passed else "**FAIL**", _md_code(c.detail)]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    memory = [m for m in map(memory_line, results) if m]
    if memory:
        lines += ["", "Physical memory:", ""] + [f"- {_md_code(m)}" for m in memory]
    return "\n".join(lines) + "\n"


def _md_code(text: str) -> str:
    """``text`` (from result files and the policy) as a Markdown code span, on one line: inert, so no
    HTML, link, image, mention or emoji in it renders (GitHub). Pipes still need escaping in a table."""
    text = re.sub(r"\s+", " ", text).strip().encode("utf-8", "replace").decode()  # lone surrogates: ?
    if not text:
        return ""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold (ElementTree escapes <, &, quotes)."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "\ufffd", text)


# ----------------------------------------------------------------------------- running the policy


@dataclass
class Peak:
    bytes: int | None = None
    method: str | None = None


@contextlib.contextmanager
def peak_memory(device) -> Iterator[Peak]:
    """Peak memory a block adds. CUDA: torch.cuda.max_memory_allocated over the block. CPU (Linux):
    growth of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs);
    ``bytes`` stays None where that is unavailable. tracemalloc is not used: it misses tensors."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes, peak.method = torch.cuda.max_memory_allocated(device) - before, "cuda_max_memory_allocated"
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse does not hide growth
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_kb("VmRSS")
    except OSError:
        before = None
    yield peak
    if before is not None:
        peak.bytes, peak.method = (_proc_status_kb("VmHWM") - before) * 1024, "rss_high_water_mark"


def _proc_status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def run_policy(spec: RunSpec, workdir: Path, status=None) -> dict:
    """Capture the policy's model and text, compress with its method, measure; a kvc result.

    The capture and the compression are :func:`kvc.capture` and :func:`kvc.compress`, as ``kvc
    capture`` and ``kvc compress`` make them. The result is ``kvc compress --json``'s, plus
    ``memory``: entries, nominal_bytes, array_bytes (the packed arrays), file_bytes (the compressed
    file), peak_bytes of the compression run (see ``peak_memory``), peak_method and device.
    ``status(text)`` reports progress.
    """
    status = status or (lambda text: None)
    device = resolve_device(spec.device)
    source = resolve_model(spec.model)
    try:  # checked on the config, before the weights load
        layers = parse_layers(spec.layers, text_config(load_config(source)).num_hidden_layers)
    except KvcError as err:
        raise KvcError(f"policy: run.layers: {err}") from None
    status(f"capturing {spec.num_seqs} x {spec.seq_len} tokens, layers {spec.layers}")
    captured = kvc.capture(spec.model, spec.text, out=workdir / "capture.safetensors", seq_len=spec.seq_len,
                           num_seqs=spec.num_seqs, layers=layers, device=spec.device,
                           progress=lambda done, total, what: status(what))
    status(f"compressing with {spec.method}")
    with peak_memory(device) as peak:
        run = kvc.compress(captured, spec.method, device=spec.device, dtype=spec.dtype, **spec.params)
    store = run.save(workdir / "compressed.safetensors")
    result = run.to_json()
    result["capture"] = {k: v for k, v in result["capture"].items() if k != "path"}
    result["memory"] = {
        "entries": run.entries, "nominal_bytes": run.bits_per_entry * run.entries / 8,
        "array_bytes": run.array_bytes, "file_bytes": store.stat().st_size, "peak_bytes": peak.bytes,
        "peak_method": peak.method, "device": device.type}
    return {**result, "label": spec.method}
