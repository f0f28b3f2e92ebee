"""``kvc check``: gate kvc results on a policy (limits, KV budget, physical memory, baseline)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..console import err, one_line, out
from ..options import Force, JsonOut
from ...errors import KvcError
from ...io import schema
from ...io.atomic import check_outputs, emit_json, write_text
from ..lazy import LazyModule

budgets = LazyModule("kvc.ci.budget")
lib = LazyModule("kvc.ci.check")

NAME = "check"


def command(
    results: Optional[List[Path]] = typer.Argument(None, metavar="RESULTS.json", help="kvc compress --json files (or kvc check --json reports); none: run the policy's \\[run] table."),
    policy_path: Path = typer.Option(..., "--policy", help="Policy file (TOML): limits, budget, memory and baseline tolerances, run."),
    baseline_path: Optional[Path] = typer.Option(None, "--baseline", help="A kvc check --json report to compare against."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per check)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown table for a pull-request comment."),
    json_path: JsonOut = None,
    force: Force = False,
) -> int:
    """Check results against a policy: exit 0 pass, 1 regression, 2 usage error."""
    start = time.perf_counter()
    policy = lib.load_policy(policy_path)
    baseline = lib.parse_baseline(schema.load_json(baseline_path, f"baseline {baseline_path}"), str(baseline_path)) if baseline_path else None
    check_outputs([junit, markdown, json_path], force, inputs=[policy_path, baseline_path, *(results or [])])
    geometry = None  # resolved before a long run, so a bad model fails fast
    if policy.budget is not None:
        model = policy.budget.model or (policy.run.model if policy.run else None)
        geometry = budgets.geometry_from_model(model)
    if results:
        loaded = [r for path in results for r in lib.parse_results(schema.load_json(path), str(path))]
    elif policy.run is not None:
        with tempfile.TemporaryDirectory(prefix="kvc-check-") as workdir, err.status("") as status:
            loaded = [lib.run_policy(policy.run, Path(workdir), lambda text: status.update(Text(text)))]
    else:
        raise KvcError(f"nothing to evaluate: give kvc results files or a [run] table in {policy_path}")
    checks = lib.evaluate(loaded, policy, baseline, geometry)
    if not checks:
        raise KvcError(f"{policy_path} checks nothing on these results: give limits, a [budget], a "
                       "--baseline, or results with physical memory figures")
    console = err if json_path == "-" else out
    console.print(_table(checks))
    for line in filter(None, map(lib.memory_line, loaded)):
        console.print(line)
    emit_json(json_path, lib.report(loaded, checks, str(policy_path)), force)
    if junit is not None:
        write_text(junit, lib.render_junit(checks, time.perf_counter() - start), force=force)
    if markdown is not None:
        write_text(markdown, lib.render_markdown(loaded, checks), force=force)
    failed = sum(not c.passed for c in checks)
    if failed:  # exit 1: the verdict with the table (stdout, or stderr with --json -), and one line on stderr
        console.print(Text.assemble(("FAIL", "bold red"), f": {failed} of {len(checks)} checks failed"))
        err.print(one_line(f"kvc: check failed: {', '.join(c.name for c in checks if not c.passed)}"), soft_wrap=True)
        return 1
    console.print(Text.assemble(("PASS", "bold green"), f": {len(checks)} checks"))
    return 0


def _table(checks: list[lib.Check]) -> Table:
    """One row per check; the result column only when several results are checked."""
    labels = list(dict.fromkeys(c.result for c in checks))
    table = Table(title="kvc check" + (f": {labels[0]}" if len(labels) == 1 else ""))
    columns = (("result", "left"),) * (len(labels) > 1) + (
        ("check", "left"), ("value", "right"), ("expected", "left"), ("status", "center"), ("detail", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for c in checks:
        cells = [c.name, lib.format_value(c), c.expected,
                 Text("pass", "green") if c.passed else Text("FAIL", "bold red"), c.detail]
        table.add_row(*([c.result] if len(labels) > 1 else []), *cells)
    return table
