"""Per-(layer, KV head, tensor) spectral report of a capture: the numerics behind ``kvc analyze``.

For each n x d matrix (tokens x head_dim) of k_pre, k and v: singular values, the eOptShrinkQ
rank (or the eOptShrink MATLAB rule), bulk edge, Gavish-Donoho sigma, BBP threshold, D-transform
estimates and shrunk values, energy share of the denoised low-rank part, predicted bit saving,
outlier channels, and thin-shell / delocalization / isotropy of the residual
(docs/methods.md#analyze-report). All heads, sequences/blocks and tensors of one layer go through
one batched call.
"""

from __future__ import annotations

import datetime
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import __version__
from . import rmt
from ..io.capture import KV_TENSORS, CaptureFile
from .channels import BAND_MIN, ChannelStats, band_mask, channel_runs, channel_stats, median, outlier_mask, rope_partner
from ..errors import KvcError
from ..rope import rope_params

TOP_SINGULAR = 16
LOWRANK_ENERGY = 0.5  # "low-rank" layer: median rho >= 0.5, the half-bit point (docs/methods.md#energy-share)
LABELS = {"k_pre": "keys before RoPE", "k": "keys after RoPE", "v": "values"}
LATENT_SHARES = (0.90, 0.95, 0.99)  # energy shares of the MLA-style latent rank (docs/methods.md#latent-rank)
FP16_BYTES = 2


@dataclass(frozen=True)
class Options:
    """What to analyze and how; block implies per sequence (a block never spans two sequences)."""

    rank_rule: rmt.RankRule = "eoptshrinkq"
    outlier_factor: float = 6.0
    outlier_topk: int | None = None
    per_seq: bool = False
    block: int | None = None
    factor_bits: int = 4

    def __post_init__(self):
        if self.rank_rule not in ("eoptshrinkq", "matlab"):
            raise KvcError(f"--rank-rule must be eoptshrinkq or matlab, not {self.rank_rule!r}")
        if self.block is not None and self.block < 1:
            raise KvcError("--block must be >= 1")

    @property
    def mode(self) -> str:
        return f"block{self.block}" if self.block else ("per-seq" if self.per_seq else "pooled")


@dataclass(frozen=True)
class Spectral:
    """Rule-dependent results [...] of `spectral_stats`."""

    shrink: rmt.Shrinkage
    sigma: Tensor
    energy: Tensor
    saving: Tensor
    shell: rmt.ThinShell
    deloc: rmt.Delocalization
    isotropy: rmt.Isotropy


@dataclass(frozen=True)
class HeadStats:
    """Everything computed on X [..., n, d]; spectral is None (with skip_reason) when n is too small.

    outliers [..., d]: every flagged channel; bands [..., d]: those in a run of >= BAND_MIN adjacent ones.
    """

    n: int
    d: int
    singular_values: Tensor
    channels: ChannelStats
    outliers: Tensor
    bands: Tensor
    spectral: Spectral | None
    skip_reason: str | None


@dataclass
class Report:
    """heads/rope: JSON-ready records; summary: aggregates; spectra[(layer, tensor)]: singular values [G, H, p]."""

    heads: list[dict]
    rope: list[dict]
    summary: dict
    spectra: dict[tuple[int, str], Tensor]

    def to_json(self) -> dict:
        return {"heads": self.heads, "rope": self.rope, "summary": self.summary}


# ----------------------------------------------------------------------------- tensor numerics


def split_tokens(tensors: Sequence[Tensor], per_seq: bool, block: int | None
                 ) -> tuple[Tensor, list[tuple[int | None, int | None]]]:
    """[S, H, T, D] tensors -> ([len(tensors), G, H, n, D], (seq, block) label of each of the G groups),
    in one copy.

    Pooled: all sequences stacked (G = 1). Blocks: consecutive tokens of one sequence; the tail
    of T mod block tokens is left out (eOptShrinkQ keeps the incomplete block in FP16,
    docs/methods.md#eoptshrinkq-algorithm).
    """
    S, H, T, D = tensors[0].shape
    first = tensors[0]
    if block:
        nb = T // block
        if nb == 0:
            raise KvcError(f"--block {block} is longer than the {T} tokens of each sequence")
        out = first.new_empty(len(tensors), S, nb, H, block, D)
        for o, t in zip(out, tensors):
            o.copy_(t[:, :, : nb * block].reshape(S, H, nb, block, D).transpose(1, 2))
        return out.reshape(len(tensors), S * nb, H, block, D), [(s, b) for s in range(S) for b in range(nb)]
    if per_seq:
        return torch.stack(list(tensors)), [(s, None) for s in range(S)]
    out = first.new_empty(len(tensors), H, S, T, D)
    for o, t in zip(out, tensors):
        o.copy_(t.transpose(0, 1))
    return out.reshape(len(tensors), 1, H, S * T, D), [(None, None)]


def spectral_stats(X: Tensor, rule: rmt.RankRule, factor_bits: int, generator: torch.Generator) -> Spectral:
    """Rank, shrinkage, energy share, bit saving and residual diagnostics of X [..., n, d].

    One Gram matrix per matrix, formed in X's dtype and decomposed in float64; everything else
    follows from its eigenpairs (docs/methods.md#analyze-report): the energy share
    sum(phi^2) / sum(lambda), the residual spectrum (y_i - phi_i)^2 for the isotropy, and the
    residual itself (for the row statistics) in X's dtype from the p-side eigenvectors.
    """
    n, d = X.shape[-2:]
    shrink = rmt.eoptshrink(X, rule=rule, imputation=rule, gram_dtype=X.dtype)
    lam, phi = shrink.eigenvalues, shrink.phi
    r = phi.shape[-1]
    shell, deloc = rmt.residual_diagnostics(shrink, X, generator)
    # ||U diag(phi) V^T||_F^2 = sum phi^2 and ||X||_F^2 = sum lambda (docs/methods.md#energy-share)
    energy = phi.square().sum(-1) / lam.sum(-1)
    # R^T R = V diag(lambda) V^T with lambda_i -> (y_i - phi_i)^2 for the shrunk components
    spectrum = torch.cat([(shrink.singular_values[..., :r] - phi).square(), lam[..., r:]], -1)
    return Spectral(
        shrink=shrink,
        sigma=rmt.gd_sigma(shrink.singular_values, n, d),
        energy=energy,
        saving=rmt.predicted_bit_saving(energy, shrink.rank, n, d, factor_bits),
        shell=shell,
        deloc=deloc,
        isotropy=rmt.spectrum_isotropy(spectrum, n, d),
    )


def head_stats(X: Tensor, options: Options, generator: torch.Generator) -> HeadStats:
    """All statistics of the matrices X [..., n, d] (float32 or float64), in one batched pass."""
    n, d = X.shape[-2:]
    chans = channel_stats(X)
    outliers = outlier_mask(chans.rms, options.outlier_factor, options.outlier_topk)
    bands = band_mask(outliers)
    reason = rmt.rank_rule_unfit(options.rank_rule, min(n, d))
    if reason:
        return HeadStats(n, d, torch.linalg.svdvals(X.to(torch.float64)), chans, outliers, bands, None, reason)
    spectral = spectral_stats(X, options.rank_rule, options.factor_bits, generator)
    return HeadStats(n, d, spectral.shrink.singular_values, chans, outliers, bands, spectral, None)


# ----------------------------------------------------------------------------- records


def _num(x: float) -> float | None:
    """6 significant digits; NaN/Inf -> None (JSON has no NaN)."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _nums(xs: list[float]) -> list[float | None]:
    return [_num(x) for x in xs]


_POW10 = torch.tensor([10.0**k for k in range(23)], dtype=torch.float64)  # exact doubles


def round6(t: Tensor) -> Tensor:
    """`_num` of every entry of t, vectorized: float64 rounded to 6 significant digits, equal to
    ``float(f"{x:.6g}")``; NaN where x is not finite.

    x = m 10^-k with the integer m in [1e5, 1e6) rounded half to even; m / 10^k (or m 10^-k)
    is then the double nearest to the decimal, as the string round trip gives. Entries whose k
    falls outside [-22, 22] (10^k not exact) or whose x 10^k lies within 1e-6 of a tie (where the
    rounded product may round the other way than the exact value) go through `_num`.
    """
    x = t.detach().to("cpu", torch.float64)
    finite = x.isfinite() & (x != 0)
    a = torch.where(finite, x.abs(), torch.ones_like(x))
    k = 5 - a.log10().floor().long()
    for _ in range(2):  # log10 can be one off next to a power of ten
        p = _POW10[k.abs().clamp(max=22)]
        scaled = torch.where(k >= 0, a * p, a / p)
        k = k + (scaled < 1e5).long() - (scaled >= 1e6).long()
    p = _POW10[k.abs().clamp(max=22)]
    scaled = torch.where(k >= 0, a * p, a / p)
    m = scaled.round()
    out = torch.where(k >= 0, m / p, m * p).copysign(x)
    out = torch.where(x == 0, x, out)
    out = torch.where(x.isfinite(), out, torch.nan)
    wide = ((k.abs() > 22) | ((scaled - scaled.floor() - 0.5).abs() < 1e-6)) & finite
    if wide.any():
        out[wide] = torch.tensor([_num(v) for v in x[wide].tolist()], dtype=torch.float64)
    return out


def _number_columns(tensors: dict[str, Tensor], batch_ndim: int) -> dict[str, list]:
    """`_rows` of each tensor [*batch, ...], all rounded by one `round6` call, NaN/Inf as None."""
    flat = [torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1) for t in tensors.values()]
    columns = {}
    for (name, t), r in zip(tensors.items(), round6(torch.cat(flat)).split([f.numel() for f in flat])):
        rows = _rows(r.reshape(torch.as_tensor(t).shape), batch_ndim)
        for i in r.isnan().reshape(len(rows), -1).any(-1).nonzero().flatten().tolist():
            rows[i] = [None if x != x else x for x in rows[i]] if isinstance(rows[i], list) else None
        columns[name] = rows
    return columns


SPECTRAL_KEYS = ("rank", "bulk_edge", "sigma", "bbp_threshold", "mp_edge", "d_hat", "a1", "a2", "shrunk",
                 "energy_lowrank", "predicted_bit_saving", "thin_shell_cv", "thin_shell_ratio", "deloc_max",
                 "deloc_worst", "deloc_max_unrotated", "isotropy")
STARVED = "too few singular values beyond the rank for the noise imputation"


def _rows(t: Tensor, batch_ndim: int) -> list:
    """t [*batch, ...] -> Python list over the flattened batch (trailing dims may be empty: rank 0)."""
    return t.reshape(math.prod(t.shape[:batch_ndim]), *t.shape[batch_ndim:]).cpu().tolist()


def _spectral_columns(sp: Spectral, n: int, d: int, batch_ndim: int) -> dict[str, list]:
    """Rule-dependent record fields, one list entry per matrix (component lists cut to the rank)."""
    sh = sp.shrink
    mask = _rows(sh.mask, batch_ndim)
    ref = sp.deloc.reference
    edge = sh.edge.clamp_min(0).sqrt()
    # white noise whose MP edge sigma (sqrt n + sqrt d) sits at the extrapolated edge has BBP threshold
    # sigma (n d)^{1/4}; the empirical D-transform at the edge itself is too unstable to use
    # (docs/methods.md#analyze-report)
    bbp = rmt.bbp_threshold(n, d, edge / rmt.mp_bulk_edge(n, d))
    columns = _number_columns({
        "bulk_edge": edge,
        "sigma": sp.sigma,
        "bbp_threshold": bbp,
        "mp_edge": rmt.mp_bulk_edge(n, d) * sp.sigma,
        "d_hat": sh.d_hat, "a1": sh.a1, "a2": sh.a2, "shrunk": sh.phi,
        "energy_lowrank": sp.energy,
        "predicted_bit_saving": sp.saving,
        "thin_shell_cv": sp.shell.norm_cv,
        "thin_shell_ratio": sp.shell.energy_ratio,
        "deloc_max": sp.deloc.ratio_rotated * ref,
        "deloc_worst": sp.deloc.worst_rotated * ref,
        "deloc_max_unrotated": sp.deloc.ratio_raw * ref,
        "isotropy": sp.isotropy.top_over_mean,
    }, batch_ndim)
    for key in ("d_hat", "a1", "a2", "shrunk"):  # component lists cut to the rank
        columns[key] = [[x for x, m in zip(xs, ms) if m] for xs, ms in zip(columns[key], mask)]
    return {"rank": _rows(sh.rank, batch_ndim), **columns}


def head_records(stats: HeadStats, layer: int, tensors: list[str], labels: list) -> list[dict]:
    """One JSON-ready dict per (tensor, group, head) of stats with batch shape [len(tensors), G, H]."""
    shape = stats.outliers.shape[:-1]
    rows = partial(_rows, batch_ndim=len(shape))
    ch = stats.channels
    outliers = [[c for c, f in enumerate(flags) if f] for flags in rows(stats.outliers & ~stats.bands)]
    bands = [channel_runs(flags) for flags in rows(stats.bands)]
    ratio = rows(ch.rms_ratio)
    sv, rms, max_abs, kurt, cv = _number_columns({
        "sv": stats.singular_values[..., :TOP_SINGULAR], "rms": ch.rms, "max_abs": ch.max_abs,
        "kurtosis": ch.kurtosis, "cv": ch.magnitude_cv}, len(shape)).values()
    spectral = None if stats.spectral is None else _spectral_columns(stats.spectral, stats.n, stats.d, len(shape))
    starved = [False] * len(sv) if stats.spectral is None else rows(stats.spectral.shrink.starved)
    G, H = shape[1], shape[2]
    records = []
    for i in range(len(sv)):
        seq, block = labels[(i // H) % G]
        fit = spectral is not None and not starved[i]
        rec = {"layer": layer, "head": i % H, "tensor": tensors[i // (G * H)], "seq": seq, "block": block,
               "n": stats.n, "d": stats.d, "skipped": stats.skip_reason or (STARVED if starved[i] else None)}
        rec.update({key: spectral[key][i] if fit else None for key in SPECTRAL_KEYS})
        rec.update({
            "singular_values": sv[i],
            "outlier_channels": outliers[i],
            "outlier_rms_ratio": _nums([ratio[i][c] for c in outliers[i]]),
            "bands": bands[i],
            "max_rms_ratio": _num(max(ratio[i])),
            "channel_rms": rms[i], "channel_max_abs": max_abs[i],
            "channel_kurtosis": kurt[i], "channel_cv": cv[i],
        })
        records.append(rec)
    return records


def rope_records(stats: HeadStats, layer: int, tensors: list[str], labels: list, rotary_dims: int) -> list[dict]:
    """Pre- vs post-RoPE comparison per (group, head): outliers and bands, magnitude CV, rank and energy.

    The differences (only_pre, only_post, from the partner) and the outlier CV are over every flagged
    channel, bands included, so a channel that moves between a band and isolation is not counted.
    """
    pre, post = tensors.index("k_pre"), tensors.index("k")
    a, b = stats.outliers[pre], stats.outliers[post]  # [G, H, d]
    partner = rope_partner(torch.arange(stats.d, device=a.device), stats.d, rotary_dims)
    from_partner = b & ~a & a[..., partner]  # new after RoPE, and its rotation partner was an outlier
    cv = stats.channels.magnitude_cv
    # mean magnitude CV over the pre-RoPE outlier channels, before and after the rotation
    count = a.sum(-1)
    outlier_cv = [torch.where(count > 0, (cv[t] * a).sum(-1) / count, torch.nan) for t in (pre, post)]
    cols = {"pre": a.cpu().tolist(), "post": b.cpu().tolist(), "partner": from_partner.cpu().tolist(),
            "band_pre": stats.bands[pre].cpu().tolist(), "band_post": stats.bands[post].cpu().tolist(),
            "cv_pre": median(cv[pre]).cpu().tolist(), "cv_post": median(cv[post]).cpu().tolist(),
            "ocv_pre": outlier_cv[0].cpu().tolist(), "ocv_post": outlier_cv[1].cpu().tolist()}
    sp = stats.spectral
    if sp is not None:
        fit = ~sp.shrink.starved
        cols.update({"rank": torch.where(fit, sp.shrink.rank, -1).cpu().tolist(),
                     "energy": torch.where(fit, sp.energy, torch.nan).cpu().tolist()})
    records = []
    for g, (seq, block) in enumerate(labels):
        for h in range(a.shape[1]):
            set_pre = {c for c, f in enumerate(cols["pre"][g][h]) if f}
            set_post = {c for c, f in enumerate(cols["post"][g][h]) if f}
            band_pre, band_post = cols["band_pre"][g][h], cols["band_post"][g][h]
            records.append({
                "layer": layer, "head": h, "seq": seq, "block": block,
                "outliers_pre": sorted(c for c in set_pre if not band_pre[c]),
                "outliers_post": sorted(c for c in set_post if not band_post[c]),
                "bands_pre": channel_runs(band_pre), "bands_post": channel_runs(band_post),
                "only_pre": sorted(set_pre - set_post), "only_post": sorted(set_post - set_pre),
                "only_post_from_partner": [c for c, f in enumerate(cols["partner"][g][h]) if f],
                "median_cv_pre": _num(cols["cv_pre"][g][h]), "median_cv_post": _num(cols["cv_post"][g][h]),
                "outlier_cv_pre": _num(cols["ocv_pre"][g][h]), "outlier_cv_post": _num(cols["ocv_post"][g][h]),
                "rank_pre": _rank(cols, pre, g, h),
                "rank_post": _rank(cols, post, g, h),
                "energy_pre": _num(cols["energy"][pre][g][h]) if sp else None,
                "energy_post": _num(cols["energy"][post][g][h]) if sp else None,
            })
    return records


def _rank(cols: dict, t: int, g: int, h: int) -> int | None:
    """Rank from rope_records' columns; None where skipped (no rule run, or starved: -1)."""
    rank = cols["rank"][t][g][h] if "rank" in cols else -1
    return None if rank < 0 else rank


# ----------------------------------------------------------------------------- MLA-style latent


def latent_keys(tensors: Sequence[str]) -> str | None:
    """The keys of the joint latent: before RoPE when analyzed, else after; None without values."""
    if "v" not in tensors:
        return None
    return next((name for name in ("k_pre", "k") if name in tensors), None)


def latent_record(k: Tensor, v: Tensor, layer: int, keys: str) -> dict:
    """The rank of one layer's joint [K of every KV head | V of every KV head] (n = S*T tokens by
    2*H*D) at each share of LATENT_SHARES, and the fp16 bytes per token of a latent of that dimension
    against those of the full K and V (an MLA-style cache, DeepSeek-V2 sec. 2.1.2;
    docs/methods.md#latent-rank)."""
    S, H, T, D = k.shape
    # token rows [K of every head | V of every head]
    joint = torch.cat([k, v], 1).permute(0, 2, 1, 3).reshape(S * T, 2 * H * D).float()
    # s_i^2 from the float32 Gram (eigenvalue error ~1e-8 of the total energy; shares are to 1e-2)
    energies = torch.linalg.eigvalsh(lower_gram(joint, D), UPLO="L").to(torch.float64).flip(-1).clamp_min(0)
    ranks = rmt.energy_rank(energies.sqrt(), LATENT_SHARES).tolist()
    return {"layer": layer, "keys": keys, "n": S * T, "width": 2 * H * D, "energy": list(LATENT_SHARES),
            "rank": ranks, "bytes_per_token": [FP16_BYTES * r for r in ranks],
            "bytes_per_token_full": FP16_BYTES * 2 * H * D}


def lower_gram(Z: Tensor, block: int) -> Tensor:
    """Z^T Z (Z [n, w]) from each column block of ``block`` down, zeros above: the lower block
    triangle, all that eigvalsh(UPLO="L") reads, at (m + 1) / 2m of the full product's work (m blocks)."""
    w = Z.shape[-1]
    gram = Z.new_zeros(w, w)
    for start in range(0, w, block):
        gram[start:, start:start + block] = Z[:, start:].mT @ Z[:, start:start + block]
    return gram


def latent_summary(records: list[dict]) -> dict | None:
    """Medians and maxima over layers of the latent ranks, and the whole cache's bytes per token."""
    if not records:
        return None
    shares = range(len(LATENT_SHARES))
    full = sum(r["bytes_per_token_full"] for r in records)
    total = [sum(r["bytes_per_token"][i] for r in records) for i in shares]
    return {"keys": records[0]["keys"], "energy": list(LATENT_SHARES), "width": records[0]["width"],
            "median_rank": [_median([r["rank"][i] for r in records]) for i in shares],
            "max_rank": [max(r["rank"][i] for r in records) for i in shares],
            "bytes_per_token": total, "bytes_per_token_full": full,
            "size_ratio": [_num(b / full) for b in total]}


# ----------------------------------------------------------------------------- driver


def analyze_layer(layer_tensors: dict[str, Tensor], layer: int, options: Options, device: torch.device,
                  rotary_dims: int | None) -> tuple[list[dict], list[dict], Tensor]:
    """Records, RoPE records and singular values [len(tensors), G, H, p] of one layer's [S, H, T, D] tensors."""
    names = list(layer_tensors)
    raw = [t.to(device) for t in layer_tensors.values()]  # [S, H, T, D] each, finite (CaptureFile)
    X, labels = split_tokens(raw, options.per_seq, options.block)  # [tensors, G, H, n, d]
    generator = torch.Generator().manual_seed(layer)  # one Haar rotation per layer, reproducible
    stats = head_stats(X, options, generator)
    heads = head_records(stats, layer, names, labels)
    rope = (rope_records(stats, layer, names, labels, rotary_dims)
            if rotary_dims is not None and {"k_pre", "k"} <= set(names) else [])
    return heads, rope, stats.singular_values.cpu()


def select_tensors(capture: CaptureFile, layers: list[int], spec: str | Sequence[str] | None) -> list[str]:
    """``--tensors``: a comma list (or a list) of k_pre, k, v held in every chosen layer; None: all
    of them that are."""
    held = [name for name in KV_TENSORS if all(capture.has(layer, name) for layer in layers)]
    if spec is None:
        return sorted(held, key=("k_pre", "k", "v").index)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [s for s in names if s not in KV_TENSORS]
    if unknown or not names:
        raise KvcError(f"--tensors {spec!r}: choose from k_pre, k, v")
    absent = [s for s in names if s not in held]
    if absent:
        raise KvcError(f"{capture.path} lacks {', '.join(absent)} in some of the chosen layers "
                       f"(held everywhere: {', '.join(held) or 'nothing'})")
    return list(dict.fromkeys(names))


def analyze_capture(capture: CaptureFile, layers: list[int], tensors: list[str], options: Options,
                    device: torch.device, progress: Callable[[], None] | None = None) -> Report:
    """Analyze the chosen layers and tensors of a capture; progress() is called after each layer."""
    start = time.perf_counter()
    heads, rope, spectra, latent = [], [], {}, {}
    keys = latent_keys(tensors)
    rope_meta = capture.meta.rope  # read (and validated) for every layer before any work
    rotary = {layer: rope_params(rope_meta, layer)[2] if rope_meta is not None else None for layer in layers}
    for layer in layers:
        data = {name: capture.tensor(layer, name, torch.float32) for name in tensors}
        h, r, sv = analyze_layer(data, layer, options, device, rotary[layer])
        heads += h
        rope += r
        spectra.update({(layer, name): sv[i] for i, name in enumerate(tensors)})
        if keys is not None:
            latent[layer] = latent_record(data[keys].to(device), data["v"].to(device), layer, keys)
        if progress:
            progress()
    summary = summarize(heads, rope, options, latent)
    summary.update({"capture": str(capture.path), "model": capture.meta.model, "device": str(device),
                    "seconds": round(time.perf_counter() - start, 3), "kvc_version": __version__,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return Report(heads, rope, summary, spectra)


# ----------------------------------------------------------------------------- summary


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return _num(statistics.median(xs)) if xs else None


def _tensor_summary(recs: list[dict]) -> dict:
    ok = [r for r in recs if r["rank"] is not None]
    by_layer: dict[int, list[dict]] = {}
    for r in ok:
        by_layer.setdefault(r["layer"], []).append(r)
    lowrank_layers = [layer for layer, rs in by_layer.items()
                      if _median([r["energy_lowrank"] for r in rs]) >= LOWRANK_ENERGY
                      and _median([r["rank"] for r in rs]) >= 1]
    channels = Counter(c for r in recs for c in r["outlier_channels"])
    bands = Counter(tuple(b) for r in recs for b in r["bands"])
    return {
        "records": len(recs),
        "skipped": sum(r["skipped"] is not None for r in recs),
        "layers": len({r["layer"] for r in recs}),
        "lowrank_layers": sorted(lowrank_layers),
        "median_rank": _median([r["rank"] for r in ok]),
        "max_rank": max((r["rank"] for r in ok), default=None),
        "median_energy_lowrank": _median([r["energy_lowrank"] for r in ok]),
        "median_predicted_bit_saving": _median([r["predicted_bit_saving"] for r in ok]),
        "records_with_outliers": sum(bool(r["outlier_channels"]) for r in recs),
        "top_outlier_channels": [[c, k] for c, k in channels.most_common(5)],
        "records_with_bands": sum(bool(r["bands"]) for r in recs),
        "top_bands": [[list(b), k] for b, k in bands.most_common(5)],
        "median_max_rms_ratio": _median([r["max_rms_ratio"] for r in recs]),
        "median_thin_shell_cv": _median([r["thin_shell_cv"] for r in ok]),
        "median_deloc_max": _median([r["deloc_max"] for r in ok]),
        "median_isotropy": _median([r["isotropy"] for r in ok]),
        "median_channel_cv": _median([_median(r["channel_cv"]) for r in recs]),
    }


def _layer_rows(heads: list[dict], tensors: list[str], latent: dict[int, dict]) -> list[dict]:
    rows: dict[int, dict] = {}
    for r in heads:
        cell = rows.setdefault(r["layer"], {"layer": r["layer"]}).setdefault(r["tensor"], [])
        cell.append(r)
    out = []
    for layer in sorted(rows):
        row = {"layer": layer}
        for name in tensors:
            rs = rows[layer].get(name, [])
            row[name] = {"median_rank": _median([r["rank"] for r in rs]),
                         "median_energy_lowrank": _median([r["energy_lowrank"] for r in rs]),
                         "median_predicted_bit_saving": _median([r["predicted_bit_saving"] for r in rs]),
                         "records_with_outliers": sum(bool(r["outlier_channels"]) for r in rs),
                         "records_with_bands": sum(bool(r["bands"]) for r in rs)}
        if layer in latent:
            row["latent"] = latent[layer]
        out.append(row)
    return out


def _rope_summary(rope: list[dict]) -> dict:
    only_post = sum(len(r["only_post"]) for r in rope)
    return {
        "records": len(rope),
        "outliers_pre": sum(len(r["outliers_pre"]) for r in rope),
        "outliers_post": sum(len(r["outliers_post"]) for r in rope),
        "bands_pre": sum(len(r["bands_pre"]) for r in rope),
        "bands_post": sum(len(r["bands_post"]) for r in rope),
        "only_pre": sum(len(r["only_pre"]) for r in rope),
        "only_post": only_post,
        "only_post_from_partner": sum(len(r["only_post_from_partner"]) for r in rope),
        "median_cv_pre": _median([r["median_cv_pre"] for r in rope]),
        "median_cv_post": _median([r["median_cv_post"] for r in rope]),
        "median_outlier_cv_pre": _median([r["outlier_cv_pre"] for r in rope]),
        "median_outlier_cv_post": _median([r["outlier_cv_post"] for r in rope]),
        "median_rank_pre": _median([r["rank_pre"] for r in rope]),
        "median_rank_post": _median([r["rank_post"] for r in rope]),
        "median_energy_pre": _median([r["energy_pre"] for r in rope]),
        "median_energy_post": _median([r["energy_post"] for r in rope]),
    }


WORST_KEYS = ("layer", "head", "tensor", "seq", "block", "rank", "energy_lowrank", "predicted_bit_saving",
              "max_rms_ratio", "outlier_channels", "bands", "thin_shell_cv")


def summarize(heads: list[dict], rope: list[dict], options: Options, latent: dict[int, dict] | None = None,
              worst: int = 8) -> dict:
    """Aggregates per tensor and per layer, the MLA-style latent ranks (``latent``: layer -> its
    ``latent_record``), the heads with least to gain, and a plain-words reading."""
    latent = latent or {}
    tensors = list(dict.fromkeys(r["tensor"] for r in heads))
    per_tensor = {name: _tensor_summary([r for r in heads if r["tensor"] == name]) for name in tensors}
    ranked = sorted((r for r in heads if r["predicted_bit_saving"] is not None),
                    key=lambda r: r["predicted_bit_saving"])
    n, d = (heads[0]["n"], heads[0]["d"]) if heads else (0, 0)
    summary = {
        "mode": options.mode, "rank_rule": options.rank_rule, "n": n, "d": d,
        "outlier_rule": (f"top {options.outlier_topk} channels by RMS" if options.outlier_topk is not None
                         else f"RMS > {options.outlier_factor:g} x median channel RMS"),
        "outlier_factor": options.outlier_factor if options.outlier_topk is None else None,
        "outlier_topk": options.outlier_topk,
        "band_rule": f"runs of >= {BAND_MIN} adjacent flagged channels", "band_min": BAND_MIN,
        "layers": sorted({r["layer"] for r in heads}), "tensors": per_tensor,
        "per_layer": _layer_rows(heads, tensors, latent),
        "latent": latent_summary([latent[layer] for layer in sorted(latent)]),
        "rope": _rope_summary(rope) if rope else None,
        "worst_heads": [{k: r[k] for k in WORST_KEYS} for r in ranked[:worst]],
        "references": references(n, d) if heads else {},
    }
    summary["reading"] = reading(summary, options)
    return summary


def references(n: int, d: int) -> dict:
    """What isotropic Gaussian noise rows give for the residual diagnostics (docs/methods.md#residual-diagnostics)."""
    return {
        "thin_shell_cv": 1 / math.sqrt(2 * d),  # CV of a chi_d norm ~ 1/sqrt(2d)
        "thin_shell_ratio": 2 / d,  # 2 tr(A^2)/tr(A)^2 with A = I_d
        "deloc_max": math.sqrt(2 * math.log(d) / d),  # sqrt(2 ln d / d)
        "isotropy": (1 + math.sqrt(d / n)) ** 2,  # MP edge over mean
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def reading(summary: dict, options: Options) -> str:
    """One paragraph, in plain words, generated from the summary numbers."""
    parts = []
    tensors = summary["tensors"]
    for name, t in tensors.items():
        label = LABELS.get(name, name)
        label = label[0].upper() + label[1:]
        if t["median_rank"] is None:
            parts.append(f"{label}: every record skipped.")
            continue
        lr = len(t["lowrank_layers"])
        head = (f"{label} are low-rank in {lr} of {t['layers']} layers" if lr
                else f"{label} are not low-rank in any of {t['layers']} layers")
        parts.append(f"{head}: median rank {t['median_rank']:g}, {_pct(t['median_energy_lowrank'])} of energy "
                     f"in the denoised low-rank part, predicted saving {t['median_predicted_bit_saving']:+.2f} "
                     "bit/entry over plain TurboQuant.")
    if options.outlier_topk is None:
        flagged = [f"{t['records_with_outliers']} of {t['records']} {name}" for name, t in tensors.items()]
        parts.append(f"Outlier channels ({summary['outlier_rule']}) appear in " + ", ".join(flagged) + " records"
                     + _common_channel(tensors) + ".")
    if any(t["records_with_bands"] for t in tensors.values()):
        banded = [f"{t['records_with_bands']} of {t['records']} {name}" for name, t in tensors.items()]
        parts.append(f"Bands ({summary['band_rule']}, given as a channel range, not as outliers) appear in "
                     + ", ".join(banded) + " records" + _common_band(tensors) + ".")
    rope = summary["rope"]
    if rope:
        parts.append(
            f"RoPE changes the set of flagged channels by {rope['only_pre']} lost and {rope['only_post']} gained "
            f"({rope['only_post_from_partner']} of them the rotation partner of a pre-RoPE outlier)"
            + _cv_change(rope) + ".")
    if summary["latent"]:
        parts.append(_latent_reading(summary["latent"]))
    ok = [t for t in tensors.values() if t["median_thin_shell_cv"] is not None]
    if ok:
        ref = summary["references"]
        parts.append(
            "The residual after removing the low-rank part has row-norm CV "
            f"{_median([t['median_thin_shell_cv'] for t in ok]):.2f} (isotropic rows: {ref['thin_shell_cv']:.2f}), "
            f"max coordinate after a random rotation {_median([t['median_deloc_max'] for t in ok]):.2f} "
            f"(sqrt(2 ln d/d) = {ref['deloc_max']:.2f}), top/mean eigenvalue "
            f"{_median([t['median_isotropy'] for t in ok]):.1f} (white: {ref['isotropy']:.1f}).")
    skipped = sum(t["skipped"] for t in tensors.values())
    if skipped:
        parts.append(f"{skipped} records were skipped (too few tokens for the rank rule; see 'skipped').")
    return " ".join(parts)


def _latent_reading(lat: dict) -> str:
    shares = "/".join(f"{e:.0%}" for e in lat["energy"])
    ranks = "/".join(f"{r:g}" for r in lat["median_rank"])
    sizes = "/".join(_pct(x) for x in lat["size_ratio"])
    return (f"An MLA-style joint latent of {LABELS[lat['keys']]} and values across all KV heads (width "
            f"{lat['width']}) needs a median of {ranks} dimensions per layer for {shares} of the energy: a "
            f"latent cache of {sizes} of the fp16 K/V bytes per token.")


def _cv_change(rope: dict) -> str:
    text = (f"; the median per-channel magnitude CV goes from {rope['median_cv_pre']:.2f} to "
            f"{rope['median_cv_post']:.2f}")
    if rope["median_outlier_cv_pre"] is not None:
        text += (f" ({rope['median_outlier_cv_pre']:.2f} to {rope['median_outlier_cv_post']:.2f} on the "
                 "pre-RoPE outlier channels)")
    return text


def band_label(band: list[int]) -> str:
    """'ch 96-127 (band, 32 channels)' for the inclusive range [96, 127]."""
    start, end = band
    return f"ch {start}-{end} (band, {end - start + 1} channels)"


def _common_band(tensors: dict) -> str:
    top = [(name, t["top_bands"][0]) for name, t in tensors.items() if t["top_bands"]]
    return "; most often " + ", ".join(f"{band_label(b)} in {name} ({k}x)" for name, (b, k) in top)


def _common_channel(tensors: dict) -> str:
    top = [(name, t["top_outlier_channels"][0]) for name, t in tensors.items() if t["top_outlier_channels"]]
    if not top:
        return ""
    return "; most often " + ", ".join(f"channel {c} in {name} ({k}x)" for name, (c, k) in top)
