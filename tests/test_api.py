"""The public Python API: docs/api.md's examples run; Python gives the CLI's numbers on the same
inputs; ``import kvc`` stays light; options are validated as the command line validates them."""

from __future__ import annotations

import ast
import gc
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import kvc
from kvc.ci.check import RunSpec, run_policy
from kvc.compression.options import parse_method_args
from kvc.compression.registry import get
from kvc.errors import KvcError
from kvc.io.capture import CaptureFile
from kvc.metrics.pareto import pareto_front
from kvc.model.load import ModelSource, model_revision

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, NUM_SEQS = 24, 2


# ----------------------------------------------------------------------------- docs/api.md


def _doc_blocks() -> list:
    """Each python block of docs/api.md; a block after ``<!-- test: model -->`` needs the real model."""
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"(<!-- test: model -->\n)?```python\n(.*?)```", text, re.S)
    return [pytest.param(code, id=f"block{i}", marks=[pytest.mark.model] if marker else [])
            for i, (marker, code) in enumerate(blocks)]


def test_docs_have_both_examples():
    assert [[mark.name for mark in p.marks] for p in _doc_blocks()] == [["model"], []]


@pytest.mark.parametrize("code", _doc_blocks())
def test_docs_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "docs_api"})
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert written >= ({"capture.safetensors", "turboquant.safetensors"} if "kvc.capture(" in code
                       else {"synth.safetensors", "scree.png", "rank_heatmap.png", "channel_magnitude.png"})


# ----------------------------------------------------------------------------- the light face


def test_import_kvc_imports_no_torch():
    heavy = ("torch", "transformers", "scipy", "matplotlib", "numpy", "safetensors")
    code = ("import sys, kvc; dir(kvc); kvc.__all__; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves():
    assert set(kvc.__all__) <= set(dir(kvc))
    for name in kvc.__all__:
        assert callable(getattr(kvc, name)), name
    assert kvc.compressing is kvc.eval.generate.compressing and kvc.load is kvc.api.load
    assert kvc.Capture.__doc__ and "Attributes" in kvc.Compression.__doc__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        kvc.nope  # noqa: B018
    members = dict(inspect.getmembers(kvc))  # what help(kvc) walks: every name, or AttributeError
    assert set(kvc.__all__) <= set(members) and members["compress"] is kvc.compress


# ----------------------------------------------------------------------------- options


def test_method_options_validated_like_the_command_line():
    cls = get("int")
    cli, _ = parse_method_args(cls, ["--bits", "2", "--symmetric"], ["axis=channel"])
    assert kvc.method("int", bits=2, axis="channel", symmetric=True).params() == \
        kvc.method("int", **cli).params() == kvc.method("int", bits="2", axis="channel",
                                                        symmetric="yes").params()
    assert cli["symmetric"] is True and kvc.method("int").options.symmetric is False
    assert kvc.method("turboquant", bits=2).options.bits == 2.0
    with pytest.raises(KvcError, match=r"^bits expects float, got 'two'$"):
        kvc.method("turboquant", bits="two")
    with pytest.raises(KvcError, match=r"^group_size expects int, got 2\.5$"):
        kvc.method("kivi", **{"group-size": 2.5})
    with pytest.raises(KvcError, match=r"^symmetric expects bool, got 1$"):
        kvc.method("int", symmetric=1)
    with pytest.raises(KvcError, match=r"^method turboquant has no option bitz; valid options: seed, keys"):
        kvc.method("turboquant", bitz=2)
    with pytest.raises(KvcError, match=r"^turboquant: --variant must be one of mse, prod, got 'max'$"):
        kvc.method("turboquant", variant="max")
    with pytest.raises(KvcError, match=r"^unknown method 'nope'; valid methods: "):
        kvc.method("nope")


def test_methods_is_the_registry_of_kvc_methods(run):
    code, out, err = run("methods", "--json")
    assert code == 0, err
    assert list(kvc.methods().values()) == json.loads(out)["methods"]
    bits = next(o for o in kvc.methods()["kivi"]["options"] if o["name"] == "bits")
    assert bits["flag"] == "--bits" and bits["default"] == kvc.method("kivi").options.bits


def test_bad_arguments_raise_the_command_lines_errors(synth_capture):
    path = synth_capture(seq_len=32)
    with pytest.raises(KvcError, match=r"^method turboquant is already configured; give its options"):
        kvc.compress(path, kvc.method("turboquant"), bits=2)
    with pytest.raises(KvcError, match=r"^--query-stride must be >= 1$"):
        kvc.compress(path, "turboquant", query_stride=0)
    with pytest.raises(KvcError, match=r"^--rank-rule must be eoptshrinkq or matlab, not 'x'$"):
        kvc.analyze(path, rank_rule="x")
    with pytest.raises(KvcError, match=r"^--tensors \['q'\]: choose from k_pre, k, v$"):
        kvc.analyze(path, tensors=["q"])
    with pytest.raises(KvcError, match=r"^--layers '5': values must lie in 0\.\.1$"):
        kvc.compress(path, "turboquant", layers=[5])
    with pytest.raises(KvcError, match=r"^capture: expected a Capture or the path of a capture file, got int$"):
        kvc.analyze(3)
    with pytest.raises(KvcError, match=r"^pass one of measured=, from_json= or method=$"):
        kvc.budget(measured={}, method="fp8")
    with pytest.raises(KvcError, match=r"^method options \(bits\) need method=$"):
        kvc.budget(head_dim=64, layers=1, kv_heads=1, bits=2)
    with pytest.raises(KvcError, match=r"^kivi: --group-size must divide head_dim 64, got 48$"):
        kvc.budget(head_dim=64, layers=1, kv_heads=1, method="kivi", group_size=48)


def test_decompress_to_a_temporary_file(synth_capture, tmp_path):
    cap = kvc.load(synth_capture(seq_len=32))
    stored = kvc.compress(cap, "kivi", bits=4, residual=0, device="cpu").save(tmp_path / "c.safetensors")
    restored = kvc.decompress(stored, queries=cap, device="cpu")
    path = restored.path
    assert restored.decompressed_from["method"] == "kivi" and path.is_file()
    assert kvc.compress(restored, "fp16", device="cpu").bits_per_entry == 16
    del restored
    gc.collect()
    assert not path.exists()
    with pytest.raises(KvcError, match=r"^this compression kept no encoded arrays \(compress\(\.\.\., keep=False"):
        kvc.compress(cap, "kivi", bits=4, residual=0, keep=False, device="cpu").save(tmp_path / "x.safetensors")


def test_sweep_points_fronts_and_files(synth_capture, tmp_path):
    sweep = kvc.sweep(synth_capture(seq_len=64), methods="turboquant,int", bits=[2, 4], keys="post",
                      compare="turboquant:int", device="cpu")
    points = sweep.points("k", "mse_rel")
    expected = {}
    for run in sweep.runs:
        k = run["result"]["summary"]["k"]
        expected.setdefault(run["method"], []).append((k["bits_per_entry"], k["mse_rel"], run["bits"]))
    assert points == {m: sorted(p) for m, p in expected.items()} and [len(p) for p in points.values()] == [2, 2]
    for view, metric in (("k", "mse_rel"), ("k", "attn_out_rel"), ("v", "mse_rel")):
        assert {m: pareto_front(p) for m, p in sweep.points(view, metric).items()} == sweep.pareto[view][metric]
    assert sweep.points("k_pre", "mse_rel") == {} and sweep.points("v", "attn_kl") == {}
    with pytest.raises(KvcError, match=r"^no view 'q' or metric 'mse_rel': views k_pre, k, v; metrics mse_rel, "):
        sweep.points("q", "mse_rel")
    assert sweep.metrics["mse_rel"] == "relative MSE" and len(sweep.metrics) == 8

    paths = sweep.save(tmp_path / "out")
    assert [p.name for p in paths] == ["sweep.json", *(f"pareto_{m}.png" for m in sweep.metrics)]
    assert all(p.is_file() for p in paths)
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(sweep.to_json()))
    with pytest.raises(KvcError, match=r"sweep\.json already exists; pass --force to overwrite it$"):
        sweep.save(tmp_path / "out")
    assert sweep.save(tmp_path / "out", force=True) == paths


def test_write_text_is_atomic_and_overwrites_only_with_force(tmp_path):
    path = tmp_path / "new" / "report.md"
    kvc.write_text(path, "pi \u2248 3.14\n")
    assert path.read_bytes() == "pi \u2248 3.14\n".encode("utf-8")
    with pytest.raises(KvcError, match=r"report\.md already exists; pass --force to overwrite it$"):
        kvc.write_text(path, "other")
    kvc.write_text(path, "other", force=True)
    assert path.read_text() == "other" and [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_scripts_use_only_the_public_api():
    """scripts/ import ``kvc`` and use its public names only (make_ci_baseline.py runs ``kvc check``
    itself, through the command line)."""
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        allowed = {"kvc", "kvc.cli"} if script.name == "make_ci_baseline.py" else {"kvc"}
        assert {m for m in modules if m.split(".")[0] == "kvc"} <= allowed, script.name
        used = {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kvc"}
        assert used <= set(kvc.__all__), (script.name, used - set(kvc.__all__))


def test_model_revision_of_a_gguf_file_is_its_content_hash(tmp_path):
    import hashlib

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 9)
    expected = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert model_revision(ModelSource("m.gguf", "gguf", str(gguf))) == expected
    assert model_revision(ModelSource("m.gguf", "gguf", str(gguf)), "v1") == "v1"
    assert model_revision(ModelSource("m", "dir", str(tmp_path))) == ""


# ----------------------------------------------------------------------------- Python = CLI


def _drop(data, keys=("seconds", "created")):
    """``data`` as JSON has it, without the timing keys at any depth."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in keys}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(json.dumps(data)))


def _same_capture(a: CaptureFile, b: CaptureFile) -> None:
    assert {k: v for k, v in vars(a.meta).items() if k != "created"} == \
        {k: v for k, v in vars(b.meta).items() if k != "created"}
    assert a.shapes() == b.shapes()
    for layer in a.layers:
        for name in sorted(a.names(layer)):
            torch.testing.assert_close(a.tensor(layer, name), b.tensor(layer, name), rtol=0, atol=0)
    torch.testing.assert_close(a.input_ids, b.input_ids, rtol=0, atol=0)


def test_python_gives_the_clis_numbers(run, tiny, tmp_path):
    model, text = tiny
    common = {"seq_len": SEQ_LEN, "num_seqs": NUM_SEQS, "device": "cpu"}
    code, _, err = run("capture", "--model", model, "--text", text, "--seq-len", SEQ_LEN, "--num-seqs", NUM_SEQS,
                       "--device", "cpu", "-o", tmp_path / "cli.safetensors")
    assert code == 0, err
    cli_capture = CaptureFile(tmp_path / "cli.safetensors")
    python_capture = kvc.capture(str(model), text, out=tmp_path / "py.safetensors", **common)
    _same_capture(cli_capture, python_capture)
    assert python_capture.summary.num_seqs == NUM_SEQS and python_capture.meta.model == model.name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    _same_capture(cli_capture, kvc.capture(loaded, text, tokenizer=tokenizer, out=tmp_path / "obj.safetensors",
                                           **common))

    capture = tmp_path / "cli.safetensors"  # the same input to both from here on
    code, _, err = run("analyze", capture, "--json", tmp_path / "a.json", "--device", "cpu")
    assert code == 0, err
    assert _drop(kvc.analyze(capture, device="cpu").to_json()) == \
        _drop(json.loads((tmp_path / "a.json").read_text()))

    kivi = ("--bits", "2", "--residual", "8", "--group-size", "8")
    code, _, err = run("compress", capture, "-m", "kivi", *kivi, "--json", tmp_path / "c.json", "--device", "cpu")
    assert code == 0, err
    compression = kvc.compress(capture, "kivi", bits=2, residual=8, group_size=8, device="cpu")
    cli = json.loads((tmp_path / "c.json").read_text())
    assert _drop(compression.to_json()) == _drop(cli)
    assert compression.bits_per_entry == cli["bits_per_entry"] and compression.heads == cli["heads"]

    code, _, err = run("eval", "--method", "kivi", *kivi, "--model", model, "--text", text, "--contexts", "32",
                       "--windows", "1", "--continuation", "8", "--depths", "0.5",
                       "--needles", "2", "--json", tmp_path / "e.json", "--device", "cpu")
    assert code == 0, err
    evaluation = kvc.evaluate("kivi", str(model), text, bits=2, residual=8, group_size=8, contexts=[32],
                              windows=1, continuation=8, depths=[0.5], needles=2, device="cpu")
    cli = json.loads((tmp_path / "e.json").read_text())
    assert _drop(evaluation.to_json()) == _drop(cli)
    evaluation = kvc.evaluate(kvc.method("kivi", bits=2, residual=8, group_size=8), loaded, text,
                              tokenizer=tokenizer, contexts="32", windows=1, continuation=8, depths=[0.5], needles=2)
    assert _drop(evaluation.to_json()) == _drop(cli)

    code, _, err = run("budget", "--model", model, "--from-json", tmp_path / "c.json", "--context", "1k,4k",
                       "--json", tmp_path / "b.json")
    assert code == 0, err
    cli = json.loads((tmp_path / "b.json").read_text())
    assert _drop(kvc.budget(str(model), from_json=tmp_path / "c.json", context="1k,4k").to_json()) == cli
    measured = kvc.budget(str(model), measured=compression, context=[1024, 4096]).to_json()
    assert measured["contexts"] == cli["contexts"] and measured["compressed"]["source"] == "kvc.compress"

    code, _, err = run("sweep", capture, "--methods", "kivi,turboquant", "--bits", "2,4", "--keys", "post",
                       "--compare", "turboquant:kivi", "--opt", "kivi.residual=8", "--opt", "group_size=8",
                       "-o", tmp_path / "sweep", "--device", "cpu")
    assert code == 0, err
    sweep = kvc.sweep(capture, methods=["kivi", "turboquant"], bits=[2, 4], keys=["post"],
                      compare=[("turboquant", "kivi")], options={"kivi.residual": 8, "group_size": 8}, device="cpu")
    cli = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep.runs) == 4 and _drop(sweep.to_json()) == _drop(cli)


def test_load_model_loads_once_for_capture_and_evaluate(tiny, tmp_path):
    model, text = tiny
    lm, tokenizer = kvc.load_model(model, device="cpu")
    assert isinstance(lm, transformers.LlamaForCausalLM) and not lm.training and lm.device.type == "cpu"
    common = {"seq_len": SEQ_LEN, "num_seqs": NUM_SEQS, "device": "cpu"}
    _same_capture(kvc.capture(str(model), text, out=tmp_path / "path.safetensors", **common),
                  kvc.capture(lm, text, tokenizer=tokenizer, out=tmp_path / "loaded.safetensors", **common))
    settings = {"contexts": [32], "windows": 1, "continuation": 8, "retrieval": False, "device": "cpu"}
    assert _drop(kvc.evaluate("int", lm, text, tokenizer=tokenizer, bits=4, **settings).perplexity) == \
        _drop(kvc.evaluate("int", str(model), text, bits=4, **settings).perplexity)
    with pytest.raises(KvcError, match=r"^model: expected a hub id, a directory or a GGUF file, got LlamaForCausalLM$"):
        kvc.load_model(lm)
    with pytest.raises(KvcError, match=r"^model not found: .*missing \(neither a file, a directory nor a hub id\)$"):
        kvc.load_model(tmp_path / "missing")


def test_check_writes_the_capture_metadata_of_kvc_capture(run, tiny, tmp_path):
    model, text = tiny
    spec = RunSpec(method="kivi", params=kvc.method("kivi", bits=4, residual=8, group_size=8).params(),
                   model=str(model), text=str(text), seq_len=SEQ_LEN, num_seqs=NUM_SEQS, layers="1", device="cpu")
    result = run_policy(spec, tmp_path)
    code, _, err = run("capture", "--model", model, "--text", text, "--seq-len", SEQ_LEN, "--num-seqs", NUM_SEQS,
                       "--layers", "1", "--device", "cpu", "-o", tmp_path / "cli.safetensors")
    assert code == 0, err
    _same_capture(CaptureFile(tmp_path / "capture.safetensors"), CaptureFile(tmp_path / "cli.safetensors"))
    python = kvc.compress(tmp_path / "cli.safetensors", "kivi", bits=4, residual=8, group_size=8,
                          device="cpu").to_json()
    assert result["bits_per_entry"] == python["bits_per_entry"]
    assert _drop(result["summary"]) == _drop(python["summary"])


def test_compressing_takes_options_as_kvc_method_does(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    ids = torch.arange(3, 27)[None]
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    with kvc.compressing(model, kvc.method("fp16")) as state:
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), plain)
    assert state.bits_per_entry == 16
    with pytest.raises(KvcError, match=r"^bits expects float, got 'two'$"):
        with kvc.compressing(model, "turboquant", bits="two"):
            pass
    with pytest.raises(KvcError, match=r"^method fp16 is already configured; give its options to "):
        with kvc.compressing(model, kvc.method("fp16"), seed=1):
            pass


@pytest.mark.model
def test_check_and_capture_record_the_same_model_revision(default_capture, tmp_path):
    """The default model is a GGUF file: both record its content hash as model_revision."""
    spec = RunSpec(method="turboquant", params=kvc.method("turboquant", bits=4).params(), seq_len=16, num_seqs=1,
                   layers="0", device="cpu")
    run_policy(spec, tmp_path)
    via_check = CaptureFile(tmp_path / "capture.safetensors").meta
    via_capture = CaptureFile(default_capture[0]).meta  # tests/conftest.py: made by kvc capture
    assert via_check.model_revision == via_capture.model_revision
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", via_check.model_revision)


# ----------------------------------------------------------------------------- models bigger than memory


def test_offloaded_capture_equals_the_normal_one(tiny, tmp_path):
    """--device-map auto with a tiny --max-memory puts the layers on disk (accelerate's offload); the
    capture is bit for bit the one of the model held in memory."""
    path, text = tiny
    lm, _ = kvc.load_model(path, device_map="auto", max_memory="cpu=1KB")
    assert set(lm.hf_device_map.values()) == {"disk"}  # the probe: the weights really are offloaded
    normal = kvc.capture(path, text, out=tmp_path / "normal.safetensors", seq_len=32, num_seqs=2)
    offloaded = kvc.capture(path, text, out=tmp_path / "offloaded.safetensors", seq_len=32, num_seqs=2,
                            device_map="auto", max_memory="1KB")
    _same_capture(normal, offloaded)


def test_offloaded_eval_equals_the_normal_one(tiny):
    path, text = tiny
    settings = dict(contexts=[64], windows=1, continuation=8, retrieval=False, proxies=False)
    normal = kvc.evaluate("int", path, text, bits=4, **settings).to_json()
    offloaded = kvc.evaluate("int", path, text, bits=4, device_map="auto", max_memory="cpu=1KB", **settings).to_json()
    assert _drop(offloaded["perplexity"]) == _drop(normal["perplexity"])


@pytest.mark.parametrize("device_map, max_memory, message", [
    ("auto", "20 gigs", "--max-memory '20 gigs': sizes look like 512MB or 20GB, got '20 gigs'"),
    ("auto", "gpu0=20GB", "--max-memory 'gpu0=20GB': devices are GPU indices or cpu, got 'gpu0'"),
    ("balanced", None, "--device-map must be auto, not 'balanced'"),
    (None, "20GB", "--max-memory goes with --device-map auto"),
])
def test_placement_options_are_checked(tiny, tmp_path, device_map, max_memory, message):
    with pytest.raises(KvcError, match=re.escape(message)):
        kvc.load_model(tiny[0], device_map=device_map, max_memory=max_memory)


def test_max_memory_as_accelerate_takes_it():
    from kvc.model.load import parse_max_memory

    assert parse_max_memory("0=20GB, 1=18.5gb,cpu=60GiB") == {0: "20GB", 1: "18.5GB", "cpu": "60GiB"}
    assert parse_max_memory("512MB") == {"cpu": "512MB"}


@pytest.mark.model
def test_default_model_offloaded_to_disk_captures_the_same(default_capture, tmp_path):
    """The default model with a tiny --max-memory: most layers on disk, the capture bit for bit the same."""
    lm, _ = kvc.load_model(device_map="auto", max_memory="cpu=20MB")
    assert "disk" in set(lm.hf_device_map.values())
    del lm
    normal = CaptureFile(default_capture[0])  # tests/conftest.py: the same options, the model held in memory
    offloaded = kvc.capture(out=tmp_path / "offloaded.safetensors", device_map="auto", max_memory="cpu=20MB",
                            seq_len=128, num_seqs=2, layers="0,1,29", query_positions="last:16")
    _same_capture(normal, offloaded)


@pytest.mark.model
def test_the_first_run_says_it_converts_the_gguf_file(tmp_path, monkeypatch):
    """With an empty cache, loading the default model first says it converts the GGUF file (once)."""
    from kvc.model import load

    said = []

    def stop(*args, **kwargs):
        raise KvcError("stopped before loading")

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(load, "load_config", stop)
    with pytest.raises(KvcError, match="stopped before loading"):
        load.open_model(None, status=said.append)
    assert len(said) == 1 and said[0].startswith("converting SmolLM2") and "first run only" in said[0]
