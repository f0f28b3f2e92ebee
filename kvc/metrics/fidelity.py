"""Fidelity of a reconstructed KV layer, per KV head (docs/methods.md#metrics), as pure batched functions.

Shapes: k, k_hat, v, v_hat [S, H, T, D]; queries q [S, H_q, Tq, D] after RoPE at ``q_positions``
[Tq]. GQA: query head h*G + g reads KV head h, so queries are viewed as [S, H, G, Tq, D] and K, V
are never repeated. Each query sees the keys the layer's own mask lets it see, with the layer's
own logit scale and soft cap (``AttentionSpec``: causal, sliding window or bidirectional). Evicted tokens
(``keep`` False) are masked out of the compressed attention and of the inner-product statistics;
their reconstruction (zeros) still counts in ``mse_rel``. Every metric is pooled over sequences,
query heads of the group and positions; sums across query rows are float64.

Metrics by tensor row:
- ``k``: mse_rel, ip_bias_rel, ip_slope, ip_rmse_rel (x = <q,k>, y = <q,k_hat>, e = y - x);
- ``v``: mse_rel;
- ``kv`` (K and V together): mse_rel (mean of the k and v values), attn_logit_rmse, attn_kl,
  attn_out_rel, attn_topk_overlap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import AttentionSpec

TOPK = 8
CHUNK_ELEMENTS = 1 << 22  # logits per query chunk ([S, H_q, chunk, T]); bounds peak memory
NEG = -1e30  # mask value of a logit: exp underflows to 0, while 0 * NEG stays 0 (no NaN)


def mse_rel(x: Tensor, x_hat: Tensor) -> Tensor:
    """||X - X_hat||^2 / ||X||^2 per head [H], pooled over sequences, tokens and channels."""
    dims = (0, 2, 3)
    err = (x_hat.double() - x.double()).square().sum(dims)
    return err / x.double().square().sum(dims)


def grouped(q: Tensor, num_kv_heads: int) -> Tensor:
    """Queries [S, H_q, Tq, D] viewed as [S, H_kv, G, Tq, D] (query head h*G + g reads KV head h)."""
    S, Hq, Tq, D = q.shape
    return q.reshape(S, num_kv_heads, Hq // num_kv_heads, Tq, D)


def _topk_overlap(logits: Tensor, logits_hat: Tensor, visible: Tensor) -> Tensor:
    """|top-k(l) ∩ top-k(l_hat)| / min(k, visible keys) per row; masked logits carry NEG."""
    k = min(TOPK, logits.shape[-1])
    top, top_hat = logits.topk(k, dim=-1), logits_hat.topk(k, dim=-1)
    valid, valid_hat = top.values > NEG / 2, top_hat.values > NEG / 2
    match = ((top.indices[..., :, None] == top_hat.indices[..., None, :])
             & valid[..., :, None] & valid_hat[..., None, :])
    return match.sum((-1, -2)).double() / visible.sum(-1).clamp(1, k).double()


def masked_logits(x: Tensor, q_positions: Tensor, spec: AttentionSpec, head_dim: int
                  ) -> tuple[Tensor, Tensor]:
    """(logits, visible [M, T]) from inner products x = <q, k> [..., M, T] of queries at
    ``q_positions`` [M] and keys at 0..T-1: the layer's logits, NEG where its mask hides a key."""
    visible = spec.visible(q_positions.to(x.device), torch.arange(x.shape[-1], device=x.device))
    return spec.logits(x, head_dim).masked_fill(~visible, NEG), visible


def attention_output(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor,
                     spec: AttentionSpec = AttentionSpec()) -> Tensor:
    """softmax(logits) V per query head [S, H_q, Tq, D]: what the layer's attention returns."""
    S, H, T, D = k.shape
    qg = grouped(q, H)
    logits, _ = masked_logits(torch.einsum("shgmd,shtd->shgmt", qg, k), q_positions, spec, D)
    out = torch.einsum("shgmt,shtd->shgmd", logits.softmax(-1), v.to(logits.dtype))
    return out.reshape(S, q.shape[1], *out.shape[-2:])
def chunk_stats(q: Tensor, q_positions: Tensor, k: Tensor, k_hat: Tensor, v: Tensor, v_hat: Tensor,
                keep: Tensor | None = None, spec: AttentionSpec = AttentionSpec()) -> dict[str, Tensor]:
    """Additive sufficient statistics per head [H] for one chunk of queries q [S, H, G, M, D].

    The compressed inner products are y = q k_hat^T. Rows (one query, T keys) are summed in the
    compute dtype, everything across rows in float64. ``spec`` is the layer's attention.
    """
    D = k.shape[-1]
    x = torch.einsum("shgmd,shtd->shgmt", q, k)
    y = torch.einsum("shgmd,shtd->shgmt", q, k_hat.to(k.dtype))
    logits, visible = masked_logits(x, q_positions, spec, D)
    seen = visible if keep is None else visible & keep[:, :, None, None, :]  # [M, T] or [S, H, 1, M, T]
    logits_hat = spec.logits(y, D).masked_fill(~seen, NEG)

    def heads(rows: Tensor) -> Tensor:  # [S, H, G, M] -> [H], in float64
        return rows.double().expand(x.shape[:-1]).sum((0, 2, 3))

    w = seen.to(x.dtype)
    xw, ew = x * w, (y - x) * w
    stats = {"n": heads(w.sum(-1)), "sx": heads(xw.sum(-1)), "se": heads(ew.sum(-1)),
             "sxx": heads((xw * xw).sum(-1)), "sxe": heads((xw * ew).sum(-1)),
             "see": heads((ew * ew).sum(-1)), "sabs": heads(xw.abs().sum(-1))}
    logp, logp_hat = logits.log_softmax(-1), logits_hat.log_softmax(-1)
    p, p_hat = logp.exp(), logp_hat.exp()
    rows = seen.any(-1).expand(x.shape[:-1])  # queries that still see a key
    if keep is not None:
        p_hat = p_hat * rows[..., None]
    # KL(p_hat || p): finite under eviction; with exact logits it is -log(attention mass kept)
    kl = (p_hat * (logp_hat - logp)).sum(-1)
    out = torch.einsum("shgmt,shtd->shgmd", p, v.to(p.dtype))
    out_hat = torch.einsum("shgmt,shtd->shgmd", p_hat, v_hat.to(p.dtype))
    stats.update({"rows": heads(rows), "all_rows": heads(torch.ones_like(kl)), "kl": heads(kl * rows),
                  "out_err": heads((out_hat - out).square().sum(-1)), "out_ref": heads(out.square().sum(-1)),
                  "topk": heads(_topk_overlap(logits, logits_hat, visible.expand(x.shape)))})
    return stats


def attention_metrics(stats: dict[str, Tensor], logit_scale: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(key metrics, attention metrics) per head from summed ``chunk_stats``; ``logit_scale`` is the
    layer's scale s of logits = s <q, k> (before any soft cap)."""
    n, sx, se = stats["n"], stats["sx"], stats["se"]
    # least-squares slope of y on x: 1 + cov(x, e) / var(x)
    slope = 1 + (n * stats["sxe"] - sx * se) / (n * stats["sxx"] - sx * sx)
    keys = {"ip_bias_rel": se / stats["sabs"],  # mean(<q,k_hat> - <q,k>) / mean |<q,k>|
            "ip_slope": slope,
            "ip_rmse_rel": (stats["see"] / stats["sxx"]).sqrt()}
    attn = {"attn_logit_rmse": (stats["see"] / n).sqrt() * logit_scale,
            "attn_kl": stats["kl"] / stats["rows"],
            "attn_out_rel": (stats["out_err"] / stats["out_ref"]).sqrt(),
            "attn_topk_overlap": stats["topk"] / stats["all_rows"]}
    return keys, attn


def layer_metrics(k: Tensor, k_hat: Tensor, v: Tensor, v_hat: Tensor, q: Tensor, q_positions: Tensor,
                  keep: Tensor | None = None, spec: AttentionSpec = AttentionSpec()
                  ) -> dict[str, dict[str, Tensor]]:
    """All metrics per KV head: {"k": {...}, "v": {...}, "kv": {...}}, each value a float64 [H].

    ``spec`` is the layer's attention (mask, logit scale, soft cap). Queries are processed in chunks.
    """
    S, H, T, D = k.shape
    qg = grouped(q, H)
    chunk = max(1, CHUNK_ELEMENTS // (S * q.shape[1] * T))
    stats: dict[str, Tensor] = {}
    for start in range(0, q.shape[2], chunk):
        part = slice(start, start + chunk)
        chunk_sum = chunk_stats(qg[:, :, :, part], q_positions[part], k, k_hat, v, v_hat, keep, spec)
        stats = {n: stats.get(n, 0) + s for n, s in chunk_sum.items()}
    keys, attn = attention_metrics(stats, spec.scale(D))
    mk, mv = mse_rel(k, k_hat), mse_rel(v, v_hat)
    return {"k": {"mse_rel": mk, **keys}, "v": {"mse_rel": mv}, "kv": {"mse_rel": (mk + mv) / 2, **attn}}
