"""Encode+decode throughput of kvc's quantizers against the peer libraries users would otherwise pick.

Usage: python benchmarks/compress_vs_peers.py [--capture FILE] [--layers 0,5,10,15,20,25]
       [--threads 2] [--repeats 15]

The peers are installed by this script into their own virtual environment (out/peers-venv,
git-ignored), never as kvc dependencies: a venv whose ``.pth`` file reuses the running
interpreter's site-packages (torch, numpy, scipy) and pip-installs the pinned peers on top. The
script then re-runs itself in that environment with kvc imported from this checkout, so both
sides run in one process on the same tensors (K, and V for the value-side rows, of the given
layers) with the same torch threads, kvc and the peer alternating on every tensor.

Pairs (same bits, group, axis and rotation kind):
- ``int`` (per token, per channel) and ``kivi`` (keys per channel in groups of G tokens, values per
  token in groups of G channels; residual 0 so every token is quantized) against optimum-quanto's
  ``MaxOptimizer`` + ``quantize_weight`` / ``dequantize`` (the backend of transformers'
  QuantizedCache), qint2 and qint4;
- ``turboquant --rotation hadamard`` against fused-turboquant's ``TurboQuantMSE`` (its PyTorch path:
  random Hadamard + Lloyd-Max, packed codes); ``turboquant`` (Haar rotation, the same kind as the
  peer) and ``--rotation hadamard`` against the ``turboquant`` package's ``TurboQuantMSE`` (QR
  rotation, unpacked codes, a codebook of equal-probability boundaries, not Lloyd-Max).

What each side includes: kvc runs the method's ``encode_tensor`` + ``decode_tensor`` (bit-packed
codes, float16 scales/zero points/norms with their range checks, the bit audit of the codes);
quanto packs its codes too (float32 scale and shift); fused-turboquant packs (float32 norms);
the turboquant package keeps one uint8 per code and float32 norms. Throughput = MB of float32
input (4 bytes per entry, 10^6 bytes per MB) per second of encode+decode, median over the
repetitions; ratio = kvc throughput / peer throughput (> 1: kvc faster). MSE is the mean squared
error over all entries; the speed comparison holds at no worse MSE when MSE_kvc / MSE_peer <= 1 + the
stated tolerance (kvc's float16 scales cost ~0.1% against quanto's float32 ones; kvc's exact Beta
Lloyd-Max codebook gives a lower MSE than fused-turboquant's).
Writes docs/benchmarks/compress_vs_peers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "out" / "peers-venv"
PEERS = ["optimum-quanto==0.2.7", "fused-turboquant==0.1.0", "turboquant==0.2.0"]
MSE_TOL = 0.01  # kvc's MSE at most 1% above the peer's


def venv_python() -> Path:
    """Create out/peers-venv (reusing this interpreter's packages) and install the peers once."""
    py = VENV / "bin" / "python"
    stamp = VENV / "peers.txt"
    if stamp.exists() and stamp.read_text().split() == PEERS:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    base = [p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()]
    if not base:
        sys.exit("compress_vs_peers: run me with the interpreter that has torch installed")
    Path(site, "kvc_base.pth").write_text(base[0] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS], check=True)
    stamp.write_text("\n".join(PEERS) + "\n")
    return py


# ----------------------------------------------------------------------------- inside the peers venv


def timed(fn, x):
    """(seconds, reconstruction) of one encode+decode."""
    start = time.perf_counter()
    y = fn(x)
    return time.perf_counter() - start, y


def kvc_codec(name: str, kind: str, **options):
    import torch

    from kvc.compression import registry

    comp = registry.build(name, **options)

    def run(x):
        arrays, meta, _ = comp.encode_tensor(x, kind, None, torch.Generator().manual_seed(0))
        return comp.decode_tensor(arrays, meta, kind, tuple(x.shape))

    return run


def quanto_codec(bits: int, axis: int, group: int, transpose: bool = False):
    """optimum-quanto as transformers' QuantoQuantizedCache calls it (_quantize / _dequantize)."""
    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

    qtype, opt = {2: qint2, 4: qint4}[bits], MaxOptimizer()

    def run(x):
        t = x.transpose(-1, -2).contiguous() if transpose else x
        scale, shift = opt(t, qtype, axis, group)
        y = quantize_weight(t, qtype, axis, scale, shift, group).dequantize()
        return y.transpose(-1, -2) if transpose else y

    return run


def fused_tq_codec(d: int, bits: int):
    from fused_turboquant.core.quantizer import TurboQuantMSE

    tq = TurboQuantMSE(head_dim=d, bits=bits, device="cpu")
    return lambda x: tq.decode(tq.encode(x))


def pkg_tq_codec(d: int, bits: int):
    import numpy as np
    from turboquant.core import TurboQuantMSE

    if not hasattr(np, "trapz"):  # the package calls np.trapz, renamed np.trapezoid in numpy 2
        np.trapz = np.trapezoid
    tq = TurboQuantMSE(dim=d, bits=bits, device="cpu")
    return lambda x: tq.dequantize(*tq.quantize(x))


def pairs(d: int, T: int):
    """(row label, tensor 'k'|'v', kvc codec, peer label, peer codec)."""
    rows = []
    for b in (2, 4):
        rows.append((f"int --bits {b} --axis token", "k", kvc_codec("int", "k", bits=b, axis="token"),
                     f"quanto qint{b} axis 0, group {d}", quanto_codec(b, 0, d)))
        rows.append((f"int --bits {b} --axis channel", "k", kvc_codec("int", "k", bits=b, axis="channel"),
                     f"quanto qint{b} per channel, group {T}", quanto_codec(b, 0, T, transpose=True)))
        rows.append((f"kivi --bits {b} (keys)", "k", kvc_codec("kivi", "k", bits=b, residual=0),
                     f"quanto qint{b} axis -1, group 32", quanto_codec(b, -1, 32)))
        rows.append((f"kivi --bits {b} (values)", "v", kvc_codec("kivi", "v", bits=b, residual=0),
                     f"quanto qint{b} axis 0, group 32", quanto_codec(b, 0, 32)))
    for b in (2, 3, 4):
        had = kvc_codec("turboquant", "k", bits=float(b), rotation="hadamard")
        rows.append((f"turboquant --bits {b} --rotation hadamard", "k", had,
                     f"fused-turboquant {b}-bit (PyTorch path)", fused_tq_codec(d, b)))
        rows.append((f"turboquant --bits {b} --rotation hadamard", "k", had,
                     f"turboquant package {b}-bit", pkg_tq_codec(d, b)))
        rows.append((f"turboquant --bits {b} (haar)", "k", kvc_codec("turboquant", "k", bits=float(b)),
                     f"turboquant package {b}-bit", pkg_tq_codec(d, b)))
    return rows


def measure(args) -> list[dict]:
    import torch

    from kvc.io.capture import open_capture

    torch.set_num_threads(args.threads)
    cap = open_capture(args.capture)
    layers = [int(v) for v in args.layers.split(",")]
    data = {t: [cap.tensor(layer, t, torch.float32).contiguous() for layer in layers] for t in ("k", "v")}
    S, H, T, d = data["k"][0].shape
    args.shape = f"{S} x {H} x {T} x {d}"
    results = []
    for label, tensor, ours, peer_label, peer in pairs(d, T):
        xs = data[tensor]
        mb = sum(x.numel() for x in xs) * 4 / 1e6
        for x in xs:  # warm-up (codebook caches, first-call allocations)
            ours(x), peer(x)
        t_ours, t_peer = [0.0] * args.repeats, [0.0] * args.repeats
        for rep in range(args.repeats):  # the two sides alternate on every tensor
            for x in xs:
                t_ours[rep] += timed(ours, x)[0]
                t_peer[rep] += timed(peer, x)[0]
        n = sum(x.numel() for x in xs)
        mse_ours = sum(float((ours(x) - x).double().pow(2).sum()) for x in xs) / n
        mse_peer = sum(float((peer(x).float() - x).double().pow(2).sum()) for x in xs) / n
        results.append({"kvc": label, "peer": peer_label, "tensor": tensor.upper(),
                        "mbps_kvc": mb / statistics.median(t_ours), "mbps_peer": mb / statistics.median(t_peer),
                        "mse_kvc": mse_ours, "mse_peer": mse_peer})
        r = results[-1]
        print(f"{label:42s} vs {peer_label:38s} {r['mbps_kvc']:8.1f} {r['mbps_peer']:8.1f} MB/s "
              f"x{r['mbps_kvc'] / r['mbps_peer']:.2f}  MSE ratio {mse_ours / mse_peer:.4f}", flush=True)
    return results


def write(args, results: list[dict], load: tuple[float, float], seconds: float) -> None:
    import torch

    versions = {}
    for dist in ("optimum-quanto", "fused-turboquant", "turboquant"):
        from importlib.metadata import version
        versions[dist] = version(dist)
    lines = [
        "# Compress throughput against peer libraries",
        "",
        "Generated by `benchmarks/compress_vs_peers.py` (do not edit by hand). Encode+decode of the "
        f"same float32 tensors (layers {args.layers} of `{Path(args.capture).name}`, each "
        f"{args.shape} = [S, H, T, D] per layer), {args.threads} torch thread(s), median of "
        f"{args.repeats} repetitions, kvc and the peer alternating on every tensor. Throughput: MB of "
        "float32 input per second of encode+decode; ratio = kvc / peer (> 1: kvc faster). MSE no worse: "
        f"MSE kvc / MSE peer <= {1 + MSE_TOL:g}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}; peers "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". Load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}; the whole run took "
        f"{seconds:.0f} s.",
        "",
        "What each side includes: kvc = the method's `encode_tensor` + `decode_tensor` (bit-packed codes, "
        "float16 side data with range checks, the code-bit audit); quanto = `MaxOptimizer` + "
        "`quantize_weight` + `dequantize` (packed codes, float32 scale and shift); fused-turboquant = "
        "`TurboQuantMSE.encode` + `decode` on CPU (packed codes, float32 norms); turboquant package = "
        "`quantize` + `dequantize` (one uint8 per code, float32 norms, no packing).",
        "",
        "| kvc | peer | tensor | kvc MB/s | peer MB/s | ratio | MSE kvc | MSE peer | MSE ratio | MSE no worse |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mr = r["mse_kvc"] / r["mse_peer"]
        lines.append(f"| `{r['kvc']}` | {r['peer']} | {r['tensor']} | {r['mbps_kvc']:.1f} | {r['mbps_peer']:.1f} | "
                     f"**{r['mbps_kvc'] / r['mbps_peer']:.2f}** | {r['mse_kvc']:.4g} | {r['mse_peer']:.4g} | "
                     f"{mr:.4f} | {'yes' if mr <= 1 + MSE_TOL else 'no'} |")
    ratios = [r["mbps_kvc"] / r["mbps_peer"] for r in results]
    lines += ["", f"Slowest ratio: {min(ratios):.2f}; kvc faster on {sum(v > 1 for v in ratios)} of "
              f"{len(ratios)} pairs. The turboquant package's codebook has equal-probability boundaries "
              "(not Lloyd-Max), hence its higher MSE.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default="out/default.safetensors")
    parser.add_argument("--layers", default="0,5,10,15,20,25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "compress_vs_peers.md"))
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:
        py = venv_python()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        sys.exit(subprocess.run([str(py), __file__, "--inside", *sys.argv[1:]], env=env).returncode)
    load0, start = os.getloadavg()[0], time.perf_counter()
    results = measure(args)
    write(args, results, (load0, os.getloadavg()[0]), time.perf_counter() - start)


if __name__ == "__main__":
    main()
