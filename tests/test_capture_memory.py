"""kvc capture writes each layer as soon as it has run: one layer of one batch held at a time, and
the file is the one the whole-batch capture wrote, tensor for tensor and byte for byte."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvc.io.safetensors
from kvc.io.safetensors import SAFETENSORS_DTYPES, StreamingSafetensorsWriter
from kvc.model.capture import _metadata, capture
from kvc.model.hooks import LayersDone, Recorder, hooked

SEQS, TOKENS, NUM_LAYERS = 3, 20, 4
LAYERS, POSITIONS = [1, 2], torch.tensor([1, 5, 19])  # layer 0 runs but is not captured, layer 3 never runs
NAMES = ("k", "k_pre", "q", "q_pre", "v")
META = {"model": "tiny", "text_source": "random", "text_sha256": ""}


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
        max_position_embeddings=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attn_implementation="sdpa")).eval()


def _ids():
    return torch.randint(0, 128, (SEQS, TOKENS), generator=torch.Generator().manual_seed(1))


def test_one_layer_held_at_a_time(tmp_path, monkeypatch):
    written, most = [], []  # weak references to every layer tensor handed to the writer so far
    write = StreamingSafetensorsWriter.write

    def counting_write(self, name, start, rows):
        if name.startswith("layers."):
            written.append(weakref.ref(rows))
            most.append(sum(ref() is not None for ref in written))
        write(self, name, start, rows)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", counting_write)
    capture(_llama(), _ids(), tmp_path / "cap.safetensors", meta=META, layers=list(range(NUM_LAYERS)),
            q_positions=torch.arange(TOKENS), batch_size=2)
    assert len(written) == NUM_LAYERS * len(NAMES) * 2  # two batches
    assert max(most) == len(NAMES)  # the whole-batch capture held all NUM_LAYERS x 5 at its last write


def _reference_tensors(model, ids) -> dict[str, torch.Tensor]:
    """Every captured tensor as the model computes it: its own cache for k, v; its projections and
    its rotary embedding for the queries and the keys before RoPE."""
    projections, handles = {}, []
    for L, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "k_proj"):
            handles.append(getattr(layer.self_attn, proj).register_forward_hook(
                lambda _, __, out, key=(L, proj): projections.__setitem__(key, out.detach().clone())))
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        positions = torch.arange(TOKENS)[None]
        cos, sin = model.model.rotary_emb(model.model.embed_tokens(ids), positions)
    for handle in handles:
        handle.remove()
    tensors = {"q_positions": POSITIONS, "input_ids": ids}
    for L in LAYERS:
        q_pre, k_pre = (projections[L, p].view(SEQS, TOKENS, -1, 16).transpose(1, 2) for p in ("q_proj", "k_proj"))
        q, k = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
        torch.testing.assert_close(k, cache.layers[L].keys, rtol=0, atol=0)
        tensors.update({f"layers.{L}.k": cache.layers[L].keys, f"layers.{L}.v": cache.layers[L].values,
                        f"layers.{L}.k_pre": k_pre, f"layers.{L}.q": q[:, :, POSITIONS],
                        f"layers.{L}.q_pre": q_pre[:, :, POSITIONS]})
    return tensors


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors layout kvc writes: tensors in name order, the JSON header space-padded to 8."""
    header, data = {"__metadata__": metadata}, b""
    for name in sorted(tensors):
        raw = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + data


def _whole_batch_metadata(model, ids) -> dict[str, str]:
    """The metadata of the whole-batch capture: every layer recorded in one forward pass."""
    recorder = Recorder(set(LAYERS), POSITIONS, stop_after_last=True)
    with torch.inference_mode(), hooked(model, recorder), pytest.raises(LayersDone):
        model(input_ids=ids, use_cache=False)
    shapes = {n: (t.dtype, tuple(t.shape[1:])) for n, t in recorder.records[LAYERS[0]].items()}
    return _metadata(model, recorder, shapes, META, SEQS, TOKENS).to_strings()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_file_is_the_whole_batch_one(batch_size, tmp_path, monkeypatch):
    monkeypatch.setattr(kvc.io.safetensors, "_MOVE_CHUNK", 40)  # the first batch moves in overlapping chunks
    model, ids = _llama(), _ids()
    path = tmp_path / "cap.safetensors"
    capture(model, ids, path, meta=META, layers=LAYERS, q_positions=POSITIONS, batch_size=batch_size)
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    expected = _whole_batch_metadata(model, ids)
    assert {**metadata, "created": ""} == {**expected, "created": ""}
    assert json.loads(metadata["num_layers"]) == NUM_LAYERS and json.loads(metadata["head_dim"]) == 16
    attention = json.loads(metadata["attention"])
    assert [a is None for a in attention] == [False, False, False, True]  # layer 3 never ran
    inv_freq = torch.tensor(json.loads(metadata["rope"])["inv_freq"])
    torch.testing.assert_close(inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert raw == _safetensors_bytes(_reference_tensors(model, ids), metadata)
