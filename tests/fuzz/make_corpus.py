#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/), standard library only.

corpus/safetensors/  whole safetensors files: valid ones in the layouts real
                     writers produce, and one malformed file per rule the parser
                     enforces (the unit tests' MalformedFileTest cases).
corpus/config/       config.json fixtures of tests/trainer/data, variations of
                     their RoPE settings, and model.safetensors.index.json files.

The other folders of corpus/ (tokenizer_json, tokenizer_encode,
dataset_reader) are hand-made seeds; this script leaves them alone.

Run from anywhere: python3 tests/fuzz/make_corpus.py. Output is deterministic.
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
DATA = os.path.join(HERE, "..", "trainer", "data")

BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
        "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
        "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
        "F64": 64, "I64": 64, "U64": 64}
ORDER = list(BITS)  # the reference crate's Dtype order


def raw(header, data=b""):
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def write_valid(tensors, metadata=None):
    """Lays tensors out as the reference writer does (widest dtype first)."""
    items = sorted(tensors.items(), key=lambda kv: (-ORDER.index(kv[1][0]), kv[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blob = b""
    for name, (dtype, shape, data) in items:
        n = 1
        for d in shape:
            n *= d
        assert n * BITS[dtype] % 8 == 0 and len(data) == n * BITS[dtype] // 8, name
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blob += data
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return raw(text, blob)


def pattern(n, seed):
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


def safetensors_seeds():
    ok = '"dtype":"U8","shape":[4],"data_offsets":[0,4]'
    seeds = {
        "valid_reference_vector": write_valid(
            {"attn.0": ("F32", [1, 2, 3], struct.pack("<6f", 0, 1, 2, 3, 4, 5))}),
        "valid_empty": write_valid({}),
        "valid_metadata_only": write_valid({}, {"framework": "pt"}),
        "valid_mixed": write_valid({
            "model.embed_tokens.weight": ("BF16", [4, 3], pattern(24, 1)),
            "model.layers.0.self_attn.q_proj.weight": ("F16", [2, 2], pattern(8, 2)),
            "lm_head.weight": ("F32", [3], pattern(12, 3)),
            "ids": ("I64", [2], pattern(16, 4)),
            "scale": ("F64", [], pattern(8, 5)),
            "mask": ("BOOL", [3], b"\x01\x00\x01"),
            "packed": ("F4", [3, 2], pattern(3, 6)),
            "fp8": ("F8_E4M3", [5], pattern(5, 7)),
            "z": ("C64", [1], pattern(8, 8)),
            "empty": ("F32", [0, 4], b""),
        }, {"format": "pt", "note": "\u00fcnicode"}),
        "valid_unordered": raw(
            '{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},'
            '"z":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},'
            '"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":1},'
            '"__metadata__":null}   ', b"abcd"),
        "bad_short": b"\x05\x00\x00",
        "bad_header_longer_than_file": struct.pack("<Q", 1000) + b"{}",
        "bad_header_over_limit": struct.pack("<Q", 1 << 62) + b"{}",
        "bad_not_object": raw("[1, 2]  "),
        "bad_leading_space": raw(" {}     "),
        "bad_empty_header": struct.pack("<Q", 0),
        "bad_not_json": raw('{"w": {"dtype": '),
        "bad_trailing_garbage": raw("{} x"),
        "bad_utf8": raw(b'{"w\xff": 1}'),
        "bad_duplicate": raw('{"w":{' + ok + '},"w":{' + ok + '}}', b"abcd"),
        "bad_entry_not_object": raw('{"w": [1]}'),
        "bad_unknown_dtype": raw('{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}',
                                 b"x" * 16),
        "bad_missing_shape": raw('{"w":{"dtype":"U8","data_offsets":[0,1]}}', b"x"),
        "bad_negative_dim": raw('{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', b"x"),
        "bad_three_offsets": raw('{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}', b"x"),
        "bad_begin_after_end": raw('{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}',
                                   b"abcd"),
        "bad_size_mismatch": raw('{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}}',
                                 b"x" * 10),
        "bad_past_end": raw('{"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}', b"abcd"),
        "bad_overlap": raw('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                           '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"abcdef"),
        "bad_gap_at_start": raw('{"w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', b"abcd"),
        "bad_gap_between": raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                               '"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}', b"abcde"),
        "bad_trailing_bytes": raw('{"w":{' + ok + '}}', b"abcdef"),
        "bad_shape_overflow": raw('{"w":{"dtype":"U8","shape":[4294967296,4294967296],'
                                  '"data_offsets":[0,0]}}'),
        "bad_sub_byte": raw('{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}', b"x"),
        "bad_metadata_value": raw('{"__metadata__":{"step":3},'
                                  '"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    }
    return seeds


def json_seeds():
    seeds = {}
    for name in sorted(os.listdir(DATA)):
        if name.endswith("_config.json"):
            with open(os.path.join(DATA, name), "rb") as f:
                seeds[name[:-len(".json")]] = f.read()
    with open(os.path.join(DATA, "llama3_1_8b_instruct_config.json")) as f:
        base = json.load(f)

    def variant(**changes):
        c = dict(base)
        for k, v in changes.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return json.dumps(c, indent=1).encode()

    seeds["config_linear"] = variant(rope_scaling={"type": "linear", "factor": 4.0})
    seeds["config_dynamic"] = variant(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    seeds["config_rope_parameters_default"] = variant(
        rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    seeds["config_tiny_tied"] = json.dumps({
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "tie_word_embeddings": True, "head_dim": 16, "eos_token_id": [1, 2],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        indent=1).encode()
    seeds["index_valid"] = json.dumps({
        "metadata": {"total_size": 16060522496},
        "weight_map": {
            "lm_head.weight": "model-00004-of-00004.safetensors",
            "model.embed_tokens.weight": "model-00001-of-00004.safetensors",
            "model.layers.0.mlp.down_proj.weight": "model-00001-of-00004.safetensors",
            "model.norm.weight": "model-00004-of-00004.safetensors"}}, indent=2).encode()
    seeds["index_float_total"] = b'{"metadata": {"total_size": 1.6e10}, "weight_map": {}}'
    seeds["index_traversal"] = b'{"weight_map": {"a": "../../etc/passwd"}}'
    seeds["index_bad_value"] = b'{"weight_map": {"a": 1}}'
    return seeds


def main():
    for sub, seeds, ext in (("safetensors", safetensors_seeds(), ".safetensors"),
                            ("config", json_seeds(), ".json")):
        d = os.path.join(OUT, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in sorted(seeds.items()):
            with open(os.path.join(d, name + ext), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
