"""kvc plan: the exact multiple-choice knapsack, the budget, plan files, and plans applied by
kvc compress and kvc eval."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import kvc
from kvc.planning import knapsack
from kvc.planning.planfile import read_plan

SYNTH = dict(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=64, seq_len=256, num_seqs=1, strengths=[6.0, 4.0, 3.0])
CANDIDATES = dict(methods="turboquant,eoptshrinkq,fp16", bits=[2, 3])


def brute_force(costs, errors, capacity):
    """The least total error over every combination of choices within ``capacity`` (None: none fits)."""
    best = None
    for combo in itertools.product(*(range(len(w)) for w in costs)):
        if sum(w[j] for w, j in zip(costs, combo)) <= capacity:
            e = sum(err[j] for err, j in zip(errors, combo))
            best = e if best is None else min(best, e)
    return best


def instance(rng: random.Random, integer: bool = True):
    n = rng.randint(1, 5)
    sizes = [rng.randint(1, 4) for _ in range(n)]
    cost = (lambda: rng.randint(0, 9)) if integer else (lambda: rng.uniform(0, 9))
    costs = [[cost() for _ in range(m)] for m in sizes]
    errors = [[rng.uniform(0, 1) for _ in range(m)] for m in sizes]
    return costs, errors


def total(values, choice):
    return sum(v[j] for v, j in zip(values, choice))


# ----------------------------------------------------------------------------- the knapsack


@pytest.mark.parametrize("seed", range(200))
def test_knapsack_equals_brute_force(seed):
    rng = random.Random(seed)
    costs, errors = instance(rng)
    capacity = rng.randint(-1, sum(max(w) for w in costs) + 1)
    choice = knapsack.solve(costs, errors, capacity)
    best = brute_force(costs, errors, capacity)
    if best is None:
        assert choice is None
    else:
        assert total(costs, choice) <= capacity
        assert total(errors, choice) == pytest.approx(best, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_real_costs_never_exceed_the_budget_and_lose_at_most_one_grid_step_per_item(seed, fraction):
    """``allocate`` on real costs: within the capacity, no better than the exact optimum, and at least
    as good as the exact optimum of the capacity less one grid unit per item (the rounding)."""
    rng = random.Random(seed)
    costs, errors = instance(rng, integer=False)
    low, high = sum(min(w) for w in costs), sum(max(w) for w in costs)
    capacity = low + fraction * (high - low)
    grid = 50
    choice = knapsack.allocate(costs, errors, capacity, grid=grid)
    assert choice is not None and total(costs, choice) <= capacity
    assert total(errors, choice) >= brute_force(costs, errors, capacity) - 1e-12
    shrunk = brute_force(costs, errors, capacity - len(costs) * (capacity - low) / grid)
    if shrunk is not None:
        assert total(errors, choice) <= shrunk + 1e-12


def test_budget_edges():
    costs = [[1.5, 3.0, 16.0], [1.25, 4.0, 16.0]]
    errors = [[0.5, 0.1, 0.0], [0.7, 0.2, 0.0]]
    assert knapsack.allocate(costs, errors, 2.75) == [0, 0]  # exactly the cheapest plan
    assert knapsack.allocate(costs, errors, math.nextafter(2.75, 0)) is None  # just below it
    assert knapsack.allocate(costs, errors, 32.0) == [2, 2]  # exactly fp16 everywhere
    assert knapsack.allocate(costs, errors, 5.5) == [0, 1]  # 1.5 + 4: 0.7 error; 3 + 1.25: 0.8
    assert knapsack.solve([[2], [3]], [[1.0], [1.0]], 4) is None


# ----------------------------------------------------------------------------- plans on a capture


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(capture, plan at 2.75 bits, its file) on a synthetic capture."""
    from kvc.io.safetensors import save_safetensors
    from kvc.model.synth import SpikedSpec, synthesize

    folder = tmp_path_factory.mktemp("plan")
    tensors, meta = synthesize(SpikedSpec(**SYNTH))
    capture = folder / "synth.safetensors"
    save_safetensors(capture, tensors, meta.to_strings())
    result = kvc.plan(capture, 2.75, device="cpu", **CANDIDATES)
    path = result.save(folder / "plan.toml")
    return capture, result, path


def test_plan_within_budget_and_compress_counts_its_bits(planned):
    capture, result, path = planned
    assert result.bits_per_entry <= 2.75
    uniform = {u["label"]: u for u in result.uniform}
    within = [u for u in uniform.values() if u["bits_per_entry"] <= 2.75]
    assert result.error <= min(u["error"] for u in within) + 1e-12  # a uniform plan is a feasible plan
    measured = kvc.compress(capture, plan=path, device="cpu")
    assert measured.bits_per_entry == pytest.approx(result.bits_per_entry, rel=1e-12)
    predicted = {(h["layer"], h["tensor"], h["head"]): h["bits_per_entry"] for h in result.heads}
    for row in measured.heads:
        if row["tensor"] != "kv":
            assert row["bits_per_entry"] == pytest.approx(predicted[(row["layer"], row["tensor"], row["head"])], rel=1e-12)
    # the per-tensor errors add up to about the joint error of each head
    assert measured.summary["kv"]["attn_out_rel"] == pytest.approx(result.attn_out_rel, rel=0.15)
    again = kvc.plan(capture, 2.4, points=result)  # the same points, another budget
    assert again.bits_per_entry <= 2.4 and again.error >= result.error
    memory = kvc.plan(capture, memory="1GB", context="32k", batch=8, points=result)  # the default model's cache
    assert memory.budget == pytest.approx(16 * 1e9 / (30 * 3 * 2 * 64 * 2 * 32768 * 8))


def test_uniform_fp16_plan_is_fp16(planned, tmp_path):
    capture, result, path = planned
    text = path.read_text()
    fp16 = "\n".join(line for line in text.splitlines() if line.split(" = ")[0] not in ("options", "bits_per_entry", "error"))
    fp16 = "\n".join('method = "fp16"' if line.startswith("method = ") else line for line in fp16.splitlines())
    (tmp_path / "fp16.toml").write_text(fp16)
    plan = kvc.compress(capture, plan=tmp_path / "fp16.toml", device="cpu")
    reference = kvc.compress(capture, "fp16", device="cpu")
    assert plan.bits_per_entry == 16.0
    assert plan.summary == reference.summary


def test_plan_cli_writes_the_file_and_refuses_bad_budgets(planned, run, tmp_path):
    capture, result, _ = planned
    out = tmp_path / "p.toml"
    code, stdout, err = run("plan", capture, "--budget", "2.75", "--methods", CANDIDATES["methods"], "--bits", "2,3",
                            "-o", out, "--device", "cpu", "--json", tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert code == 0, err
    assert read_plan(out).heads == result.spec.heads and "bits per entry by layer" in stdout
    assert json.loads((tmp_path / "p.json").read_text()) == {**result.to_json(), "capture": str(capture)}
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    for budget, message in (("17", "above fp16's 16"), ("abc", "'--budget'"), ("0", "must be > 0"),
                            ("1", "below the cheapest plan of these candidates (2.")):
        code, _, err = run("plan", capture, "--budget", budget, "--methods", "turboquant", "--bits", "2", "-o",
                           tmp_path / "x.toml", "--device", "cpu")
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run("plan", capture, "--memory", "1GB", "--budget", "3", "-o", tmp_path / "x.toml")
    assert code == 2 and "not both" in err


def test_memory_budget_uses_kvc_budget_arithmetic():
    from kvc.ci.budget import geometry_from_dims, sequence_bytes
    from kvc.planning.allocate import memory_budget

    geometry = geometry_from_dims(30, 3, 64)
    fp16 = sequence_bytes(geometry, 32768) * 8  # 8 sequences of 32k tokens in fp16
    assert fp16 == 30 * 3 * 2 * 64 * 2 * 32768 * 8
    assert memory_budget(f"{fp16 / 4 / 1e9}GB", geometry, 32768, 8) == pytest.approx(4.0)
    assert memory_budget(f"{fp16 / 2**30}GiB", geometry, 32768, 8) == pytest.approx(16.0)


# ----------------------------------------------------------------------------- hostile plan files


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "\n[[heads]\n", "not valid TOML"),
    (lambda t: t.replace("version = 1", "version = 7"), "version 7"),
    (lambda t: t.replace("version = 1", 'version = "1"'), "version must be an integer"),
    (lambda t: t.replace("num_kv_heads = 2", "num_kv_heads = 3"), "layer 0 has no row for tensor k head 2"),
    (lambda t: t.replace("head_dim = 64", "head_dim = -1"), "head_dim must be an integer in 1..65536"),
    (lambda t: t.replace("version = 1", "version = 1\nsurprise = 1"), "unknown key surprise"),
    (lambda t: t.replace('tensor = "k"', 'tensor = "q"', 1), 'heads[0].tensor must be one of k, v'),
    (lambda t: t.replace("layer = 0", "layer = 9", 1), "heads[0].layer must be an integer in 0..1"),
    (lambda t: t.replace("head = 1", "head = 0", 1), "repeats layer 0 tensor k head 0"),
    (lambda t: t.replace("method = ", 'method = "nope"\nx = ', 1), "unknown key heads[0].x"),
    (lambda t: _first_method(t, "nope"), "heads[0]: unknown method 'nope'"),
    (lambda t: _first_method(t, "snapkv"), "heads[0]: method snapkv does not compress K and V separately"),
    (lambda t: t.replace("bits = ", "bits = 99 } \n#", 1), "--bits must be in"),
    (lambda t: "\n[[heads]]".join(t.split("\n[[heads]]")[:-1]) + "\n", "layer 1 has no row for tensor v head 1"),
    (lambda t: "version = 1\nheads = " + "[" * 100 + "]" * 100 + "\n", "nested deeper"),
])
def test_hostile_plan_files_exit_2_naming_the_key(planned, run, tmp_path, edit, message):
    capture, _, path = planned
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(path.read_text()))
    code, _, err = run("compress", capture, "--plan", bad, "--device", "cpu")
    assert code == 2 and message in err and err.count("\n") == 1, err


def _first_method(text: str, name: str) -> str:
    head, _, rest = text.partition("\nmethod = ")
    return head + f'\nmethod = "{name}"\noptions = {{}}\n' + rest.split("\n", 2)[2]


def test_plan_of_another_model_shape_exits_2(planned, run, synth_capture):
    _, _, path = planned
    other = synth_capture(**{**SYNTH, "num_kv_heads": 1, "num_heads": 2})
    code, _, err = run("compress", other, "--plan", path, "--device", "cpu")
    assert code == 2 and "another model shape" in err and "num_kv_heads 2 vs 1" in err


def test_plan_and_method_together_exit_2(planned, run):
    capture, _, path = planned
    code, _, err = run("compress", capture, "--plan", path, "--method", "fp16")
    assert code == 2 and "one of them" in err
    code, _, err = run("compress", capture, "--plan", path, "--bits", "2")
    assert code == 2 and "--plan takes no method options" in err


# ----------------------------------------------------------------------------- eval on a tiny model


def test_eval_plan_on_a_tiny_model(tmp_path, tiny, run):
    model, text = tiny
    rows = []
    for layer, tensor, head in itertools.product(range(2), "kv", range(2)):
        method = "fp16" if head == 0 else "turboquant"
        options = "{ bits = 2 }" if method == "turboquant" else "{}"
        rows.append(f'[[heads]]\nlayer = {layer}\ntensor = "{tensor}"\nhead = {head}\nmethod = "{method}"\n'
                    f"options = {options}\n")
    plan = tmp_path / "plan.toml"
    plan.write_text('version = 1\nmodel = "tiny"\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 32\n\n' + "\n".join(rows))
    settings = dict(contexts=[32], windows=1, continuation=8, retrieval=False, device="cpu")
    mixed = kvc.evaluate(model=str(model), text=text, plan=plan, **settings)
    assert mixed.method == "plan" and 2 < mixed.bits_per_entry < 16
    assert mixed.perplexity["kl"] > 0
    all_fp16 = plan.read_text().replace('"turboquant"', '"fp16"').replace("{ bits = 2 }", "{}")
    plan.write_text(all_fp16)
    fp16 = kvc.evaluate(model=str(model), text=text, plan=plan, **settings)
    reference = kvc.evaluate("fp16", str(model), text, **settings)
    assert fp16.perplexity == reference.perplexity and fp16.bits_per_entry == 16.0
    lm, tokenizer = kvc.load_model(str(model), device="cpu")
    with kvc.compressing(lm, kvc.load_plan(plan)) as state:
        lm.generate(tokenizer("The keys", return_tensors="pt").input_ids, max_new_tokens=2, do_sample=False)
    assert state.bits_per_entry == 16.0
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(all_fp16.replace("head_dim = 32", "head_dim = 64"))
    code, _, err = run("eval", "--plan", wrong, "--model", model, "--text", text, "--contexts", "32", "--windows", "1",
                       "--continuation", "8", "--no-retrieval", "--device", "cpu")
    assert code == 2 and "another model shape" in err, err


# ----------------------------------------------------------------------------- --predict


@pytest.fixture(scope="module")
def predicted(planned):
    capture, measured, _ = planned
    return kvc.plan(capture, 2.75, device="cpu", predict=True, **CANDIDATES)


def test_predicted_plan_is_within_budget_and_its_prediction_error_is_the_measured_one(planned, predicted, tmp_path):
    capture, measured, _ = planned
    report = predicted.to_json()["prediction"]
    assert report["predicted_candidates"] == ["turboquant 3", "eoptshrinkq 2", "eoptshrinkq 3"]  # anchor turboquant 2
    assert predicted.bits_per_entry <= 2.75
    # independently: every candidate measured (kvc.plan without --predict), at the predicted plan's choices
    labels = [c.label for c in measured.points.candidates]
    index = {label: i for i, label in enumerate(labels)}
    rd, layers = measured.points, measured.points.layers
    truth = sum(float(rd.errors[index[h["label"]], layers.index(h["layer"]), "kv".index(h["tensor"]), h["head"]])
                for h in predicted.heads)
    assert report["measured_error"] == pytest.approx(truth, rel=1e-9)
    assert report["predicted_error"] == pytest.approx(sum(h["error"] for h in predicted.heads), rel=1e-12)
    assert report["error_rel"] == pytest.approx(report["predicted_error"] / truth - 1, rel=1e-9)
    compressed = kvc.compress(capture, plan=predicted.save(tmp_path / "p.toml"), device="cpu")
    assert report["measured_bits_per_entry"] == pytest.approx(compressed.bits_per_entry, rel=1e-12)
    assert report["bits_rel"] == pytest.approx(predicted.bits_per_entry / compressed.bits_per_entry - 1, abs=1e-12)
    errors = {(h["layer"], h["tensor"], h["head"]): h["error"] for h in predicted.heads}
    pred = [errors[(L, t, h)] for L in layers for t in "kv" for h in range(SYNTH["num_kv_heads"])]
    true = [float(rd.errors[index[next(x["label"] for x in predicted.heads if (x["layer"], x["tensor"], x["head"])
                                       == (L, t, h))], layers.index(L), "kv".index(t), h])
            for L in layers for t in "kv" for h in range(SYNTH["num_kv_heads"])]
    assert report["spearman"] == pytest.approx(float(stats.spearmanr(pred, true).statistic), abs=1e-12)
    # the anchor's errors are the measured ones; fp16 (no closed form) is measured
    for label in ("turboquant 2", "fp16"):
        assert torch.equal(predicted.points.errors[index[label]], rd.errors[index[label]])


def test_predicted_mse_is_the_measured_one(planned):
    """TurboQuant's D_b (docs/methods.md#error-decomposition: 0.1145 at d = 64, b = 2) and eoptshrinkq's
    spectral prediction against the relative squared error of the coded tensor."""
    from kvc.compression import engine
    from kvc.compression.registry import build
    from kvc.io.capture import CaptureFile
    from kvc.planning.allocate import predicted_mse

    capture, _, _ = planned
    layer = engine.load_layer(CaptureFile(capture), 0)
    gauss = torch.randn(layer.v.shape, generator=torch.Generator().manual_seed(0))
    for name, opts, x, tol in (("turboquant", {"bits": 2}, gauss, 0.03), ("eoptshrinkq", {"bits": 2}, layer.v, 0.1)):
        comp = build(name, **opts)
        layer_x = dataclasses.replace(layer, v=x)
        _, decoded, _ = engine.encode_decode(comp, layer_x)
        measured = (decoded.v - x).double().square().sum((0, 2, 3)) / x.double().square().sum((0, 2, 3))
        predicted = predicted_mse(comp, x)
        if name == "turboquant":
            assert predicted.tolist() == pytest.approx([0.1145] * SYNTH["num_kv_heads"], abs=5e-4)
        assert predicted.tolist() == pytest.approx(measured.tolist(), rel=tol)
    assert predicted_mse(build("turboquant", bits=2.5), gauss) is None  # the channel split: measured


def test_plan_cli_predict_reports_the_prediction_error(planned, predicted, run, tmp_path):
    capture, _, _ = planned
    code, stdout, err = run("plan", capture, "--budget", "2.75", "--methods", CANDIDATES["methods"], "--bits", "2,3",
                            "-o", tmp_path / "p.toml", "--device", "cpu", "--predict")
    assert code == 0, err
    p = predicted.to_json()["prediction"]
    assert f"total error {p['predicted_error']:.4g} vs {p['measured_error']:.4g}" in stdout
    code, _, err = run("plan", capture, "--budget", "3", "--methods", "kvquant,fp16", "--bits", "2", "-o",
                       tmp_path / "x.toml", "--device", "cpu", "--predict")
    assert code == 2 and "--predict needs a candidate" in err and err.count("\n") == 1, err
