"""``--seeds N``: means and Student-t intervals over seeds in compress and sweep, and the bounds of
the bit saving at equal mse (docs/methods.md#seed-noise)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

import kvc
from kvc.metrics.pareto import savings
from kvc.metrics.seeds import mean_ci

T_975_1 = 12.706204736174698  # t_{0.975} with 1 degree of freedom = tan(pi * 0.475) (Cauchy quantile)


def test_mean_ci_closed_form():
    assert T_975_1 == pytest.approx(math.tan(math.pi * 0.475))
    ci = mean_ci([1.0, 3.0])  # mean 2, s = sqrt(2), half = t * s / sqrt(2) = t
    assert ci["mean"] == 2 and ci["n"] == 2
    assert ci["half_width"] == pytest.approx(T_975_1)
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(2 - T_975_1), pytest.approx(2 + T_975_1))
    assert mean_ci([5.0, None]) == {"mean": 5.0, "half_width": None, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_ci([None])["mean"] is None
    # large n: the interval tends to the normal one, 1.96 s / sqrt(n)
    xs = [float(i % 7) for i in range(10_000)]
    assert mean_ci(xs)["half_width"] == pytest.approx(1.96 * statistics.stdev(xs) / 100, rel=1e-3)


@pytest.fixture
def capture(synth_capture):
    return synth_capture(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=32, seq_len=64)


def test_compress_seeds_are_the_separate_runs(capture):
    """--seeds 3 from --seed 5 = the runs with seeds 5, 6, 7: their mean, and the t interval of the
    three values; the arrays and heads are those of seed 5."""
    combined = kvc.compress(capture, "turboquant", bits=2, seed=5, seeds=3)
    single = [kvc.compress(capture, "turboquant", bits=2, seed=s) for s in (5, 6, 7)]
    assert combined.seeds["seeds"] == [5, 6, 7] and combined.seeds["level"] == 0.95
    assert combined.heads == single[0].heads and combined.array_bytes == single[0].array_bytes
    for t, metric in (("k", "ip_bias_rel"), ("k", "mse_rel"), ("kv", "attn_out_rel")):
        values = [s.summary[t][metric] for s in single]
        assert len(set(values)) == 3  # the seed moves a randomized method
        ci = combined.seeds["summary"][t][metric]
        half = 4.302652729911275 * statistics.stdev(values) / math.sqrt(3)  # t_{0.975, 2}
        assert combined.summary[t][metric] == pytest.approx(statistics.fmean(values))
        assert ci["mean"] == pytest.approx(statistics.fmean(values))
        assert ci["half_width"] == pytest.approx(half)
    assert combined.bits_per_entry == pytest.approx(single[0].bits_per_entry)


def test_default_output_has_no_seed_keys(capture, run, tmp_path):
    one = kvc.compress(capture, "turboquant", bits=2)
    assert one.seeds is None and "seeds" not in one.to_json()
    out = tmp_path / "sweep"
    sweep = kvc.sweep(capture, methods="turboquant", bits=[2], keys="post", compare=[])
    assert "seeds" not in sweep.to_json() and "seeds" not in sweep.runs[0]["result"]
    code, _, err = run("compress", capture, "--method", "turboquant", "--seeds", "0")
    assert code == 2 and err.strip().splitlines() == ["kvc: error: --seeds must be a positive integer, not 0"]
    code, _, err = run("sweep", capture, "--methods", "turboquant", "--seeds", "-1", "-o", out)
    assert code == 2 and "--seeds must be a positive integer, not -1" in err and not out.exists()


def _run(method: str, bits: float, mean: float, low: float, high: float) -> dict:
    stats = {"mean": mean, "ci_low": low, "ci_high": high}
    return {"method": method, "bits": bits, "keys": "post", "view": "k", "values": False,
            "result": {"summary": {"k": {"mse_rel": mean, "bits_per_entry": bits}},
                       "seeds": {"summary": {"k": {"mse_rel": stats}}}}}


def test_saving_bounds_closed_form():
    """Reference errors 10^-(b-1) at b = 2, 3, 4 bits (exact in the log-linear interpolation): at
    error e it needs 1 - log10 e bits. A point at 2.5 bits with mse 0.01 in [0.005, 0.02] saves
    0.5 bits, bounded by 1 - log10(0.02) - 2.5 and 1 - log10(0.005) - 2.5."""
    ref = [_run("ref", b, 10.0 ** (1 - b), 10.0 ** (1 - b), 10.0 ** (1 - b)) for b in (2, 3, 4)]
    clear = _run("new", 2.5, 0.01, 0.005, 0.02)
    noisy = _run("new", 3.2, 0.01, 0.002, 0.05)  # saving -0.2, bounds straddle 0
    rows = savings(ref + [clear, noisy], [("new", "ref")])["new_vs_ref"]["k"]
    first, second = sorted(rows, key=lambda r: r["bits_per_entry"])
    assert first["saving"] == pytest.approx(0.5)
    assert first["saving_low"] == pytest.approx(1 - math.log10(0.02) - 2.5)
    assert first["saving_high"] == pytest.approx(1 - math.log10(0.005) - 2.5)
    assert first["ci_overlap"] is False
    assert second["saving"] == pytest.approx(-0.2)
    assert second["saving_low"] < 0 < second["saving_high"] and second["ci_overlap"] is True
    # without seeds the rows keep their keys
    plain = [{**r, "result": {"summary": r["result"]["summary"]}} for r in ref + [clear]]
    assert "ci_overlap" not in savings(plain, [("new", "ref")])["new_vs_ref"]["k"][0]


def test_sweep_seeds(capture, run, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = run("sweep", capture, "--methods", "turboquant,int", "--bits", "2,3,4", "--keys", "post",
                            "--compare", "turboquant:int", "--seeds", "2", "-o", out)
    assert code == 0, err
    report = json.loads((out / "sweep.json").read_text())
    assert report["seeds"] == [0, 1]
    for r in report["runs"]:
        assert r["result"]["seeds"]["seeds"] == [0, 1]
        assert r["result"]["summary"]["k"]["mse_rel"] == r["result"]["seeds"]["summary"]["k"]["mse_rel"]["mean"]
    rows = [row for rows in report["savings"]["turboquant_vs_int"].values() for row in rows]
    assert rows and all("ci_overlap" in row for row in rows)
    assert "±" in stdout
