"""kvc eval: the compressed cache inside the real default model; exactness, collapse, bit accounting."""

from __future__ import annotations

import json

import pytest
import torch

from kvc.eval import evaluate as ev
from kvc.compression.protocol import Compressor, Decoded, Encoded, Evictor, LayerKV
from kvc.compression.registry import build
from kvc.errors import MethodFailure
from kvc.model.text import load_corpus

TINY = ev.Settings(contexts=(128,), windows=1, continuation=16, retrieval=False)
NEEDLES = ev.Settings(contexts=(160,), windows=1, continuation=8, depths=(0.25, 0.5, 0.75), needles=3)


class ExactIdentity(Compressor):
    """Stores K and V as they are (float32): the exact identity path."""

    name = "exact-identity"
    summary = "test: K and V unchanged"

    def encode(self, layer: LayerKV) -> Encoded:
        return Encoded({"k": layer.k.clone(), "v": layer.v.clone()})

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        return Decoded(encoded.arrays["k"], encoded.arrays["v"])


class RandomKeys(ExactIdentity):
    """Deliberately broken: keys replaced by Gaussian noise of the same scale."""

    name = "random-keys"

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        k = encoded.arrays["k"]
        return Decoded(torch.randn(k.shape, generator=self.generator(layer.layer)) * k.std(), encoded.arrays["v"])


class KeepAll(Evictor):
    """An evictor that keeps every token (stored in fp16, as evictors store them): exercises compaction,
    masks and positions, and must match the fp16 method exactly."""

    name = "keep-all"
    summary = "test: evict nothing"

    def select(self, layer: LayerKV) -> torch.Tensor:
        return torch.ones(layer.shape[:3], dtype=torch.bool)


def test_compressed_layer_positions_and_mask():
    """A compacted prefix stands for its full length; appended tokens see the valid slots and the past."""
    valid = torch.tensor([[[True, True, False], [True, False, False]]])  # B=1, H=2, 3 slots
    layer = ev.CompressedLayer(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), valid, length=10)
    assert layer.get_seq_length() == 10
    layer.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    assert layer.get_seq_length() == 12
    assert layer.get_mask_sizes(1) == (6, 7)
    mask = layer.mask(2)
    assert mask.shape == (1, 2, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, False, True, False], [True, True, False, True, True]]
    assert mask[0, 1, :, :3].tolist() == [[True, False, False]] * 2


class Unchanged(ExactIdentity):
    """Deliberately broken: stores 1 bit per entry, but decodes K and V from the layer it is shown."""

    name = "unchanged"

    def encode(self, layer: LayerKV) -> Encoded:
        return Encoded({"k": torch.zeros(layer.entries // 8, dtype=torch.uint8),
                        "v": torch.zeros(layer.entries // 8, dtype=torch.uint8)})

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        return Decoded(layer.k, layer.v)


class TensorMeta(ExactIdentity):
    """Deliberately broken: keeps a tensor in its metadata, where no bit is counted."""

    name = "tensor-meta"

    def encode(self, layer: LayerKV) -> Encoded:
        return Encoded({"k": layer.k.clone(), "v": layer.v.clone()}, {"scale": torch.ones(1)})


def test_eval_compresses_through_the_audited_engine_path():
    """kvc eval's layers take engine.encode_decode, with every check of kvc compress."""
    g = torch.Generator().manual_seed(0)
    layer = LayerKV(layer=3, k=torch.randn(1, 2, 8, 16, generator=g), v=torch.randn(1, 2, 8, 16, generator=g),
                    q=torch.randn(1, 2, 8, 16, generator=g), q_positions=torch.arange(8))
    fp16 = ev.compress(build("fp16"), [layer], torch.float32)
    assert fp16.bits == 16 * fp16.entries and fp16.entries == 2 * 256
    torch.testing.assert_close(fp16.layers[0].keys, layer.k.half().float(), rtol=0, atol=0)
    with pytest.raises(MethodFailure, match=r"^method unchanged returned K and V unchanged at 1\.00 bits per "
                                            r"entry in layer 3: compression was not applied$"):
        ev.compress(Unchanged(), [layer], torch.float32)
    with pytest.raises(MethodFailure, match="^method tensor-meta: layer 3 metadata is not plain JSON"):
        ev.compress(TensorMeta(), [layer], torch.float32)


def test_proxies_use_every_query_stride_th_query():
    """The proxies with a query stride are the fidelity metrics of exactly those queries."""
    from kvc.metrics.fidelity import layer_metrics

    g = torch.Generator().manual_seed(1)
    layer = LayerKV(layer=0, k=torch.randn(1, 2, 12, 16, generator=g), v=torch.randn(1, 2, 12, 16, generator=g),
                    q=torch.randn(1, 4, 12, 16, generator=g), q_positions=torch.arange(12))
    proxies = {s: ev.compress(build("turboquant", bits=2), [layer], torch.float32, measure=True,
                              query_stride=s).proxies[0].metrics for s in (1, 3)}
    decoded = ev.compress(build("turboquant", bits=2), [layer], torch.float32).layers[0]
    want = layer_metrics(layer.k, decoded.keys, layer.v, decoded.values, layer.q[:, :, ::3], torch.arange(0, 12, 3))
    for tensor, metrics in want.items():
        for name, value in metrics.items():
            torch.testing.assert_close(proxies[3][tensor][name], value, rtol=1e-12, atol=0)
    assert not torch.equal(proxies[1]["kv"]["attn_kl"], proxies[3]["kv"]["attn_kl"])


@pytest.mark.model
def test_identity_gives_exactly_the_uncompressed_perplexity(default_model):
    model, tokenizer = default_model
    exact, fp16, keep_all = ev.evaluate(model, tokenizer, load_corpus(None),
                                        [ExactIdentity(), build("fp16"), KeepAll()], TINY)
    ppl = exact["perplexity"]
    assert ppl["ppl"] == ppl["ppl_base"] and ppl["kl"] == 0 and ppl["top1_agree"] == 1
    assert keep_all["perplexity"]["contexts"] == fp16["perplexity"]["contexts"]
    assert keep_all["bits_per_entry"] > 16  # the kept positions and counts are stored too
    assert exact["bits_per_entry"] == 32 and fp16["bits_per_entry"] == 16
    assert abs(fp16["perplexity"]["delta_rel"]) < 1e-3 and fp16["perplexity"]["kl"] < 1e-5
    assert 3 < exact["perplexity"]["ppl_base"] < 100  # a trained model on English prose
    (row,) = ev.end_to_end(model, tokenizer, load_corpus(None), [build("fp16")], TINY)
    assert row["ppl_delta_rel"] == fp16["perplexity"]["delta_rel"] and row["e2e_bits_per_entry"] == 16
    assert row["needle_accuracy"] is None


@pytest.mark.model
def test_random_keys_collapse_retrieval(default_model):
    model, tokenizer = default_model
    exact, broken = ev.evaluate(model, tokenizer, load_corpus(None), [ExactIdentity(), RandomKeys()], NEEDLES)
    for task in ("single", "multi"):
        assert exact["retrieval"][task]["overall"] == exact["retrieval"][task]["overall_base"]
        assert exact["retrieval"][task]["overall_base"] >= 2 / 3
        assert broken["retrieval"][task]["overall"] <= 1 / 3
    assert broken["perplexity"]["ppl"] > 2 * broken["perplexity"]["ppl_base"]


@pytest.mark.model
def test_cli_bits_agree_with_compress(run, tmp_path, default_capture):
    """kvc eval and kvc compress count the same bits for the same method, options and tokens (the
    shared capture: sequences of 128 tokens, as eval's context here)."""
    args = ("--method", "kivi", "--bits", 2, "--group-size", 32, "--residual", 32)
    code, _, err = run("compress", default_capture[0], *args, "--json", tmp_path / "c.json", "--device", "cpu")
    assert code == 0, err
    code, out, err = run("eval", *args, "--contexts", 128, "--windows", 1, "--continuation", 8,
                         "--depths", "0.5", "--needles", 2, "--json", tmp_path / "e.json",
                         "--plots", tmp_path / "plots", "--device", "cpu")
    assert code == 0, err
    compressed = json.loads((tmp_path / "c.json").read_text())
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["perplexity"]["bits_per_entry"] == pytest.approx(compressed["bits_per_entry"], rel=1e-12)
    assert evaluated["bits_per_entry"] == evaluated["retrieval"]["bits_per_entry"] == compressed["bits_per_entry"]
    assert evaluated["method"] == "kivi" and evaluated["params"]["bits"] == 2
    assert (tmp_path / "plots" / "retrieval_kivi.png").stat().st_size > 0
    assert "perplexity" in out and "needle" in out


def test_command_defaults_are_the_library_defaults():
    import inspect

    from kvc.cli.commands import eval as command

    params = inspect.signature(command.command).parameters
    value = {name: params[name].default.default for name in
             ("contexts", "windows", "continuation", "depths", "trials", "needles", "retrieval")}
    assert command.settings_from_options(**value) == ev.Settings()


@pytest.mark.parametrize("args, message", [
    (("--method", "nope"), "unknown method"),
    (("--method", "kivi", "--bitz", "2"), "no option --bitz"),
    (("--method", "kivi", "--contexts", "8"), "at least 16"),
    (("--method", "kivi", "--depths", "0.5,2"), "fractions in [0, 1]"),
    (("--method", "kivi", "--needles", "9"), "--needles"),
    (("--method", "kivi", "--query-stride", "0"), "--query-stride must be >= 1"),
])
def test_bad_input(run, args, message):
    code, _, err = run("eval", *args)
    assert code == 2 and message in err
