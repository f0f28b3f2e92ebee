"""kvc sweep --e2e: each run's method inside the real default model, with the proxy correlation."""

from __future__ import annotations

import json
import math

import pytest

from kvc.model.load import DEFAULT_MODEL_NAME


@pytest.mark.model
def test_sweep_end_to_end_column(run, tmp_path):
    capture = tmp_path / "c.safetensors"
    code, _, err = run("capture", "--layers", "0", "--seq-len", "128", "--num-seqs", "1", "-o", capture)
    assert code == 0, err
    code, out, err = run("sweep", capture, "--methods", "turboquant", "--bits", "1,2,4", "--keys", "post",
                         "--e2e", "--model", DEFAULT_MODEL_NAME, "-o", tmp_path / "sweep")
    assert code == 0, err
    assert "end to end" in out
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    deltas = {run["bits"]: run["e2e"]["ppl_delta_rel"] for run in report["runs"]}
    assert set(deltas) == {1.0, 2.0, 4.0} and all(math.isfinite(d) for d in deltas.values())
    assert deltas[1.0] > deltas[4.0]  # fewer bits hurt the model more
    assert set(report["e2e_rank_correlation"]) == {"mse_rel", "attn_out_rel", "attn_kl"}
