"""kvc check: policy validation, limits, budget, physical memory, baseline, JUnit/Markdown, CI run."""

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from kvc.ci.budget import geometry_from_dims, measured_compression, sequence_bytes
from kvc.ci.check import SCHEMA, Policy, budget_check, evaluate, limit_checks, memory_checks, parse_policy, peak_memory

ROOT = Path(__file__).resolve().parents[1]

RESULT = {
    "method": "turboquant", "params": {"seed": 0, "keys": "post", "variant": "mse", "bits": 2.0,
                                       "rotation": "haar"},
    "bits_per_entry": 2.25, "bits_per_entry_paper": 2.0,
    "summary": {
        "k": {"bits_per_entry": 2.25, "mse_rel": 0.115, "ip_bias_rel": -0.02, "ip_slope": 0.89,
              "ip_rmse_rel": 0.33},
        "v": {"bits_per_entry": 2.25, "mse_rel": 0.116},
        "kv": {"bits_per_entry": 2.25, "mse_rel": 0.1155, "attn_logit_rmse": 1.19, "attn_kl": 0.43,
               "attn_out_rel": 0.55, "attn_topk_overlap": 0.66},
    },
    "capture": {"model": "m", "layers": [0, 1], "num_seqs": 2, "seq_len": 256, "num_kv_heads": 3,
                "head_dim": 64, "query_positions": 256},
    "memory": {"entries": 786432, "nominal_bytes": 221184.0, "array_bytes": 221184, "file_bytes": 227000,
               "peak_bytes": 1000000, "peak_method": "rss_high_water_mark", "device": "cpu"},
}
LIMITS = """
[limits]
bits_per_entry = 2.5
attn_out_rel = 0.6
ip_bias_rel = 0.05
[limits.v]
mse_rel = 0.2
"""


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _result(**changes) -> dict:
    """RESULT with dotted-path changes, e.g. _result(**{"summary.kv.attn_out_rel": 0.7})."""
    result = copy.deepcopy(RESULT)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = result
        for key in parents:
            node = node[key]
        node[last] = value
    return result


def _one_line_exit_2(outcome, *expected):
    code, _, stderr = outcome
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("kvc: error: "), stderr
    for text in expected:
        assert text in stderr


# ----------------------------------------------------------------------------- pass, fail, outputs


def test_pass_writes_junit_markdown_json(run, tmp_path):
    results = _write(tmp_path / "tq.json", RESULT)
    policy = _write(tmp_path / "policy.toml", LIMITS)
    files = {name: tmp_path / name for name in ("report.xml", "comment.md", "report.json")}
    code, stdout, stderr = run("check", results, "--policy", policy, "--junit", files["report.xml"],
                               "--markdown", files["comment.md"], "--json", files["report.json"])
    assert code == 0, stderr
    assert "PASS: 6 checks" in stdout  # 4 limits + 2 physical-memory checks
    suite = ET.parse(files["report.xml"]).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("6", "0")
    names = [case.get("name") for case in suite.iter("testcase")]
    assert {"bits_per_entry", "kv.attn_out_rel", "|k.ip_bias_rel|", "v.mse_rel",
            "physical file_bytes", "physical array_bytes"} == set(names)
    markdown = files["comment.md"].read_text()
    assert markdown.startswith("### kvc check: :white_check_mark: pass (6 checks)")
    rows = [line for line in markdown.splitlines() if line.startswith("| `tq.json` |")]
    assert len(rows) == 6 and all(row.count(" | ") == 5 for row in rows)
    assert "\\|k.ip_bias_rel\\|" in markdown  # pipes escaped inside cells
    report = json.loads(files["report.json"].read_text())
    assert report["schema"] == SCHEMA and report["passed"] is True
    assert report["results"][0]["label"] == "tq.json" and len(report["checks"]) == 6
    # outputs are not overwritten without --force
    code, _, stderr = run("check", results, "--policy", policy, "--junit", files["report.xml"])
    assert code == 2 and "--force" in stderr


def test_regression_exits_1_and_marks_failures(run, tmp_path):
    results = _write(tmp_path / "tq.json", _result(**{"summary.kv.attn_out_rel": 0.7,
                                                      "summary.k.ip_bias_rel": -0.06}))
    policy = _write(tmp_path / "policy.toml", LIMITS)
    junit, markdown = tmp_path / "j.xml", tmp_path / "c.md"
    code, stdout, _ = run("check", results, "--policy", policy, "--junit", junit, "--markdown", markdown)
    assert code == 1 and "FAIL: 2 of 6 checks failed" in stdout
    failed = {case.get("name"): case.find("failure") for case in ET.parse(junit).getroot().iter("testcase")
              if case.find("failure") is not None}
    assert set(failed) == {"kv.attn_out_rel", "|k.ip_bias_rel|"}  # the bias is limited in absolute value
    assert "0.7 (expected <= 0.6)" in failed["kv.attn_out_rel"].get("message")
    text = markdown.read_text()
    assert text.startswith("### kvc check: :x: 2 of 6 checks failed")
    assert text.splitlines()[4].count("**FAIL**") == 1  # failures are listed first


def test_overall_limits_read_the_right_rows():
    policy = parse_policy({"limits": {"bits_per_entry": 3, "mse_rel": 0.2, "ip_bias_rel": 0.05,
                                      "attn_kl": 1, "k": {"mse_rel": 0.2}, "k_pre": {"mse_rel": 0.2}}})
    result = {**_result(), "label": "r"}
    checks = {c.name: c for c in limit_checks(result, policy)}
    assert checks["bits_per_entry"].value == 2.25
    assert checks["kv.mse_rel"].value == 0.1155  # overall: the joint row
    assert checks["|k.ip_bias_rel|"].value == -0.02  # key metrics: the k row
    assert checks["kv.attn_kl"].passed and checks["k.mse_rel"].value == 0.115
    # a limit on a figure the result does not report fails loudly
    assert checks["k_pre.mse_rel"].value is None and not checks["k_pre.mse_rel"].passed
    assert "not reported" in checks["k_pre.mse_rel"].detail
    missing = dict(result, summary={**result["summary"], "kv": {"mse_rel": None}})
    assert [c.passed for c in limit_checks(missing, parse_policy({"limits": {"attn_out_rel": 1}}))] == [False]


def test_memory_physical_against_nominal():
    result = {**_result(**{"memory.file_bytes": 221184 * 1.08}), "label": "r"}
    strict = {c.name: c for c in memory_checks(result, 0.05)}
    assert strict["physical array_bytes"].passed and not strict["physical file_bytes"].passed
    assert strict["physical file_bytes"].detail == "+8.00% of nominal"
    assert all(c.passed for c in memory_checks(result, 0.10))
    assert memory_checks({**result, "memory": None}, 0.05) == []


def test_budget_uses_measured_bits(tmp_path, run, monkeypatch):
    geometry = geometry_from_dims(30, 3, 64)
    result = {**_result(**{"summary.k.bits_per_entry": 2.5, "summary.v.bits_per_entry": 2.0}), "label": "r"}
    spec = parse_policy({"budget": {"context": "32k", "batch": 8, "max_gb": 1.0}}).budget
    assert (spec.context, spec.batch) == (32768, 8)
    check = budget_check(result, spec, geometry)
    compression = measured_compression(result)
    assert (compression.k_bits, compression.v_bits) == (2.5, 2.0)
    assert check.value == pytest.approx(30 * 3 * 64 * (2.5 + 2.0) / 8 * 32768 * 8 / 1e9)
    assert check.value * 1e9 == pytest.approx(sequence_bytes(geometry, 32768, compression) * 8)
    assert check.passed and check.unit == "GB"
    # through the CLI, on a config.json geometry; too small a budget is a regression
    config = _write(tmp_path / "config.json", {"model_type": "llama", "num_hidden_layers": 30,
                                               "num_attention_heads": 9, "num_key_value_heads": 3,
                                               "hidden_size": 576})
    results = _write(tmp_path / "r.json", RESULT)
    policy = _write(tmp_path / "p.toml", f'[budget]\nmodel = "{config}"\ncontext = 4096\nmax_gb = 0.01\n')
    code, stdout, _ = run("check", results, "--policy", policy, "--json", tmp_path / "out.json")
    (check,) = [c for c in json.loads((tmp_path / "out.json").read_text())["checks"] if c["unit"] == "GB"]
    assert code == 1 and "FAIL: 1 of 3" in stdout
    assert check["name"] == "KV GB, 4096 tokens x 1" and check["value"] == pytest.approx(0.01327104)
    # --json -: the report on stdout, the table and the verdict on stderr, no file named '-'
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run("check", results, "--policy", policy, "--json", "-")
    assert code == 1 and "FAIL: 1 of 3" in stderr and "KV GB, 4096 tokens x 1" in stderr
    assert json.loads(stdout)["checks"] == json.loads((tmp_path / "out.json").read_text())["checks"]
    assert not (tmp_path / "-").exists()


# ----------------------------------------------------------------------------- baseline


def _baseline(run, tmp_path, result=RESULT) -> Path:
    path = tmp_path / "baseline.json"
    code, _, stderr = run("check", _write(tmp_path / "base-results.json", result), "--policy",
                          _write(tmp_path / "limits.toml", LIMITS), "--json", path, "--force")
    assert code == 0, stderr
    return path


@pytest.mark.parametrize("changes, failing", [
    ({}, set()),
    ({"summary.kv.mse_rel": 0.1155 * 0.5, "summary.k.ip_bias_rel": 0.0}, set()),  # better is fine
    ({"summary.kv.mse_rel": 0.1155 * 1.04}, set()),  # within 5%
    ({"summary.kv.mse_rel": 0.1155 * 1.2}, {"kv.mse_rel vs baseline"}),
    ({"summary.k.ip_bias_rel": 0.03}, {"|k.ip_bias_rel| vs baseline"}),  # sign flip, larger size
    ({"memory.file_bytes": 240000}, {"memory.file_bytes vs baseline"}),
    ({"bits_per_entry": 2.3, "summary.kv.bits_per_entry": 2.4}, {"kv.bits_per_entry vs baseline"}),
])
def test_baseline_tolerances(run, tmp_path, changes, failing):
    baseline = _baseline(run, tmp_path)
    now = _write(tmp_path / "now.json", _result(**changes))
    policy = _write(tmp_path / "p.toml", "[memory]\ntolerance = 0.2\n[baseline]\ntolerance = 0.05\n")
    code, stdout, stderr = run("check", now, "--policy", policy, "--baseline", baseline,
                               "--json", tmp_path / "out.json")
    checks = json.loads((tmp_path / "out.json").read_text())["checks"]
    assert {c["name"] for c in checks if not c["passed"]} == failing
    assert code == (1 if failing else 0), stderr
    assert {"kv.mse_rel vs baseline", "k.bits_per_entry vs baseline", "memory.file_bytes vs baseline"} <= {
        c["name"] for c in checks}
    assert "memory.peak_bytes vs baseline" not in {c["name"] for c in checks}  # only when named


def test_baseline_peak_only_when_named_and_comparable(tmp_path, run):
    baseline = [{**_result(), "label": "b"}]
    policy = parse_policy({"baseline": {"tolerances": {"peak_bytes": 0.25}}})
    grown = {**_result(**{"memory.peak_bytes": 2000000}), "label": "r"}
    names = {c.name: c.passed for c in evaluate([grown], policy, baseline)}
    assert names["memory.peak_bytes vs baseline"] is False
    on_gpu = {**_result(**{"memory.peak_bytes": 2000000, "memory.device": "cuda"}), "label": "r"}
    assert "memory.peak_bytes vs baseline" not in {c.name for c in evaluate([on_gpu], policy, baseline)}


def test_baseline_mismatch_fails_clearly(tmp_path):
    baseline = [{**_result(), "label": "b"}]
    other_params = {**_result(**{"params.bits": 3.0}), "label": "r"}
    (check,) = [c for c in evaluate([other_params], Policy(), baseline) if c.name.startswith("baseline")]
    assert check.name == "baseline entry" and not check.passed and "regenerate" in check.detail
    other_capture = {**_result(**{"capture.seq_len": 512}), "label": "r"}
    (check,) = [c for c in evaluate([other_capture], Policy(), baseline) if c.name.startswith("baseline")]
    assert not check.passed and "seq_len: 256 in the baseline, 512 now" in check.detail


def test_baseline_older_format_is_a_clear_error(run, tmp_path):
    results = _write(tmp_path / "r.json", RESULT)
    policy = _write(tmp_path / "p.toml", LIMITS)
    old = _write(tmp_path / "old.json", {"schema": "kvc-check/0", "results": []})
    _one_line_exit_2(run("check", results, "--policy", policy, "--baseline", old),
                     "has format 'kvc-check/0'", f"reads '{SCHEMA}'", "regenerate")
    budget = _write(tmp_path / "budget.json", {"schema": "kvc-budget/1"})
    _one_line_exit_2(run("check", results, "--policy", policy, "--baseline", budget),
                     "not a kvc check report (format 'kvc-budget/1')")
    no_schema = _write(tmp_path / "compress.json", RESULT)
    _one_line_exit_2(run("check", results, "--policy", policy, "--baseline", no_schema),
                     "not a kvc check report (no 'schema' key)")
    _one_line_exit_2(run("check", results, "--policy", policy, "--baseline", _write(tmp_path / "x.json", "{")),
                     "not valid JSON")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("policy, expected", [
    ("[limits]\nmse_rel = 'abc'\n", "policy: limits.mse_rel must be a number, got 'abc'"),
    ("[limits]\nmse_rel = -0.1\n", "policy: limits.mse_rel must be >= 0, got -0.1"),
    ("[limits]\nmse = 0.1\n", "policy: unknown key limits.mse (expected one of: bits_per_entry,"),
    ("[limits.q]\nmse_rel = 0.1\n", "policy: unknown key limits.q"),
    ("[limits]\nk = 0.1\n", "policy: limits.k must be a table, got 0.1"),
    ("[limits.v]\nattn_out_rel = true\n", "policy: limits.v.attn_out_rel must be a number, got True"),
    ("[memory]\ntolerance = '5%'\n", "policy: memory.tolerance must be a number, got '5%'"),
    ("[baseline.tolerances]\nspeed = 0.1\n", "policy: unknown key baseline.tolerances.speed"),
    ("[budget]\nmax_gb = 1\n", "policy: budget.context is missing"),
    ("[budget]\nmax_gb = 1\ncontext = '4x'\n", "policy: budget.context must be one positive token count"),
    ("[budget]\nmax_gb = 1\ncontext = 0\n", "policy: budget.context must be one positive token count"),
    ("[run]\nseq_len = 256\n", "policy: run.method is missing"),
    ("[run]\nmethod = 'nope'\n", "policy: run.method: unknown method 'nope'; valid methods:"),
    ("[run]\nmethod = 'turboquant'\nseq_len = 'long'\n", "policy: run.seq_len must be an integer >= 2, got 'long'"),
    ("[run]\nmethod = 'turboquant'\nlayers = 3\n", "policy: run.layers must be 'all'"),
    ("[run]\nmethod = 'turboquant'\ndtype = 'float16'\n", "policy: run.dtype must be one of float32, float64"),
    ("[run]\nmethod = 'turboquant'\n[run.params]\nbits = 'two'\n", "policy: run.params: bits expects float, got 'two'"),
    ("[run]\nmethod = 'turboquant'\n[run.params]\nbitz = 2\n", "policy: run.params: method turboquant has no option bitz"),
    ("[run]\nmethod = 'turboquant'\n[run.params]\nvariant = 'max'\n", "policy: run.params: turboquant: --variant must be one of"),
    ("[run]\nmethod = 'turboquant'\n[run.params]\nseed = 1\n", "policy: run.params.seed: give the seed as run.seed"),
    ("[runs]\nmethod = 'turboquant'\n", "policy: unknown key runs (expected one of: run, limits, budget, memory, baseline)"),
    ("[limits\n", "not valid TOML"),
])
def test_malformed_policy_exit_2_naming_the_key(run, tmp_path, policy, expected):
    results = _write(tmp_path / "r.json", RESULT)
    _one_line_exit_2(run("check", results, "--policy", _write(tmp_path / "p.toml", policy)), expected)


def test_bad_results_and_nothing_to_check(run, tmp_path):
    policy = _write(tmp_path / "p.toml", LIMITS)
    _one_line_exit_2(run("check", _write(tmp_path / "r.json", {"method": "x"}), "--policy", policy),
                     "r.json: not kvc results")
    _one_line_exit_2(run("check", _write(tmp_path / "s.json", _result(**{"summary.kv": None})), "--policy",
                         policy), "s.json: summary.kv must be an object, got None")
    bad_memory = _write(tmp_path / "m.json", _result(**{"memory.nominal_bytes": 0}))
    _one_line_exit_2(run("check", bad_memory, "--policy", policy), "m.json: memory.nominal_bytes must be > 0, got 0")
    _one_line_exit_2(run("check", "--policy", policy), "nothing to evaluate")  # no results, no [run]
    _one_line_exit_2(run("check", tmp_path / "missing.json", "--policy", policy), "cannot read it")
    _one_line_exit_2(run("check", _write(tmp_path / "r.json", RESULT), "--policy", tmp_path / "none.toml"),
                     "policy", "cannot read it")
    without_memory = _write(tmp_path / "plain.json", {k: v for k, v in RESULT.items() if k != "memory"})
    _one_line_exit_2(run("check", without_memory, "--policy", _write(tmp_path / "empty.toml", "")),
                     "checks nothing")


def test_reports_are_results_too(run, tmp_path):
    """A kvc check --json report can be checked again (several results, labels kept)."""
    report = tmp_path / "report.json"
    first, second = _write(tmp_path / "a.json", RESULT), _write(tmp_path / "b.json", _result(method="kivi"))
    policy = _write(tmp_path / "p.toml", LIMITS)
    assert run("check", first, second, "--policy", policy, "--json", report)[0] == 0
    code, stdout, _ = run("check", report, "--policy", policy)
    assert code == 0 and "PASS: 12 checks" in stdout and "b.json" in stdout


def test_peak_memory_sees_tensor_allocations():
    try:  # the system, not the code under test, decides whether the high-water mark can be reset
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("no writable /proc/self/clear_refs on this system")
    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(16_000_000)  # 64 MB: tracemalloc would not see it
        block += 1
    del block
    assert peak.method == "rss_high_water_mark" and 60e6 < peak.bytes < 200e6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_gpu():
    device = torch.device("cuda")
    with peak_memory(device) as peak:
        block = torch.ones(16_000_000, device=device)
        del block
    assert peak.method == "cuda_max_memory_allocated" and 64e6 <= peak.bytes < 70e6


# ----------------------------------------------------------------------------- the repository's CI gate


@pytest.mark.model
def test_ci_policy_against_committed_baseline(run, tmp_path):
    """What CI runs: capture and compress the default model as ci/policy.toml says, gate on the
    committed baseline (regenerate with scripts/make_ci_baseline.py after an intended change)."""
    junit = tmp_path / "kvc-check.xml"
    code, stdout, stderr = run("check", "--policy", ROOT / "ci" / "policy.toml", "--baseline",
                               ROOT / "ci" / "baseline.json", "--junit", junit)
    assert code == 0, stdout + stderr
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    names = {case.get("name") for case in cases}
    assert {"physical file_bytes", "kv.mse_rel vs baseline", "KV GB, 32768 tokens x 8"} <= names
    assert not any(case.find("failure") is not None for case in cases)
