"""kvc sweep --e2e: each run's method inside the real default model, with the proxy correlation."""

from __future__ import annotations

import functools
import json
import math

import pytest

from kvc.eval import evaluate
from kvc.model.load import DEFAULT_MODEL_NAME

# the column's plumbing needs no long context (end_to_end's default: 2 windows of 512 tokens + 64 scored)
SHORT = evaluate.Settings(contexts=(128,), windows=1, continuation=16, retrieval=False)


@pytest.mark.model
def test_sweep_end_to_end_column(run, tmp_path, default_capture, monkeypatch):
    monkeypatch.setattr(evaluate, "end_to_end", functools.partial(evaluate.end_to_end, settings=SHORT))
    code, out, err = run("sweep", default_capture[0], "--layers", "0", "--methods", "turboquant", "--bits", "1,2,4",
                         "--keys", "post", "--e2e", "--model", DEFAULT_MODEL_NAME, "-o", tmp_path / "sweep")
    assert code == 0, err
    assert "end to end" in out
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    deltas = {run["bits"]: run["e2e"]["ppl_delta_rel"] for run in report["runs"]}
    assert set(deltas) == {1.0, 2.0, 4.0} and all(math.isfinite(d) for d in deltas.values())
    assert deltas[1.0] > deltas[4.0]  # fewer bits hurt the model more
    assert set(report["e2e_rank_correlation"]) == {"mse_rel", "attn_out_rel", "attn_kl"}
