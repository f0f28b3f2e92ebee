"""Hostile and careless command lines: the exit-code contract at the one entry point (kvc.cli.main).

Bad input: exit 2 and one line on stderr, never a traceback; outputs are checked before any work,
never replace an input, and an interrupt or a refusal changes no file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kvc.cli.console
from kvc.analysis.plots import PLOT_FILES

ROOT = Path(__file__).resolve().parents[1]
POLICY = "[limits]\nbits_per_entry = 20\n"


def refused(outcome, *needles: str) -> str:
    """Assert exit 2 with exactly one line on stderr holding every needle; return the line."""
    code, _, stderr = outcome
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("kvc: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr
    return stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path, synth_capture, run):
    """Inputs of every kind: a capture, a compressed file, results JSON, a policy, a text file."""
    capture = synth_capture(num_layers=2, seq_len=64, head_dim=16, num_kv_heads=1, num_heads=2, strengths=[4.0])
    compressed = tmp_path / "c.kvcz"
    results = tmp_path / "results.json"
    code, _, stderr = run("compress", capture, "--method", "fp16", "--out", compressed, "--json", results)
    assert code == 0, stderr
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    text = tmp_path / "text.txt"
    text.write_text("a few words of text\n")
    return {"CAP": capture, "KVCZ": compressed, "RESULTS": results, "POLICY": policy, "TEXT": text}


def fill(template: list[str], files: dict, **more) -> list[str]:
    names = {**files, **more}
    return [str(names.get(a, a)) for a in template]


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("debug", [[], ["--debug"]])
@pytest.mark.parametrize("args, needle", [
    (["nosuch"], "No such command 'nosuch'"),
    (["info", "--bogus"], "No such option: --bogus"),
    (["info"], "Missing argument 'path'"),
    (["budget", "--batch", "x"], "Invalid value for '--batch'"),
])
def test_usage_errors_exit_2_with_one_line(run, args, needle, debug):
    line = refused(run(*args, *debug), needle)
    assert f"(see kvc {args[0]} --help)" in line or "(see kvc --help)" in line


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_neither_method_nor_plan_names_the_help(run, command):
    refused(run(command, "X"), "give --method NAME (with its options) or --plan PLAN", f"(see kvc {command} --help)")


def test_bare_kvc_prints_the_help_and_exits_2(run):
    code, stdout, stderr = run()
    assert code == 2 and "Usage" in stdout and "compress" in stdout
    assert stderr == "kvc: error: kvc needs arguments (see its help above)\n"


@pytest.mark.parametrize("debug", [[], ["--debug"]])
@pytest.mark.parametrize("raised, code, line", [
    (OSError(5, "Input/output error", "disk.safetensors"), 2, "kvc: error: disk.safetensors: Input/output error"),
    (ValueError("a bug"), 3, "kvc: internal error: ValueError: a bug (rerun with --debug for the traceback)"),
])
def test_errors_below_the_commands_map_to_exit_codes(run, monkeypatch, raised, code, line, debug):
    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr("kvc.cli.commands.info.read_kvc_header", broken)
    got, _, stderr = run("info", "x", *debug)
    assert got == code
    if debug:  # the traceback, then the same line
        assert stderr.startswith("Traceback") and stderr.endswith("\n" + line + "\n")
    else:
        assert stderr == line + "\n"


def test_an_error_line_with_newlines_and_escapes_stays_one_line(run, tmp_path):
    hostile = tmp_path / "a\nb\x1b[31m.safetensors"
    line = refused(run("info", hostile), "no such file")
    assert "a\\nb\\x1b[31m.safetensors" in line


# ----------------------------------------------------------------------------- outputs

# every command that writes: OUT is the output option's value; the second value is the first file
# the command writes under OUT when OUT is a folder
WRITERS = [
    pytest.param(["synth", "-o", "OUT"], "", id="synth -o"),
    pytest.param(["compress", "CAP", "--method", "fp16", "--out", "OUT"], "", id="compress --out"),
    pytest.param(["compress", "CAP", "--method", "fp16", "--json", "OUT"], "", id="compress --json"),
    pytest.param(["decompress", "KVCZ", "-o", "OUT"], "", id="decompress -o"),
    pytest.param(["analyze", "CAP", "--json", "OUT"], "", id="analyze --json"),
    pytest.param(["analyze", "CAP", "--plots", "OUT"], PLOT_FILES[0], id="analyze --plots"),
    pytest.param(["sweep", "CAP", "--methods", "fp16,int", "--bits", "4", "-o", "OUT"], "sweep.json", id="sweep -o"),
    pytest.param(["budget", "--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--json", "OUT"], "",
                 id="budget --json"),
    pytest.param(["check", "RESULTS", "--policy", "POLICY", "--json", "OUT"], "", id="check --json"),
    pytest.param(["check", "RESULTS", "--policy", "POLICY", "--junit", "OUT"], "", id="check --junit"),
    pytest.param(["check", "RESULTS", "--policy", "POLICY", "--markdown", "OUT"], "", id="check --markdown"),
    pytest.param(["capture", "--text", "TEXT", "-o", "OUT"], "", id="capture -o"),  # before the model loads
    pytest.param(["eval", "--method", "fp16", "--json", "OUT"], "", id="eval --json"),
]
FOLDER_WRITERS = [w for w in WRITERS if w.values[1]]


@pytest.fixture
def no_work(monkeypatch, files):
    """Any computation or model load fails loudly (exit 3): a refusal must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    for target in ("kvc.compression.engine.run", "kvc.compression.engine.decompress",
                   "kvc.api.analyze_capture", "kvc.api.open_model", "kvc.model.load.load_config",
                   "kvc.model.load.load_model", "kvc.api.synthesize", "kvc.ci.budget.budget",
                   "kvc.ci.check.evaluate"):
        monkeypatch.setattr(target, forbidden)


@pytest.mark.parametrize("template, first", WRITERS)
def test_unwritable_output_is_refused_before_the_work(run, files, tmp_path, monkeypatch, no_work, template, first):
    out = tmp_path / "out" / "deeper" / "result"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", denied)
    refused(run(*fill(template, files, OUT=out)), f"cannot write {out / first if first else out}",
            "Permission denied")
    assert not (tmp_path / "out").exists()  # no folder made for a refused output


@pytest.mark.parametrize("template, first", WRITERS)
def test_existing_output_needs_force_and_stays(run, files, tmp_path, no_work, template, first):
    out = tmp_path / "out"
    target = out / first if first else out
    target.parent.mkdir(exist_ok=True)
    target.write_text("keep me")
    refused(run(*fill(template, files, OUT=out)), f"{target} already exists; pass --force")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("template, first", WRITERS)
def test_directory_as_output_file_is_refused(run, files, tmp_path, no_work, template, first):
    out = tmp_path / "out"
    target = out / first if first else out
    target.mkdir(parents=True)
    refused(run(*fill(template, files, OUT=out), "--force"), f"{target} is a directory, not a file")


@pytest.mark.parametrize("template, first", FOLDER_WRITERS)
def test_output_folder_that_is_a_file_is_refused(run, files, tmp_path, no_work, template, first):
    out = tmp_path / "out"
    out.write_text("a file")
    refused(run(*fill(template, files, OUT=out), "--force"), f"cannot write {out / first}: {out} is a file, not a folder")
    assert out.read_text() == "a file"


@pytest.mark.parametrize("template, same", [
    (["compress", "CAP", "--method", "fp16", "--out", "CAP", "--force"], "CAP"),
    (["compress", "CAP", "--method", "fp16", "--json", "CAP", "--force"], "CAP"),
    (["compress", "CAP", "--method", "fp16", "--out", "LINK", "--force"], "CAP"),
    (["decompress", "KVCZ", "-o", "KVCZ", "--force"], "KVCZ"),
    (["decompress", "KVCZ", "-o", "CAP", "--queries", "CAP", "--force"], "CAP"),
    (["analyze", "CAP", "--json", "CAP", "--force"], "CAP"),
    (["sweep", "CAP", "--methods", "fp16,int", "--bits", "4", "-o", "DIR", "--force"], "CAP"),
    (["check", "RESULTS", "--policy", "POLICY", "--json", "RESULTS", "--force"], "RESULTS"),
    (["check", "RESULTS", "--policy", "POLICY", "--markdown", "POLICY", "--force"], "POLICY"),
    (["budget", "--from-json", "RESULTS", "--layers", "1", "--kv-heads", "1", "--head-dim", "8",
      "--json", "RESULTS", "--force"], "RESULTS"),
    (["capture", "--text", "TEXT", "-o", "TEXT", "--force"], "TEXT"),
])
def test_output_never_replaces_an_input_even_with_force(run, files, tmp_path, no_work, template, same):
    link = tmp_path / "link.safetensors"
    link.symlink_to(files["CAP"])
    folder = tmp_path / "sweep"  # sweep writes sweep.json into DIR: make DIR/sweep.json the capture
    folder.mkdir()
    (folder / "sweep.json").hardlink_to(files["CAP"])
    before = {name: digest(path) for name, path in files.items()}
    refused(run(*fill(template, files, LINK=link, DIR=folder)), f"is also an input ({files[same]})")
    assert {name: digest(path) for name, path in files.items()} == before


def test_two_outputs_on_one_file_are_refused(run, files, tmp_path, no_work):
    out = tmp_path / "both"
    refused(run("compress", files["CAP"], "--method", "fp16", "--out", out, "--json", out),
            f"{out} is also another output")
    assert not out.exists()


# ----------------------------------------------------------------------------- inputs


READERS = [
    ["info", "IN"], ["analyze", "IN"], ["compress", "IN", "--method", "fp16"], ["decompress", "IN"],
    ["decompress", "KVCZ", "--queries", "IN", "-o", "OUT"], ["sweep", "IN", "-o", "OUT"],
    ["capture", "--text", "IN", "-o", "OUT"], ["eval", "--method", "fp16", "--text", "IN"],
    ["budget", "--from-json", "IN", "--layers", "1", "--kv-heads", "1", "--head-dim", "8"],
    ["check", "IN", "--policy", "POLICY"], ["check", "RESULTS", "--policy", "IN"],
    ["check", "RESULTS", "--policy", "POLICY", "--baseline", "IN"],
]


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
@pytest.mark.parametrize("template", READERS, ids=[" ".join(r[:3]) for r in READERS])
def test_unreadable_inputs_exit_2_naming_the_path(run, files, tmp_path, template, kind):
    path = tmp_path / f"input-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads every file")
        path.write_text("{}")
        path.chmod(0)
    refused(run(*fill(template, files, IN=path, OUT=tmp_path / "out")), str(path))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- interrupts and stale files


def test_ctrl_c_prints_aborted_and_exits_130(run, files, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvc.cli.commands.info.read_kvc_header", interrupted)
    assert run("info", files["CAP"]) == (130, "", "kvc: aborted\n")


INTERRUPTED_WRITE = """
import sys, time
import safetensors.torch
from kvc.cli import main

def slow_save(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)

safetensors.torch.save_file = slow_save
sys.exit(main(sys.argv[1:]))
"""


def start_slow_write(out: Path, *more: str) -> subprocess.Popen:
    """``kvc synth -o out`` in a subprocess that stops inside the write, its temporary file made."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITE, "synth", "--seq-len", "16", "--head-dim", "8",
                             "--strengths", "2", "-o", str(out), *more], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_sigint_during_a_write_leaves_no_file(tmp_path):
    proc = start_slow_write(tmp_path / "synth.safetensors")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "kvc: aborted\n", stderr
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary file


def test_what_sigkill_leaves_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "synth.safetensors"
    out.write_text("old")
    killed = start_slow_write(out, "--force")
    killed.kill()
    killed.communicate(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p != out]
    assert len(left) == 1 and left[0].startswith(".synth.safetensors.") and out.read_text() == "old"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys; from kvc.cli import main; sys.exit(main())", "synth",
                           "--seq-len", "16", "--head-dim", "8", "--strengths", "2", "-o", str(out), "--force"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and out.read_bytes()[8:9] == b"{"


def test_stale_temporary_files_are_removed_on_the_next_write(run, tmp_path):
    out = tmp_path / "budget.json"
    old = time.time() - 3600
    names = {"stale": ".budget.json.k3x_9a0b.tmp", "locked": ".budget.json.locked00.tmp",
             "fresh": ".budget.json.fresh000.tmp", "other_target": ".other.json.k3x_9a0b.tmp",
             "other_pattern": ".budget.json.notkvc.tmp", "user_file": "budget.json.k3x_9a0b.tmp"}
    paths = {key: tmp_path / name for key, name in names.items()}
    for key, path in paths.items():
        path.write_text(key)
        if key != "fresh":
            os.utime(path, (old, old))
    with open(paths["locked"], "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer still at work
        code, _, stderr = run("budget", "--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--json", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["batch"] == 1
    assert {key for key, path in paths.items() if path.exists()} == set(names) - {"stale"}


# ----------------------------------------------------------------------------- markup and reports

HOSTILE = "[/x][link=http://e]c[/link]\x1b]8;;http://e\x1b\\d\x1b[2J"  # markup, an OSC 8 link, clear screen
SHOWN = "[/x][link=http://e]c[/link]\\x1b]8;;http://e\\x1b\\d\\x1b[2J"


def test_metadata_is_printed_as_text_not_markup_nor_terminal_codes(run, tmp_path, monkeypatch):
    from kvc.io.safetensors import save_safetensors
    from kvc.model.synth import SpikedSpec, synthesize

    tensors, meta = synthesize(SpikedSpec(num_layers=1, seq_len=32, head_dim=8, num_kv_heads=1, num_heads=1,
                                          strengths=[3.0]))
    path = tmp_path / "[bold]x.safetensors"
    save_safetensors(path, tensors, {**meta.to_strings(), "model": HOSTILE})
    for console in (kvc.cli.console.out, kvc.cli.console.err):
        monkeypatch.setattr(console, "width", 400)
    code, stdout, stderr = run("info", path)
    assert code == 0, stderr
    assert SHOWN in stdout and f"{path}: metadata" in stdout and "\x1b" not in stdout
    code, stdout, stderr = run("analyze", path)
    assert code == 0, stderr
    assert f"kvc analyze {path} ({SHOWN})" in stdout and "\x1b" not in stdout


def test_check_reports_keep_hostile_labels_inert(run, files, tmp_path):
    label = "<img src=x> @everyone [click](http://a) `x` | :x: \x01"
    result = json.loads(files["RESULTS"].read_text())
    results = tmp_path / "hostile.json"
    results.write_text(json.dumps({**result, "label": label}))
    junit, markdown = tmp_path / "j.xml", tmp_path / "c.md"
    code, stdout, stderr = run("check", results, "--policy", files["POLICY"], "--junit", junit, "--markdown", markdown)
    assert code == 0, stderr
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert cases and all(case.get("classname") == label.replace("\x01", "\ufffd") for case in cases)
    rows = [line for line in markdown.read_text().splitlines() if "everyone" in line]
    assert rows
    for row in rows:
        # the label is one code span (its pipe escaped for the table); outside code spans nothing is left
        assert row.startswith("| ``<img src=x> @everyone [click](http://a) `x` \\| :x: \x01`` |")
        bare = re.sub(r"(`+).+?\1", "", row)
        assert not any(c in bare for c in "<@[]()`:"), row


# ----------------------------------------------------------------------------- models and nonsense


def test_sweep_e2e_needs_a_model_on_the_command_line(run, files, tmp_path, no_work):
    refused(run("sweep", files["CAP"], "--methods", "fp16", "--e2e", "-o", tmp_path / "sweep"), "--e2e needs --model")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, needle", [
    (["--strengths", "nan,inf"], "must be finite numbers"),
    (["--strengths", "3", "--sigma", "nan"], "must be finite numbers"),
    (["--outlier-scale", "inf"], "must be finite numbers"),
    (["--outlier-channels", "inf"], "--outlier-channels 'inf': expected comma-separated integers"),
    (["--layers", "99999999999999999999"], "synth: the capture in float32 needs"),  # refused before allocating
])
def test_synth_refuses_non_finite_numbers(run, tmp_path, args, needle):
    out = tmp_path / "s.safetensors"
    refused(run("synth", *args, "-o", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("options, needle", [
    (["--method", "kivi", "--bits", "2", "--group-size", "48"], "kivi: --group-size must divide head_dim 16, got 48"),
    (["--method", "eoptshrinkq", "--bits", "2.5"], "--bits expects int, got '2.5'"),
    (["--method", "turboquant", "--bits", "3.3"], "3.3 bits at d = 16"),
])
def test_budget_validates_method_options_as_compress_does(run, files, options, needle):
    compress = refused(run("compress", files["CAP"], *options), needle)
    budget = refused(run("budget", "--layers", "2", "--kv-heads", "1", "--head-dim", "16", *options), needle)
    assert budget == compress


@pytest.mark.parametrize("command", [["analyze"], ["compress", "--method", "fp16"]])
@pytest.mark.parametrize("layers, needle", [
    ("1-0", "--layers '1-0': the range 1-0 is reversed, so empty (write 0-1)"),
    ("0-99999999999999", "--layers '0-99999999999999': values must lie in 0..1"),  # not expanded first
    ("1-", "--layers '1-': expected a list like '0,2,5-9'"),
])
def test_layer_lists_reversed_huge_or_malformed(run, files, command, layers, needle):
    refused(run(command[0], files["CAP"], *command[1:], "--layers", layers), needle)


def test_sweep_with_nothing_runnable_writes_nothing(run, files, tmp_path):
    out = tmp_path / "sweep"
    refused(run("sweep", files["CAP"], "--methods", "h2o", "-o", out), "nothing to run: h2o: h2o has no --bits option")
    assert not out.exists()


def test_info_lists_tensors_whatever_their_names(run, tmp_path):
    """Names mixing numbers and words in one place sort (numbers by value, before words), no crash."""
    import torch

    from kvc.io.safetensors import save_safetensors

    path = tmp_path / "odd.safetensors"
    names = ["x", "layers.10.k", "layers.9.k", "layers.a.k", "layers.\u0663.k"]  # \u0663: Arabic-Indic 3
    save_safetensors(path, {name: torch.zeros(1) for name in names}, {"format": "kvc-other"})
    code, out, err = run("info", path)
    assert (code, err) == (0, "")
    shown = sorted(names, key=out.index)
    assert shown == ["layers.\u0663.k", "layers.9.k", "layers.10.k", "layers.a.k", "x"]
