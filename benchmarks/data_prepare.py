"""Corpus preparation throughput: `phalanx data prepare` vs Hugging Face `datasets` `Dataset.map`, same tokenizer.

    .venv/bin/python benchmarks/data_prepare.py [--docs 60000] [--workers N] [--repeats 3]
    .venv/bin/python benchmarks/data_prepare.py --quick     # 3000 documents, one repeat: checks it runs

Both sides turn the same generated jsonl corpus (Zipf-distributed words, documents of 20 to 400 words) into
token ids with the same BPE tokenizer (`tokenizers`, vocab 8192, trained here on the first documents; not
timed), each document followed by `<|endoftext|>`, with the same number of processes:

- phalanx: `prepare_corpus` (what `phalanx data prepare CORPUS --out DIR --tokenizer tokenizer.json --workers N`
  runs): hashing the input, reading, tokenizing, writing the uint16 shards and index.json.
- datasets: `load_dataset("json")` (the jsonl into Arrow) then `Dataset.map(batched=True, num_proc=N)` calling
  the same `Tokenizer.encode_batch` inside, into a fresh cache folder; the ids stay in Datasets' Arrow cache
  (not flattened into a token file, which would only add to its time).

Each side is timed end to end (process starts included), alternating, median of `--repeats`; both must produce
the same tokens. With more than one process each keeps `tokenizers`' own thread pool off (the processes are the
parallelism). `datasets` is in the `bench` extra; without it the script exits 77 (skipped), saying so on stderr.
Last line: JSON with `speedup` = phalanx tokens/s / datasets tokens/s (target >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SKIPPED = 77
EOS = "<|endoftext|>"
QUICK = {"docs": 3000, "repeats": 1}  # --quick: checks the script runs; not a result


def datasets_missing() -> Optional[str]:
    import importlib

    try:
        importlib.import_module("datasets")
    except ImportError as err:
        return f"{err}: pip install datasets (the bench extra) to compare against Dataset.map"
    return None


def write_corpus(path: str, docs: int, seed: int = 0) -> int:
    """`docs` jsonl documents of Zipf-distributed pseudo-words; returns the file's bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(2, 10, size=5000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    with open(path, "w") as f:
        for i in range(docs):
            picked = rng.choice(len(words), size=int(rng.integers(20, 400)), p=weights)
            text = " ".join(words[j] for j in picked).capitalize() + "."
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return os.path.getsize(path)


def train_tokenizer(corpus: str, out: str, sample_docs: int = 2000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(corpus) as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(sample_docs), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, special_tokens=[EOS], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(out)


def run_phalanx(corpus: str, tokenizer: str, workers: int, out: str):
    """(seconds, the tokens as one array)."""
    import numpy as np

    from phalanx.data.prepare import prepare_corpus

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    index = prepare_corpus([corpus], out, tokenizer=tokenizer, workers=workers)
    seconds = time.perf_counter() - start
    tokens = np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype=index["dtype"])
                             for s in index["shards"]])
    return seconds, tokens


class EncodeWithEos:
    """`Dataset.map`'s function: the same tokenizer file and call as phalanx's workers, loaded once per process."""

    def __init__(self, tokenizer: str):
        self.path, self.tok = tokenizer, None

    def __call__(self, batch: dict) -> dict:
        if self.tok is None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(self.path)
            self.eos = self.tok.token_to_id(EOS)
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return {"ids": [[*e.ids, self.eos] for e in encode(batch["text"])]}

    def __getstate__(self) -> dict:
        return {"path": self.path, "tok": None}


def run_datasets(corpus: str, tokenizer: str, workers: int, cache: str):
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    ds = ds.map(EncodeWithEos(tokenizer), batched=True, num_proc=workers if workers > 1 else None,
                remove_columns=ds.column_names)
    seconds = time.perf_counter() - start
    tokens = np.asarray(pc.list_flatten(ds.data.column("ids")).to_numpy(zero_copy_only=False))
    return seconds, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=60000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = QUICK["docs"], QUICK["repeats"]
    missing = datasets_missing()
    if missing:
        print(f"data_prepare: skipped: {missing}", file=sys.stderr)
        return SKIPPED
    if args.workers > 1:  # both sides: the processes are the parallelism (phalanx's workers set this too)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = tempfile.mkdtemp(prefix="phalanx-data-prepare-")
    try:
        corpus, tokenizer = os.path.join(root, "corpus.jsonl"), os.path.join(root, "tokenizer.json")
        nbytes = write_corpus(corpus, args.docs)
        train_tokenizer(corpus, tokenizer)
        times: dict[str, list[float]] = {"phalanx": [], "datasets": []}
        for _ in range(args.repeats):
            t, ours = run_phalanx(corpus, tokenizer, args.workers, os.path.join(root, "out"))
            times["phalanx"].append(t)
            t, theirs = run_datasets(corpus, tokenizer, args.workers, os.path.join(root, "hf-cache"))
            times["datasets"].append(t)
            assert len(ours) == len(theirs) and (ours == theirs).all(), "the two sides' tokens differ"
        tokens = len(ours)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    phalanx_s, datasets_s = statistics.median(times["phalanx"]), statistics.median(times["datasets"])
    rates = {side: tokens / s for side, s in (("phalanx", phalanx_s), ("datasets", datasets_s))}
    print(f"{tokens:,} tokens of {args.docs:,} documents ({nbytes / 1e6:.1f} MB jsonl), {args.workers} processes")
    print(f"  phalanx prepare     {phalanx_s:7.2f} s   {rates['phalanx'] / 1e6:6.2f} M tokens/s")
    print(f"  datasets map        {datasets_s:7.2f} s   {rates['datasets'] / 1e6:6.2f} M tokens/s")
    print(f"  speedup (phalanx / datasets) {rates['phalanx'] / rates['datasets']:.2f}x")
    import datasets
    import tokenizers

    print(json.dumps({
        "speedup": round(rates["phalanx"] / rates["datasets"], 3),
        "phalanx_tokens_per_s": round(rates["phalanx"]), "datasets_tokens_per_s": round(rates["datasets"]),
        "phalanx_s": [round(t, 3) for t in times["phalanx"]], "datasets_s": [round(t, 3) for t in times["datasets"]],
        "tokens": tokens, "documents": args.docs, "bytes": nbytes, "workers": args.workers, "quick": args.quick,
        "versions": {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
