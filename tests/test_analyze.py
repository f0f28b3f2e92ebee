"""``kvc analyze`` end to end on synthetic captures with a planted answer, bad input, the real model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kvc.analysis import report as analyze
from kvc.io.safetensors import save_safetensors

PLANTED = [3, 17]
REQUIRED = ("layer", "head", "tensor", "seq", "block", "n", "d", "rank", "bulk_edge", "sigma", "bbp_threshold",
            "singular_values", "shrunk", "energy_lowrank", "predicted_bit_saving", "outlier_channels",
            "thin_shell_cv", "deloc_max")


@pytest.fixture
def synth(run, tmp_path):
    """make(*extra synth args) -> capture by `kvc synth`: rank 3 per sequence (spikes drawn per sequence)."""

    def _make(*extra, name="synth.safetensors"):
        path = tmp_path / name
        code, _, err = run("synth", "-o", path, "--layers", 2, "--kv-heads", 2, "--heads", 4, "--head-dim", 64,
                           "--seq-len", 256, "--num-seqs", 2, "--seed", 1, *extra)
        assert code == 0, err
        return path

    return _make


def _report(run, tmp_path, capture, *args):
    out = tmp_path / "report.json"
    code, stdout, err = run("analyze", capture, "--json", out, "--force", *args)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


def test_json_report_finds_planted_outliers(run, tmp_path, synth):
    report, stdout = _report(run, tmp_path, synth("--outlier-channels", "3,17"))
    assert set(report) >= {"heads", "summary"}
    heads = report["heads"]
    assert len(heads) == 2 * 2 * 3  # layers x KV heads x (k_pre, k, v)
    for rec in heads:
        assert all(key in rec for key in REQUIRED)
        assert rec["seq"] is None and rec["block"] is None and (rec["n"], rec["d"]) == (512, 64)
        assert len(rec["singular_values"]) == 16 and len(rec["shrunk"]) == rec["rank"]
        assert rec["skipped"] is None and len(rec["channel_kurtosis"]) == 64
        if rec["tensor"] in ("k_pre", "v"):  # synth scales these channels of k_pre and v
            assert rec["outlier_channels"] == PLANTED
    assert sorted(rec["tensor"] for rec in heads) == sorted(["k_pre", "k", "v"] * 4)
    summary = report["summary"]
    assert summary["tensors"]["v"]["records_with_outliers"] == 4
    assert summary["tensors"]["v"]["top_outlier_channels"] == [[3, 4], [17, 4]]
    assert summary["rope"]["outliers_pre"] == 2 * 2 * 2 and len(report["rope"]) == 2 * 2
    assert "reading" in stdout and "Keys before RoPE" in stdout


def test_planted_band_is_one_band_and_isolated_outliers_stay_outliers(run, tmp_path, synth):
    band = list(range(40, 48))
    report, stdout = _report(run, tmp_path, synth("--outlier-channels", ",".join(map(str, [3, 17] + band)),
                                                  "--outlier-scale", 12))
    assert sorted(rec["tensor"] for rec in report["heads"]) == sorted(["k_pre", "k", "v"] * 4)
    for rec in report["heads"]:
        if rec["tensor"] in ("k_pre", "v"):
            assert rec["outlier_channels"] == PLANTED and rec["bands"] == [[40, 47]], rec["tensor"]
            assert len(rec["outlier_rms_ratio"]) == 2
    summary = report["summary"]
    assert summary["band_min"] == 4
    for name in ("k_pre", "v"):
        t = summary["tensors"][name]
        assert t["records_with_bands"] == t["records_with_outliers"] == 4
        assert t["top_bands"] == [[[40, 47], 4]] and t["top_outlier_channels"] == [[3, 4], [17, 4]]
    assert all(row["v"]["records_with_bands"] == 2 for row in summary["per_layer"])
    assert all(r["outliers_pre"] == PLANTED and r["bands_pre"] == [[40, 47]] for r in report["rope"])
    assert summary["rope"]["bands_pre"] == 4
    assert "most often ch 40-47 (band, 8 channels) in k_pre (4x)" in summary["reading"]
    assert "Bands (runs of >= 4 adjacent flagged channels" in summary["reading"]
    worst = [r for r in summary["worst_heads"] if r["tensor"] in ("k_pre", "v")]
    assert worst and all(r["bands"] == [[40, 47]] for r in worst)
    assert "ch 40-47 (band, 8" in stdout  # the heads table
    assert "2+2b/" in stdout  # the per-layer table: 2 k_pre records with outliers, 2 of them with a band


def test_json_report_recovers_the_planted_rank(run, tmp_path, synth):
    capture = synth()
    report, _ = _report(run, tmp_path, capture, "--per-seq")
    assert sorted(rec["tensor"] for rec in report["heads"]) == sorted(["k_pre", "k", "v"] * 8)  # x 2 seqs
    for rec in report["heads"]:
        if rec["tensor"] in ("k_pre", "v"):  # rank 3 per sequence; bulk edge between y_3 and y_4
            assert rec["rank"] == 3 and rec["outlier_channels"] == []
            assert rec["singular_values"][3] < rec["bulk_edge"] < rec["singular_values"][2]
            assert rec["bbp_threshold"] < min(rec["d_hat"]) and 0 < rec["energy_lowrank"] < 1
            assert all(0 < s < y for s, y in zip(rec["shrunk"], rec["singular_values"]))
    # rho = 61 / (61 + 64) of the energy is planted: just under the 50 % "low-rank layer" mark
    assert "Values are not low-rank in any of 2 layers: median rank 3, 4" in report["summary"]["reading"]
    report, _ = _report(run, tmp_path, capture)  # pooled: each sequence has its own 3 spikes
    assert {r["rank"] for r in report["heads"] if r["tensor"] != "k"} == {6}


def test_blocks_and_sequences(run, tmp_path, synth):
    capture = synth()
    report, _ = _report(run, tmp_path, capture, "--block", 100, "--tensors", "v")
    heads = report["heads"]
    assert len(heads) == 2 * 2 * 2 * 2  # layers x seqs x blocks (256 // 100) x heads; the 56-token tail is left out
    assert {(r["seq"], r["block"]) for r in heads} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(r["n"] == 100 and r["tensor"] == "v" for r in heads)
    report, _ = _report(run, tmp_path, capture, "--per-seq", "--rank-rule", "matlab", "--layers", "1")
    assert {(r["layer"], r["seq"], r["n"]) for r in report["heads"]} == {(1, 0, 256), (1, 1, 256)}
    assert report["summary"]["rank_rule"] == "matlab"


def test_fewer_tokens_than_channels_and_too_few_for_the_rule(run, tmp_path, synth):
    capture = synth()
    report, _ = _report(run, tmp_path, capture, "--block", 32, "--tensors", "k_pre")  # n = 32 < d = 64: transposed
    assert all(r["n"] == 32 and r["rank"] is not None for r in report["heads"])
    report, stdout = _report(run, tmp_path, capture, "--block", 2)
    assert all(r["rank"] is None and "at least 3" in r["skipped"] for r in report["heads"])
    assert all(len(r["outlier_channels"]) <= 64 for r in report["heads"])
    assert "skipped" in stdout


def test_topk_outliers_and_stdout_json(run, synth):
    code, stdout, err = run("analyze", synth(), "--json", "-", "--outlier-topk", 1, "--layers", "0")
    assert code == 0, err
    report = json.loads(stdout)
    assert all(len(r["outlier_channels"]) == 1 for r in report["heads"])
    assert "reading" in err  # the human summary moves to stderr


def test_plots_are_written(run, tmp_path, synth):
    plots = tmp_path / "plots"
    code, _, err = run("analyze", synth(), "--plots", plots)
    assert code == 0, err
    for name in ("scree.png", "rank_heatmap.png", "channel_magnitude.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run("analyze", synth(name="again.safetensors"), "--plots", plots)
    assert code == 2 and "--force" in err


def test_rope_comparison_finds_rotation_partners(synth):
    """Planted k_pre outliers 3 and 17 spread onto their RoPE partners 35 and 49 after rotation."""
    from kvc.io.capture import CaptureFile

    cap = CaptureFile(synth("--outlier-channels", "3,17"))
    options = analyze.Options(outlier_factor=4.0)
    report = analyze.analyze_capture(cap, [0], ["k_pre", "k"], options, torch.device("cpu"))
    for rec in report.rope:
        assert rec["outliers_pre"] == PLANTED
        assert set(rec["only_post_from_partner"]) <= {35, 49} and rec["only_post_from_partner"]


def test_not_a_capture(run, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code, _, err = run("analyze", text)
    assert code == 2 and "not a readable safetensors" in err
    foreign = tmp_path / "foreign.safetensors"
    save_safetensors(foreign, {"w": torch.zeros(2)}, {"format": "pt"})
    code, _, err = run("analyze", foreign)
    assert code == 2 and "not a kvc capture" in err
    code, _, err = run("analyze", tmp_path / "missing.safetensors")
    assert code == 2 and "no such file" in err


def _read(path):
    """(tensors, metadata) of a safetensors file, to rewrite it."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def test_nan_names_layer_and_head(run, tmp_path, synth):
    tensors, meta = _read(synth())
    tensors["layers.1.v"][1, 1, 7, 5] = float("nan")
    tensors["layers.1.v"][0, 1, 9, 2] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, tensors, meta)
    code, _, err = run("analyze", bad)
    assert code == 2
    assert "tensor layers.1.v holds NaN/Inf values: head 1 (2 entries)" in err and "head 0" not in err


def test_bad_options(run, tmp_path, synth):
    capture = synth()
    for args, message in [
        (("--tensors", "q"), "choose from k_pre, k, v"),
        (("--rank-rule", "bbp"), "--rank-rule"),
        (("--block", 0), "--block"),
        (("--block", 1000), "longer than"),
        (("--layers", "7"), "--layers"),
        (("--outlier-topk", 65), "--outlier-topk"),
        (("--device", "tpu"), "--device"),
    ]:
        code, _, err = run("analyze", capture, *args)
        assert code == 2 and message in err, (args, err)
    no_rope = synth("--no-rope", name="norope.safetensors")
    code, _, err = run("analyze", no_rope, "--tensors", "k_pre")
    assert code == 2 and "lacks k_pre" in err
    report, _ = _report(run, tmp_path, no_rope)
    assert {r["tensor"] for r in report["heads"]} == {"k", "v"} and report["rope"] == []
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    code, _, err = run("analyze", capture, "--json", existing)
    assert code == 2 and "--force" in err


@pytest.mark.model
def test_real_default_model_end_to_end(run, tmp_path, default_capture):
    report, stdout = _report(run, tmp_path, default_capture[0], "--layers", "0,1", "--plots", tmp_path / "plots")
    heads = report["heads"]
    assert {(r["layer"], r["tensor"]) for r in heads} == {(layer, t) for layer in (0, 1) for t in ("k_pre", "k", "v")}
    assert all(r["skipped"] is None and r["rank"] >= 0 and (r["n"], r["d"]) == (256, 64) for r in heads)
    assert report["summary"]["reading"] and "Keys before RoPE" in stdout


def _without_run_info(report: dict) -> dict:
    return {**report, "summary": {k: v for k, v in report["summary"].items()
                                  if k not in ("capture", "seconds", "created")}}


def test_foreign_rope_without_inv_freq(run, tmp_path, synth):
    """rope with theta and rotary_dims only (another writer): analyze and compress read it as kvc's own."""
    capture = synth("--outlier-channels", "3,17")
    tensors, meta = _read(capture)
    rope = json.loads(meta["rope"])
    assert rope["theta"] == 10000.0 and rope["rotary_dims"] == 64
    foreign = tmp_path / "foreign.safetensors"
    save_safetensors(foreign, tensors, {**meta, "rope": json.dumps({"theta": 10000.0, "rotary_dims": 64})})
    ours, _ = _report(run, tmp_path, capture)
    theirs, _ = _report(run, tmp_path, foreign)
    assert _without_run_info(theirs) == _without_run_info(ours) and theirs["rope"]
    results = []
    for path in (capture, foreign):  # keys before RoPE: the decoded keys are rotated with the derived table
        out = tmp_path / f"{path.stem}.json"
        code, _, err = run("compress", path, "--method", "eoptshrinkq", "--json", out)
        assert code == 0, err
        results.append(json.loads(out.read_text())["heads"])
    for a, b in zip(*results):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in a if k not in ("layer", "head", "tensor"))
    broken = tmp_path / "broken.safetensors"
    save_safetensors(broken, tensors, {**meta, "rope": json.dumps({"rotary_dims": 64})})
    code, _, err = run("analyze", broken)
    assert code == 2 and "needs inv_freq, or theta and rotary_dims" in err


def test_noise_only_layer_has_rank_zero(run, tmp_path, synth_capture):
    """Layer 1 holds no spike in any head or tensor: rank 0 everywhere it is reported, exit 0."""
    spiked, meta = _read(synth_capture(name="spiked.safetensors", seed=2))
    noise, _ = _read(synth_capture(name="noise.safetensors", strengths=[], seed=3))
    mixed = tmp_path / "mixed.safetensors"
    save_safetensors(mixed, {**spiked, **{k: v for k, v in noise.items() if k.startswith("layers.1.")}}, meta)
    for args in ((), ("--per-seq", "--plots", tmp_path / "seq"), ("--block", 128, "--plots", tmp_path / "block")):
        report, stdout = _report(run, tmp_path, mixed, *args)  # pooled plots: noise_only below
        by_layer = {layer: [r for r in report["heads"] if r["layer"] == layer] for layer in (0, 1)}
        assert all(r["rank"] == 0 and r["d_hat"] == [] and r["shrunk"] == [] and r["energy_lowrank"] == 0
                   and r["skipped"] is None for r in by_layer[1]), args
        assert all(r["rank"] >= 3 for r in by_layer[0] if r["tensor"] in ("k_pre", "v")), args
        rows = {row["layer"]: row for row in report["summary"]["per_layer"]}
        assert all(rows[1][t]["median_rank"] == 0 for t in ("k_pre", "k", "v"))
        assert {r["rank_pre"] for r in report["rope"] if r["layer"] == 1} == {0}
    noise_only = synth_capture(name="noise_only.safetensors", strengths=[])
    report, stdout = _report(run, tmp_path, noise_only, "--plots", tmp_path / "plots")
    assert {r["rank"] for r in report["heads"]} == {0}
    assert report["summary"]["tensors"]["v"]["median_rank"] == 0
    assert "Values are not low-rank in any of 2 layers: median rank 0, 0%" in report["summary"]["reading"]
    for method in ("eoptshrinkq", "svdq"):  # rank 0: the residual quantizer alone
        out = tmp_path / f"{method}.json"
        code, _, err = run("compress", noise_only, "--method", method, "--block", 128, "--json", out)
        assert code == 0, err
        result = json.loads(out.read_text())
        assert result["bits_per_entry_paper"] == 2.0 and 0 < result["summary"]["kv"]["mse_rel"] < 0.15


# ----------------------------------------------------------------------------- MLA-style latent

LATENT_ENERGY = [0.5, 0.3, 0.12, 0.06, 0.02]  # cumulative 0.5, 0.8, 0.92, 0.98, 1: r(90/95/99%) = 3/4/5


def _joint_lowrank_capture(tmp_path, kv_heads=2, head_dim=16, seq_len=64, num_seqs=2):
    """A capture whose joint [K_pre of all heads | V of all heads] of every layer is exactly
    U diag(s) W^T with s_i^2 = LATENT_ENERGY_i (orthonormal U over the S*T tokens, W over 2*H*D)."""
    from kvc.model.synth import SpikedSpec, _orthonormal, synthesize
    from kvc.rope import apply_rope

    spec = SpikedSpec(num_layers=2, num_kv_heads=kv_heads, num_heads=2 * kv_heads, head_dim=head_dim,
                      seq_len=seq_len, num_seqs=num_seqs, seed=3)
    tensors, meta = synthesize(spec)
    gen = torch.Generator().manual_seed(5)
    r = len(LATENT_ENERGY)
    for layer in range(2):
        u = _orthonormal((num_seqs * seq_len,), r, gen)
        w = _orthonormal((2 * kv_heads * head_dim,), r, gen)
        joint = (u * torch.tensor(LATENT_ENERGY, dtype=torch.float64).sqrt()) @ w.T  # [S*T, 2*H*D]
        kv = joint.reshape(num_seqs, seq_len, 2 * kv_heads, head_dim).permute(0, 2, 1, 3)
        k_pre, v = kv[:, :kv_heads], kv[:, kv_heads:]
        tensors[f"layers.{layer}.k_pre"] = k_pre.float()
        tensors[f"layers.{layer}.k"] = apply_rope(k_pre, torch.arange(seq_len), meta.rope, layer).float()
        tensors[f"layers.{layer}.v"] = v.float()
    path = tmp_path / "joint.safetensors"
    save_safetensors(path, tensors, meta.to_strings())
    return path


def test_energy_rank_closed_form():
    s = torch.tensor(LATENT_ENERGY, dtype=torch.float64).sqrt() * 7.0
    assert analyze.rmt.energy_rank(s, (0.5, 0.9, 0.95, 0.99, 1.0)).tolist() == [1, 3, 4, 5, 5]
    assert analyze.rmt.energy_rank(s.expand(3, 5), (0.8,)).tolist() == [[2]] * 3


@pytest.mark.parametrize("block", [16, 48, 100])
def test_lower_gram_is_the_lower_block_triangle(block):
    """Blocks that divide the width and ones that do not: each column block holds Z^T Z's entries
    from its own diagonal block down, and zeros above; eigvalsh(UPLO="L") of it gives the full
    Gram's eigenvalues."""
    Z = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    gram, full = analyze.lower_gram(Z, block), Z.mT @ Z
    index = torch.arange(96) // block
    kept = index[:, None] >= index[None, :]  # row block >= column block
    torch.testing.assert_close(gram[kept], full[kept], rtol=1e-5, atol=1e-4)
    assert not gram[~kept].any()
    torch.testing.assert_close(torch.linalg.eigvalsh(gram, UPLO="L"), torch.linalg.eigvalsh(full), rtol=1e-5, atol=1e-3)


def test_latent_finds_planted_joint_rank(run, tmp_path):
    """The joint rank planted across heads before RoPE is found at each energy share, and the
    predicted cache is 2 bytes (fp16) per latent dimension against 2 * 2*H*D for the full K/V."""
    report, stdout = _report(run, tmp_path, _joint_lowrank_capture(tmp_path))
    lat = report["summary"]["latent"]
    assert lat["keys"] == "k_pre" and lat["energy"] == [0.9, 0.95, 0.99] and lat["width"] == 64
    assert lat["median_rank"] == [3, 4, 5] and lat["max_rank"] == [3, 4, 5]
    assert lat["bytes_per_token"] == [2 * 2 * 3, 2 * 2 * 4, 2 * 2 * 5]  # two layers
    assert lat["bytes_per_token_full"] == 2 * 2 * 2 * 2 * 16
    assert lat["size_ratio"] == [pytest.approx(3 / 64), pytest.approx(4 / 64), pytest.approx(5 / 64)]
    for row in report["summary"]["per_layer"]:
        assert row["latent"]["rank"] == [3, 4, 5] and row["latent"]["n"] == 128
        assert row["latent"]["bytes_per_token"] == [6, 8, 10] and row["latent"]["bytes_per_token_full"] == 128
    assert "MLA-style joint latent of keys before RoPE" in report["summary"]["reading"]
    assert "3/4/5 dimensions" in report["summary"]["reading"]
    assert "MLA-style latent" in stdout


def test_latent_after_rope_and_without_values(run, tmp_path):
    """Keys after RoPE are used only when k_pre is not analyzed (RoPE rotates each position
    differently, which raises the joint rank); no values, no latent."""
    capture = _joint_lowrank_capture(tmp_path)
    post, _ = _report(run, tmp_path, capture, "--tensors", "k,v")
    assert post["summary"]["latent"]["keys"] == "k"
    assert post["summary"]["latent"]["median_rank"][2] > 5
    keys_only, _ = _report(run, tmp_path, capture, "--tensors", "k_pre,k")
    assert keys_only["summary"]["latent"] is None
    assert all("latent" not in row for row in keys_only["summary"]["per_layer"])


def test_round6_is_the_string_round_trip():
    """The vectorized rounding of the records equals float(f"{x:.6g}") (ties and wide exponents included)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen, dtype=torch.float64)
    x = torch.cat([x * torch.exp(12 * torch.randn(x.shape, generator=gen, dtype=torch.float64)),
                   torch.tensor([99999.95, 999999.5, 0.1234565, 123456.5, 9.999995, 999999.7, 0.99999951, 1e-30,
                                 -1e30, 0.0, 1.0, float("nan"), float("inf")], dtype=torch.float64)])
    x = torch.cat([x, x.float().double()])  # float32 values, as the statistics come out
    got = analyze.round6(x).tolist()
    want = [analyze._num(v) for v in x.tolist()]
    assert [g if g == g else None for g in got] == want


def test_spectral_stats_match_the_formed_lowrank_part():
    """energy share and isotropy from the eigenpairs equal those of the formed low-rank part."""
    from kvc.analysis import rmt

    gen = torch.Generator().manual_seed(5)
    X = torch.randn(2, 3, 300, 64, generator=gen, dtype=torch.float64)
    X[..., :3] += 4 * torch.randn(2, 3, 300, 1, generator=gen, dtype=torch.float64)  # a shared low-rank part
    sp = analyze.spectral_stats(X, "eoptshrinkq", 4, torch.Generator().manual_seed(1))
    lowrank = sp.shrink.lowrank()
    assert (sp.shrink.rank >= 1).all()
    assert torch.allclose(sp.energy, rmt.energy_share(X, lowrank), rtol=1e-10)
    assert torch.allclose(sp.isotropy.top_over_mean, rmt.isotropy(X - lowrank).top_over_mean, rtol=1e-9)
