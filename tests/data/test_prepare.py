"""`phalanx data prepare` with a real tokenizer: shards equal the tokenizer's own encoding, resume after SIGKILL,
refusals, and `data.kind: memmap` training on a shard folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from phalanx.config import load_config
from phalanx.data import MemmapTokens
from phalanx.data.prepare import prepare_corpus
from phalanx.data.tokenizer import TokenizerSpec
from phalanx.errors import PhalanxError
from phalanx.parallel import validate
from tests.helpers import CONFIG, REPO, assert_refused, loopback_env, losses, run_overrides

EOS = "<|endoftext|>"


def _train_tokenizer(docs: list[str], special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 short documents as jsonl (a blank line among them) then 36 as parquet, and a BPE tokenizer (vocab 300,
    `<|endoftext|>` its id 0) saved as an HF model folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    words = ["naïve", "fox", "☃", "jumps", "over", "the", "lazy", "dog", "tokens", "shard"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11)) + f" #{i}." for i in range(84)]
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs[:48])]
    (root / "a.jsonl").write_text("\n".join(lines[:20] + [""] + lines[20:]) + "\n")
    pq.write_table(pa.table({"id": list(range(36)), "text": docs[48:]}), root / "b.parquet", row_group_size=10)
    tok = _train_tokenizer(docs, [EOS])
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    expected = np.concatenate([np.array([*tok.encode(d).ids, tok.token_to_id(EOS)]) for d in docs])
    return SimpleNamespace(root=root, docs=docs, tok=tok, expected=expected, inputs=[str(root / "a.jsonl"),
                                                                                     str(root / "b.parquet")])


def shard_tokens(out: Path) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """The corpus prepared with 2 worker processes, small tasks and ~5 shards."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    index = prepare_corpus(corpus.inputs, str(out), tokenizer=str(corpus.root / "tok"), workers=2,
                           shard_tokens=len(corpus.expected) // 5, batch_docs=8)
    return out, index


def test_shards_hold_the_tokenizers_own_encoding_with_eos_between_documents(corpus, prepared):
    out, index = prepared
    assert np.array_equal(shard_tokens(out), corpus.expected)
    assert len(index["shards"]) >= 2 and index["documents"] == len(corpus.docs) == 84
    assert index["tokens"] == len(corpus.expected) == sum(s["tokens"] for s in index["shards"])
    assert sum(s["documents"] for s in index["shards"]) == 84
    assert index["dtype"] == "uint16" and index["vocab_size"] == 300 and index["eos_id"] == 0
    for shard in index["shards"]:  # every shard ends at a document end
        assert np.fromfile(out / shard["file"], dtype=np.uint16)[-1] == 0
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    tok_file = corpus.root / "tok" / "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert index["tokenizer"]["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert [s["sha256"] for s in index["sources"]] == [hashlib.sha256(Path(p).read_bytes()).hexdigest()
                                                       for p in corpus.inputs]
    assert not (out / "progress.json").exists()


def test_one_worker_writes_the_same_shards(corpus, prepared, tmp_path):
    out, _ = prepared
    prepare_corpus(corpus.inputs, str(tmp_path), tokenizer=str(corpus.root / "tok" / "tokenizer.json"), workers=1,
                   shard_tokens=len(corpus.expected) // 5)
    assert shard_bytes(tmp_path) == shard_bytes(out)  # index.json too: the folder's tokenizer.json was named


def test_memmap_reads_the_shard_folder_as_one_stream(corpus, prepared):
    out, index = prepared
    ds = MemmapTokens(str(out), seq_len=16, seed=0, val_fraction=0.1, vocab_size=300)
    same = MemmapTokens(str(out / "index.json"), seq_len=16, seed=0, val_fraction=0.1, vocab_size=300)
    assert len(ds.tokens) == len(corpus.expected)
    first = index["shards"][0]["tokens"]
    across = ds.tokens[first - 5:first + 5 + index["shards"][1]["tokens"]]  # spans three shards
    assert np.array_equal(across, corpus.expected[first - 5:first + 5 + index["shards"][1]["tokens"]])
    raw = torch.from_numpy(corpus.expected.astype(np.int64))
    rows = ds.batch(list(range(ds.windows("train"))))
    assert torch.equal(rows, same.batch(list(range(ds.windows("train")))))
    starts = sorted(int(((raw.unfold(0, 17, 16) == row).all(1)).nonzero()[0]) * 16 for row in rows)
    assert starts == [i * 16 for i in range(ds.windows("train"))]  # each training window once per epoch


def test_a_sigkilled_prepare_resumes_to_identical_shards(corpus, prepared, tmp_path):
    """The child blocks right after it wrote part of its third shard (two are complete and recorded); the
    test SIGKILLs it there, so the kill lands mid-run whatever the machine's speed."""
    reference, _ = prepared
    out, marker = tmp_path / "out", tmp_path / "blocked"
    args = dict(inputs=corpus.inputs, out_dir=str(out), tokenizer=str(corpus.root / "tok"), workers=1,
                shard_tokens=len(corpus.expected) // 5, batch_docs=8)
    child = f"""
import time
from phalanx.data import prepare
write = prepare.ShardWriter._write
def blocking_write(self, tokens, documents):
    write(self, tokens, documents)
    if len(self.shards) == 2:
        self._file.flush()
        open({str(marker)!r}, "w").close()
        time.sleep(300)
prepare.ShardWriter._write = blocking_write
prepare.prepare_corpus(**{args!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=loopback_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never reached its third shard"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["shards"]) == 2 and not (out / "index.json").exists()
    assert (out / "shard-00002.bin.tmp").stat().st_size > 0  # the shard in flight, never renamed

    with pytest.raises(PhalanxError, match="interrupted prepare of other shard_tokens.*--force"):
        prepare_corpus(**{**args, "shard_tokens": 64})
    prepare_corpus(**{**args, "workers": 2})  # the same command (the number of workers is no part of it)
    assert shard_bytes(out) == shard_bytes(reference)


def test_refusals_name_the_value_and_the_fix(corpus, prepared, tmp_path, capsys, monkeypatch):
    out, index = prepared
    before = shard_bytes(out)
    with pytest.raises(PhalanxError, match="already holds a prepared corpus.*--force"):
        prepare_corpus(corpus.inputs, str(out), tokenizer=str(corpus.root / "tok"))
    assert shard_bytes(out) == before
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PhalanxError, match="not empty.*notes.txt.*--force"):
        prepare_corpus(corpus.inputs, str(tmp_path), tokenizer=str(corpus.root / "tok"))
    assert (tmp_path / "notes.txt").read_text() == "mine"

    with pytest.raises(PhalanxError, match=r"a.jsonl:1 has no field 'body' \(keys: id, text\).*--field"):
        prepare_corpus(corpus.inputs[:1], str(tmp_path / "j"), field="body")
    with pytest.raises(PhalanxError, match="no column 'body'.*--field"):
        prepare_corpus(corpus.inputs[1:], str(tmp_path / "p"), field="body")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as without pyarrow installed
    with pytest.raises(PhalanxError, match="needs pyarrow: pip install pyarrow"):
        prepare_corpus(corpus.inputs[1:], str(tmp_path / "p"))
    monkeypatch.undo()
    with pytest.raises(PhalanxError, match="matches no file"):
        prepare_corpus([str(tmp_path / "*.jsonl")], str(tmp_path / "g"))
    plain = corpus.root / "plain"
    if not plain.exists():
        plain.mkdir()
        _train_tokenizer(corpus.docs, []).save(str(plain / "tokenizer.json"))
    with pytest.raises(PhalanxError, match="none of the end-of-text tokens.*--eos-token"):
        prepare_corpus(corpus.inputs, str(tmp_path / "e"), tokenizer=str(plain))
    with pytest.raises(PhalanxError, match="--eos-token <nope> is not in the vocabulary"):
        prepare_corpus(corpus.inputs, str(tmp_path / "e"), tokenizer=str(plain), eos_token="<nope>")

    # a vocabulary larger than the model's is refused by validate(), before any process or step
    assert_refused(["data.kind=memmap", f"data.path={out}", "model.vocab_size=256"],
                   ["model.vocab_size=256", "tokens up to 299", "set model.vocab_size >= 300"])
    assert_refused(["data.kind=memmap", f"data.path={tmp_path / 'j'}"], ["has no index.json", "--out"])

    from phalanx.cli import main

    assert main(["data", "prepare", *corpus.inputs, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0], err


def test_byte_level_without_a_tokenizer_and_the_older_form(corpus, tmp_path):
    assert TokenizerSpec(None, None, 1 << 16, 0, "x").dtype == "uint16"  # ids up to 65535
    assert TokenizerSpec(None, None, (1 << 16) + 1, 0, "x").dtype == "uint32"
    index = prepare_corpus([str(corpus.root / "a.jsonl")], str(tmp_path / "b"), shard_tokens=400)
    assert index["vocab_size"] == 256 and index["eos_id"] is None and index["documents"] == 48
    assert bytes(shard_tokens(tmp_path / "b").astype(np.uint8)) == "".join(corpus.docs[:48]).encode()
    from phalanx.cli import main

    with pytest.raises(PhalanxError, match="--out DIR"):
        main(["--debug", "data", "prepare", *corpus.inputs])


def test_training_reads_the_shard_folder(prepared, tmp_path):
    from phalanx.parallel.dist import DistContext
    from phalanx.trainer import Trainer
    from phalanx.trainer.rundir import prepare_run_dir

    out, _ = prepared
    cfg = validate(load_config(CONFIG, run_overrides(tmp_path, "data.kind=memmap", f"data.path={out}",
                                                     "model.vocab_size=320", "train.steps=2")))
    run_dir, _ = prepare_run_dir(cfg)
    trainer = Trainer(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), run_dir)
    trainer.fit()
    got = losses(run_dir)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) and v < 2 * math.log(320) for v in got.values())
    assert os.path.isdir(run_dir)
