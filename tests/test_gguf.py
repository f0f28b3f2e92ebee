"""The GGUF metadata reader: every value type as gguf writes it, both byte orders, hostile files."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.errors import KvcError
from kvc.io.gguf import read_gguf_metadata

gguf = pytest.importorskip("gguf")

VALUES = {"u8": 7, "i8": -7, "u16": 700, "i16": -700, "u32": 70000, "i32": -70000, "u64": 2**40, "i64": -2**40,
          "f32": 0.5, "f64": 1 / 3, "flag": True, "name": "SmolLM2 ünïcode", "ints": [0, 2, 0, 2],
          "floats": [0.25, -1.5], "flags": [True, False, True]}
ADD = {"u8": "add_uint8", "i8": "add_int8", "u16": "add_uint16", "i16": "add_int16", "u32": "add_uint32",
       "i32": "add_int32", "u64": "add_uint64", "i64": "add_int64", "f32": "add_float32", "f64": "add_float64",
       "flag": "add_bool", "name": "add_string"}


def _write(path, endian=gguf.GGUFEndian.LITTLE):
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    for key, value in VALUES.items():
        getattr(writer, ADD.get(key, "add_array"))(f"test.{key}", value)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "ünï"] * 50)  # skipped: None
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_metadata_equals_ggufs_own_reader(tmp_path, endian):
    path = _write(tmp_path / "m.gguf", endian)
    metadata = read_gguf_metadata(path)
    theirs = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items() if not key.startswith("GGUF.")}
    theirs["tokenizer.ggml.tokens"] = None
    assert metadata == theirs
    assert metadata["test.f64"] == 1 / 3 and metadata["test.ints"] == [0, 2, 0, 2] and metadata["general.architecture"] == "llama"


def _hostile(good: bytes) -> dict[str, bytes]:
    first_key = 4 + 4 + 8 + 8  # magic, version, tensor count, key-value count
    return {
        "empty": b"",
        "not gguf": b"PK\x03\x04" + good[4:],
        "version 1": good[:4] + struct.pack("<I", 1) + good[8:],
        "key longer than the file": good[:first_key] + struct.pack("<Q", 2**62) + good[first_key + 8:],
        "more pairs than written": good[:16] + struct.pack("<Q", 10**6) + good[24:],
        # every cut inside the metadata (the zeros after it pad the file to gguf's alignment)
        **{f"cut at {n}": good[:n] for n in range(0, len(good.rstrip(b"\0")), 7)},
    }


def test_hostile_files_are_one_line_errors(tmp_path):
    good = _write(tmp_path / "good.gguf").read_bytes()
    for name, data in _hostile(good).items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(data)
        with pytest.raises(KvcError, match=r"^.*bad\.gguf: not a readable GGUF file \([^\n]+\)$"):
            read_gguf_metadata(path)


def test_unknown_type_and_huge_array(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
    for value, message in ((struct.pack("<I", 13), "unknown value type 13"),
                           (struct.pack("<IIQ", 9, 4, 2**60), "an array of 1152921504606846976 items is longer"),
                           (struct.pack("<IIQ", 9, 9, 1), "nested array item type 9")):
        path = tmp_path / "t.gguf"
        path.write_bytes(head + value)
        with pytest.raises(KvcError, match=message):
            read_gguf_metadata(path)


def test_budget_of_a_broken_gguf_is_one_line(run, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3))
    code, _, err = run("budget", "--model", path, "--context", 1024)
    assert code == 2 and err.strip().count("\n") == 0 and "not a readable GGUF file" in err


@settings(max_examples=60, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_metadata_reads_or_is_refused(tmp_path_factory, edits):
    """Bytes of the metadata overwritten at random: a dict or a KvcError, never another exception."""
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    data = bytearray(_write(path).read_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    path.write_bytes(bytes(data))
    try:
        assert isinstance(read_gguf_metadata(path), dict)
    except KvcError as err:
        assert "\n" not in str(err)
