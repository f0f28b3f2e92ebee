"""Regenerate the results table of docs/plan.md: kvc plan against the best uniform single method.

    python scripts/plan_results.py [--calibration out/default.safetensors]
        [--heldout out/plan-heldout.safetensors --heldout-text out/plan-heldout.txt]

The calibration capture is the default capture (kvc capture: the first 4 x 512 tokens of the default
corpus). The held-out text is the second half of the default corpus (written to --heldout-text when
missing); the held-out capture is made from it when missing. For each budget (2.5 and 3 bits per
entry):

- the plan (kvc.plan on the calibration capture, every default candidate measured once);
- the uniform single methods: of the candidates storing at most the budget + 0.1 bits (coded per
  head as the plan codes them), the 3 of best predicted attn_out_rel, each run as
  ``kvc compress --method`` on the calibration capture; the best (measured attn_out_rel) within
  the budget, and the best just above it (at most 0.1 bits more: the plan must beat it with fewer
  bits);

each compressed on both captures (attn_out_rel, every --query-stride-th query) and run inside the
model with ``kvc eval`` on the held-out text (perplexity delta; whole model, no retrieval). Every
step's result is cached in out/plan-results/ (delete it to start over).
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvc  # noqa: E402
from doc_sections import replace_section  # noqa: E402

BUDGETS = (2.5, 3.0)
SLACK = 0.1  # bits per entry: a uniform method "just above the budget" stores at most this much more
TOP = 3  # uniform candidates measured per budget, best predicted first
BEGIN, END = "<!-- plan_results:begin -->", "<!-- plan_results:end -->"


def cached(directory: Path, name: str, make):
    path = directory / name
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = make()
    path.write_bytes(pickle.dumps(value))
    return value


def heldout_text(path: Path) -> None:
    """The second half of the default corpus (from a paragraph break), which the default capture never reads."""
    if path.exists():
        return
    from pydoc_data.topics import topics  # the default corpus of kvc capture (docs/format.md)

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    half = text[len(text) // 2:]
    kvc.write_text(path, half[half.index("\n\n") + 2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default="out/default.safetensors")
    ap.add_argument("--heldout", default="out/plan-heldout.safetensors")
    ap.add_argument("--heldout-text", default="out/plan-heldout.txt")
    ap.add_argument("--query-stride", type=int, default=4)
    ap.add_argument("--cache", default="out/plan-results")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "plan.md"))
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    heldout_text(Path(args.heldout_text))
    if not Path(args.calibration).exists():
        kvc.capture(out=args.calibration, device="cpu")
    if not Path(args.heldout).exists():
        kvc.capture(text=args.heldout_text, out=args.heldout, device="cpu")
    stride = args.query_stride

    def log(what: str) -> None:
        print(what, file=sys.stderr, flush=True)

    first = cached(cache, "plan-2.5.pkl", lambda: kvc.plan(args.calibration, BUDGETS[0], device="cpu",
                                                            query_stride=stride))
    plans = {BUDGETS[0]: first}
    for b in BUDGETS[1:]:
        plans[b] = cached(cache, f"plan-{b:g}.pkl", lambda: kvc.plan(args.calibration, b, points=first))
    figures = Path(args.doc).parent / "plan"
    figures.mkdir(exist_ok=True)
    for b, p in plans.items():
        p.save(cache / f"plan-{b:g}.toml", force=True)
        p.plot(figures / f"plan-{b:g}.png", force=True)
        log(f"plan {b:g}: {p.bits_per_entry:.4f} bits, predicted attn_out_rel {p.attn_out_rel:.4f}, {p.to_json()['choices']}")

    def compress(capture: str, name: str, **how) -> dict:
        def run():
            r = kvc.compress(capture, device="cpu", query_stride=stride, keep=False, **how)
            return {"bits": r.bits_per_entry, "attn_out_rel": r.summary["kv"]["attn_out_rel"]}
        key = re.sub(r"[^\w.]+", "_", f"compress-{Path(capture).stem}-{name}")
        out = cached(cache, key + ".pkl", run)
        log(f"{name} on {Path(capture).name}: {out}")
        return out

    def method_of(label: str) -> dict:
        cand = next(c for c in first.points.candidates if c.label == label)
        return {"method": cand.method, **cand.options}

    model = []

    def evaluate(row: dict) -> dict:
        def run():
            if not model:
                model.extend(kvc.load_model(device="cpu"))
            if "plan" in row:
                how = {"plan": row["plan"]}
            else:
                options = dict(row["method"])
                how = {"method": kvc.method(options.pop("method"), **options)}
            e = kvc.evaluate(model=model[0], tokenizer=model[1], text=args.heldout_text, retrieval=False,
                             proxies=False, device="cpu", **how)
            return {"bits": e.bits_per_entry, **{k: e.perplexity[k] for k in ("ppl_base", "ppl", "delta_rel", "kl")}}
        key = re.sub(r"[^\w.]+", "_", f"eval-{row['label']}")
        out = cached(cache, key + ".pkl", run)
        log(f"eval {row['label']}: {out}")
        return out

    rows = []
    for b, p in plans.items():
        plan_path = cache / f"plan-{b:g}.toml"
        row = {"budget": b, "what": "plan", "label": f"kvc plan --budget {b:g}", "plan": plan_path}
        rows.append(row)
        row["calib"] = compress(args.calibration, f"plan-{b:g}", plan=plan_path)
        row["heldout"] = compress(args.heldout, f"plan-{b:g}", plan=plan_path)
        row["eval"] = evaluate(row)
        write_doc(Path(args.doc), rows, plans, args)
        # uniform candidates: the TOP predicted best (attn_out_rel) of those that, coded per head, store at most
        # the budget + SLACK, each measured with kvc compress --method (whole layers store a little less)
        near = sorted((u for u in p.uniform if u["bits_per_entry"] <= b + SLACK), key=lambda u: u["attn_out_rel"])
        measured = {u["label"]: compress(args.calibration, u["label"], **method_of(u["label"])) for u in near[:TOP]}
        within = {k: m for k, m in measured.items() if m["bits"] <= b}
        above = {k: m for k, m in measured.items() if b < m["bits"] <= b + SLACK}
        for what, pool in (("best uniform within the budget", within), ("best uniform just above the budget", above)):
            if not pool:
                continue
            label = min(pool, key=lambda k: pool[k]["attn_out_rel"])
            row = {"budget": b, "what": what, "label": label, "method": method_of(label), "calib": pool[label]}
            rows.append(row)
            row["heldout"] = compress(args.heldout, label, **method_of(label))
            row["eval"] = evaluate(row)
            write_doc(Path(args.doc), rows, plans, args)


def verdict(plan: dict, best: dict) -> str:
    b = plan["budget"]
    checks = {"attn_out_rel, calibration": plan["calib"]["attn_out_rel"] < best["calib"]["attn_out_rel"],
              "attn_out_rel, held-out": plan["heldout"]["attn_out_rel"] < best["heldout"]["attn_out_rel"],
              "perplexity delta, held-out text": plan["eval"]["delta_rel"] < best["eval"]["delta_rel"]}
    wins = [k for k, v in checks.items() if v]
    losses = [k for k, v in checks.items() if not v]
    fewer = "fewer" if plan["calib"]["bits"] <= best["calib"]["bits"] else "more"
    text = (f"- {b:g} bits: the plan ({plan['calib']['bits']:.3f} bits on the calibration capture, "
            f"{plan['heldout']['bits']:.3f} held out) against {best['what'][5:]}, {best['label']} "
            f"({best['calib']['bits']:.3f} bits; the plan stores {fewer}): ")
    text += ("wins on " + ", ".join(wins)) if wins else "wins on nothing"
    if losses:
        text += "; **does not win** on " + ", ".join(losses)
    return text + "."


def write_doc(path: Path, rows: list[dict], plans: dict, args) -> None:
    lines = [BEGIN, "", f"Calibration capture: `{args.calibration}` (the default capture); held-out capture: "
             f"`{args.heldout}` and `kvc eval --text {args.heldout_text}` (the second half of the default "
             f"corpus). attn_out_rel with every {args.query_stride}th query; `kvc eval` on the whole model, "
             "contexts 256, 512, 1024, 2 windows, 64 continuation tokens, no retrieval. Generated by "
             "`scripts/plan_results.py`.", "",
             "| budget | compression | bits/entry (calibration) | attn_out_rel calibration | bits/entry (held-out) | "
             "attn_out_rel held-out | bits/entry in eval | ppl delta (held-out text) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "eval" not in r:
            continue
        lines.append(f"| {r['budget']:g} | {r['what']}: {r['label']} | {r['calib']['bits']:.4f} | "
                     f"{r['calib']['attn_out_rel']:.4f} | {r['heldout']['bits']:.4f} | {r['heldout']['attn_out_rel']:.4f} | "
                     f"{r['eval']['bits']:.4f} | {100 * r['eval']['delta_rel']:+.2f}% |")
    lines += ["", "Verdicts:", ""]
    for plan in (r for r in rows if r["what"] == "plan" and "eval" in r):
        lines += [verdict(plan, r) for r in rows if r["budget"] == plan["budget"] and r["what"] != "plan" and "eval" in r]
        over = {where: plan[key]["bits"] - plan["budget"] for where, key in
                (("on the held-out capture", "heldout"), ("inside the model (kvc eval)", "eval"))
                if plan[key]["bits"] > plan["budget"]}
        if over:
            lines.append(f"- {plan['budget']:g} bits: the plan stays within the budget on the calibration capture; "
                         "**it exceeds it** " + ", ".join(f"{where} by {x:.4f} bits per entry" for where, x in over.items())
                         + " (eOptShrinkQ's and svdq's ranks, hence their factor bits, follow the data).")
    first = next(iter(plans.values()))
    lines += ["", "Every candidate applied uniformly, coded per head as the plan codes it, against the plans "
              "(predicted on the calibration capture from the measured points: bits per entry and "
              "attn_out_rel = mean over heads of sqrt(e_K + e_V); no separate run):", "",
              "| compression | bits/entry | predicted attn_out_rel |", "|---|---|---|"]
    entries = [(f"**kvc plan --budget {b:g}**", p.bits_per_entry, p.attn_out_rel) for b, p in plans.items()]
    for r in {r["label"]: r for r in rows}.values():  # the plan at the bits of each uniform method measured
        if r["what"] != "plan":
            u = next(u for u in first.uniform if u["label"] == r["label"])
            p = kvc.plan(args.calibration, u["bits_per_entry"], points=first)
            entries.append((f"**kvc plan --budget {u['bits_per_entry']:.4f}** ({r['label']}'s bits)",
                            p.bits_per_entry, p.attn_out_rel))
    entries += [(u["label"], u["bits_per_entry"], u["attn_out_rel"]) for u in first.uniform]
    for label, bits, rel in sorted(entries, key=lambda e: e[1]):
        lines.append(f"| {label} | {bits:.4f} | {rel:.4f} |")
    for b, p in plans.items():
        j = p.to_json()
        choices = ", ".join(f"{k} x{v}" for k, v in sorted(j["choices"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"The plan at {b:g} bits (predicted on the calibration capture: {j['bits_per_entry']:.4f} bits "
                  f"per entry, attn_out_rel {j['attn_out_rel']:.4f}) uses: {choices}."]
    lines += ["", "![bits per layer and head at 2.5 bits](plan/plan-2.5.png) "
              "![bits per layer and head at 3 bits](plan/plan-3.png)", "", END]
    replace_section(path, BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
