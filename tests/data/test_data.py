"""Data: learnable deterministic synthetic stream, token files, the resumable sharded position."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from phalanx.cli import main
from phalanx.config import load_config
from phalanx.data import DataPosition, MemmapTokens, SyntheticTokens, build_dataset
from phalanx.data.prepare import prepare_bytes
from phalanx.errors import ConfigError, PhalanxError
from phalanx.parallel import validate


def test_synthetic_sample_depends_only_on_seed_and_index():
    ds = SyntheticTokens(vocab_size=97, seq_len=32, seed=3, noise=0.1)
    whole = ds.batch(list(range(8)))
    assert whole.shape == (8, 33) and whole.dtype == torch.int64
    assert torch.equal(ds.batch([5, 6]), whole[5:7])  # same sample whatever batch it is read in
    assert torch.equal(SyntheticTokens(97, 32, 3, 0.1).batch([5]), whole[5:6])
    assert not torch.equal(SyntheticTokens(97, 32, 4, 0.1).batch([5]), whole[5:6])
    assert not torch.equal(ds.batch([5], split="val"), whole[5:6])
    assert int(whole.min()) >= 0 and int(whole.max()) < 97


def test_synthetic_structure_is_learnable():
    """All but about `noise` of the next tokens follow one bijective map: loss can fall far below ln(V)."""
    ds = SyntheticTokens(vocab_size=256, seq_len=64, seed=0, noise=0.1)
    x = ds.batch(list(range(64)))
    prev, nxt = x[:, :-1].flatten(), x[:, 1:].flatten()
    table = {}
    for p, n in zip(prev.tolist(), nxt.tolist()):
        table.setdefault(p, []).append(n)
    follows = sum(max(set(v), key=v.count) == n for p, n in zip(prev.tolist(), nxt.tolist()) for v in [table[p]])
    assert follows / len(prev) > 0.85
    floor = 0.1 * math.log(256) + 0.33
    assert floor < 0.25 * math.log(256)


def test_position_shards_the_same_global_batch_for_any_dp():
    ds = SyntheticTokens(64, 8, 0, 0.1)
    single = DataPosition(ds, batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1)
    ranks = [DataPosition(ds, batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = torch.cat(single.next_step())
        parts = torch.cat([torch.cat(p.next_step()) for p in ranks])
        assert torch.equal(whole, parts)
    assert ranks[0].accumulation == 2 and single.accumulation == 2


def test_position_resumes_exactly():
    ds = SyntheticTokens(64, 8, 0, 0.1)
    a = DataPosition(ds, 8, 4, 0, 1)
    for _ in range(5):
        a.next_step()
    b = DataPosition(ds, 8, 4, 0, 1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next_step(), b.next_step()))


@pytest.fixture
def token_file(tmp_path):
    text = tmp_path / "corpus.txt"
    noise = bytes(np.random.default_rng(0).integers(0, 256, 8000, dtype=np.uint8))  # windows are unique
    text.write_bytes("naïve ☃ text. ".encode() + noise)
    out = tmp_path / "tokens.bin"
    assert main(["data", "prepare", str(text), str(out)]) == 0
    return text, out


def test_prepare_writes_byte_tokens_and_description(token_file):
    text, out = token_file
    tokens = np.fromfile(out, dtype=np.uint16)
    assert bytes(tokens.astype(np.uint8).tolist()) == text.read_bytes()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == {**meta, "dtype": "uint16", "vocab_size": 256, "tokens": len(tokens)}


def test_prepare_never_overwrites(token_file, capsys):
    text, out = token_file
    before = out.read_bytes()
    assert main(["data", "prepare", str(text), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    with pytest.raises(PhalanxError, match="does not exist"):
        prepare_bytes(str(text) + ".missing", str(out) + "2.bin")


def test_memmap_windows_split_and_epochs(token_file):
    _, out = token_file
    ds = MemmapTokens(str(out), seq_len=16, seed=0, val_fraction=0.1, vocab_size=256)
    raw = torch.from_numpy(np.fromfile(out, dtype=np.uint16).astype(np.int64))
    n = ds.windows("train")
    epoch0 = ds.batch(list(range(n)))
    starts = sorted(int(((raw.unfold(0, 17, 16) == row).all(1)).nonzero()[0]) * 16 for row in epoch0)
    assert starts == [i * 16 for i in range(n)]  # every window once per epoch
    assert not torch.equal(ds.batch(list(range(n, 2 * n))), epoch0)  # the next epoch is reshuffled
    lo, hi = ds.regions["val"]
    assert lo == ds.regions["train"][1] and hi == len(raw)
    val = ds.batch([0, 1], split="val")
    assert all(any(torch.equal(row, raw[s:s + 17]) for s in range(lo, hi - 16)) for row in val)


def test_memmap_config_end_to_end(token_file):
    _, out = token_file
    cfg = validate(load_config(None, ["data.kind=memmap", f"data.path={out}", "data.seq_len=16"]))
    assert build_dataset(cfg).batch([0]).shape == (1, 17)
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        build_dataset(validate(load_config(None, ["data.kind=memmap", f"data.path={out}", "data.seq_len=16",
                                                  "model.vocab_size=100"])))
