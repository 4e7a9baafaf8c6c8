#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/), standard library only.

corpus/safetensors/  whole safetensors files: valid ones in the layouts real
                     writers produce, and one malformed file per rule the parser
                     enforces (the unit tests' MalformedFileTest cases).
corpus/config/       config.json fixtures of tests/trainer/data, variations of
                     their RoPE settings, and model.safetensors.index.json files.
corpus/chat_template/  a control byte (template, add_generation_prompt) and a
                     messages JSON, with and without special tokens.
corpus/checkpoint_manifest/  ftune_checkpoint.json as WriteCheckpointManifest
                     writes it, and near misses.
corpus/jobspec_yaml/ the job YAML files of examples/, and malformed ones.
corpus/jobspec_proto/  JobSpec wire bytes (hand-encoded protobuf).
corpus/channel/      rank channel streams: framed RankMessages, torn frames.
corpus/spool/        spool_fuzzer inputs: a flag byte, then records the
                     harness frames (see spool_fuzzer.cc) or a raw events.log.

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


def chat_template_seeds():
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hi \u3000"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    seeds = {}
    for i in range(5):  # one per template, in SupportedChatTemplateNames order
        seeds[f"conv_{i}"] = bytes([i]) + json.dumps(conv).encode()
        seeds[f"conv_{i}_gen"] = bytes([0x80 | i]) + json.dumps(conv[1:]).encode()
    seeds["tokens"] = b"\x01" + json.dumps({
        "messages": conv[1:3], "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "date_string": "1 Jan 2025"}).encode()
    seeds["bad_role"] = b"\x03" + json.dumps([{"role": "tool", "content": 1}]).encode()
    seeds["llama31_jinja"] = b"\x01" + json.dumps({
        "chat_template": "{{- bos_token }}{%- if not date_string is defined %}"
                         "{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
                         "Cutting Knowledge Date: December 2023<|start_header_id|>",
        "messages": []}).encode()
    seeds["jinja_text"] = b"\x00{% for message in messages %}<|im_start|>{{ message['role'] }}"
    return seeds


def manifest_seeds():
    m = {"format": "ftune-checkpoint", "version": 1, "step": 20, "micro_batches": 80,
         "tokens_total": 40960, "loss": 1.25, "world_size": 2, "total_numel": 96,
         "seed": 42,
         "shards": [{"file": "shard-0-of-2.safetensors", "bytes": 1000},
                    {"file": "shard-1-of-2.safetensors", "bytes": 1000}],
         "layout": [{"name": "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
                     "offset": 0, "numel": 64, "shape": [8, 8]},
                    {"name": "base_model.model.layers.0.self_attn.q_proj.lora_B.weight",
                     "offset": 64, "numel": 32, "shape": [4, 8]}]}
    seeds = {"valid": json.dumps(m, indent=1).encode()}
    for key, value in (("version", 2), ("world_size", 3), ("step", -1), ("seed", -1),
                       ("format", 7), ("loss", "x"), ("version", 1e300),
                       ("world_size", 4294967297), ("shards", "ab"), ("layout", {})):
        bad = dict(m)
        bad[key] = value
        seeds[f"bad_{key}_{len(seeds)}"] = json.dumps(bad).encode()
    seeds["not_object"] = b"[1, 2]"
    return seeds


def jobspec_yaml_seeds():
    examples = os.path.join(HERE, "..", "..", "examples")
    seeds = {}
    for name in sorted(os.listdir(examples)):
        if name.endswith(".yaml"):
            with open(os.path.join(examples, name), "rb") as f:
                seeds[name[:-5]] = f.read()
    seeds["bad_types"] = b"name: [1]\nlora:\n  r: many\ntraining:\n  learning_rate: fast\n"
    seeds["bad_unknown_key"] = b"model:\n  model_name_or_path: m\n  colour: red\n"
    seeds["anchors"] = b"a: &x {r: 8}\nlora: *x\n"
    seeds["not_mapping"] = b"- 1\n- 2\n"
    return seeds


def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7f) | 0x80])
        v >>= 7
    return out + bytes([v])


def field(num, value):
    """One protobuf field: bytes as length-delimited, int as varint."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value & 0xffffffffffffffff)
    return varint(num << 3 | 2) + varint(len(value)) + value


def jobspec_proto_seeds():
    model = field(1, b"/srv/models/llama")
    dataset = field(1, b"/srv/data/train.jsonl") + field(2, b"messages")
    lora = field(1, 16)
    seeds = {
        "minimal": field(1, b"job") + field(2, model) + field(3, dataset) + field(9, b"/srv/out"),
        "lora": field(2, model) + field(3, dataset) + field(4, lora) + field(9, b"out"),
        "relative_paths": field(2, field(1, b"../model")) + field(3, field(1, b"d.jsonl")),
        "labels": field(2, model) + field(3, dataset) + field(10, 5) + field(11, 3) +
                  field(12, field(1, b"team") + field(2, b"nlp")),
        "negative_priority": field(2, model) + field(3, dataset) + field(10, -1),
        "empty": b"",
    }
    return seeds


def channel_seeds():
    hello = field(1, 0) + field(2, 2) + field(3, 1234) + field(4, b"cpu")
    msgs = [field(1, hello), field(9, b"nccl-id"), field(6, field(1, b"log line"))]
    frames = b"".join(varint(len(m)) + m for m in msgs)
    return {
        "frames": frames,
        "empty_frame": b"\x00",
        "torn": frames[:-3],
        "long_prefix": b"\xff\xff\xff\xff\x7f",
        "over_limit": varint((64 << 20) + 1),
        "bad_message": b"\x02\xff\xff",
    }


def spool_seeds():
    def record(seq, payload=b"", kind=0):
        return bytes([kind]) + struct.pack("<q", seq) + bytes([len(payload)]) + payload
    job = field(2, b"job-1") + field(3, 0) + field(4, 1)
    return {
        "records": b"\x00" + record(1, job) + record(2, job) + record(3, job),
        "acked": b"\x02" + struct.pack("<q", 2) + record(1, job) + record(2) + record(5, job),
        "bad_crc": b"\x00" + record(1, job) + record(2, job, kind=1),
        "torn_tail": b"\x00" + record(1, job) + record(2, job, kind=4),
        "not_increasing": b"\x00" + record(4, job) + record(3, job),
        "raw_payload": b"\x00" + record(1, b"\xff\xff", kind=2),
        "seq_max": b"\x00" + record(0x7fffffffffffffff, job),
        "raw": b"\x01\x05abcde\x00\x00\x00\x00",
    }


def main():
    for sub, seeds, ext in (("safetensors", safetensors_seeds(), ".safetensors"),
                            ("config", json_seeds(), ".json"),
                            ("chat_template", chat_template_seeds(), ".bin"),
                            ("checkpoint_manifest", manifest_seeds(), ".json"),
                            ("jobspec_yaml", jobspec_yaml_seeds(), ".yaml"),
                            ("jobspec_proto", jobspec_proto_seeds(), ".pb"),
                            ("channel", channel_seeds(), ".bin"),
                            ("spool", spool_seeds(), ".bin")):
        d = os.path.join(OUT, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in sorted(seeds.items()):
            with open(os.path.join(d, name + ext), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
