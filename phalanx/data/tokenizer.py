"""Tokenizers for `phalanx data prepare`: a Hugging Face `tokenizers` file, or bytes (vocab 256) without one.

`TokenizerSpec` is what the parent decides once (file, digest, vocabulary, end-of-text id); `encode_task` is
what each worker process runs, with the tokenizer loaded once per process by `init_worker`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from phalanx.errors import PhalanxError

# Names of the end-of-text token in common tokenizers (GPT-2/Qwen, Llama 1-2/Mistral, Llama 3, Gemma, ...).
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end|>", "[SEP]")
# Its beginning-of-text token, recorded in the index (not written: that is the tokenizer's post-processor's choice)
# for `phalanx ckpt export --format hf`'s config.json.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
# Files of an HF model folder that describe its tokenizer; copied beside the shards for `ckpt export --format hf`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
BYTE_VOCAB = 256


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer of one prepare: `path` is None for bytes. Everything a worker needs, and picklable."""

    path: Optional[str]
    sha256: Optional[str]
    vocab_size: int
    eos_id: Optional[int]
    eos_token: Optional[str]
    files: tuple[str, ...] = ()  # the folder's tokenizer files, copied into the output
    bos_id: Optional[int] = None

    @property
    def dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def describe(self) -> dict:
        return {"kind": "bytes" if self.path is None else "huggingface", "path": self.path, "sha256": self.sha256}


def _tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        found = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(found):
            raise PhalanxError(f"--tokenizer {path}: the folder has no tokenizer.json; pass a tokenizer.json file or "
                               f"an HF model folder that holds one (a slow SentencePiece-only model needs converting)")
        return found
    if not os.path.isfile(path):
        raise PhalanxError(f"--tokenizer {path} does not exist; pass a tokenizer.json file or an HF model folder")
    return path


def _configured(folder: str, key: str) -> Optional[str]:
    """The token an HF folder's tokenizer_config.json names under `key` (eos_token, bos_token), if any."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            token = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def load_spec(path: Optional[str], eos_token: Optional[str] = None) -> TokenizerSpec:
    """Resolve `--tokenizer` and `--eos-token` once, in the parent, with errors that name the fix."""
    if path is None:
        if eos_token is not None:
            raise PhalanxError(f"--eos-token {eos_token} needs --tokenizer: byte-level tokens (vocab 256) have no "
                               f"end-of-text token")
        return TokenizerSpec(None, None, BYTE_VOCAB, None, None)
    from tokenizers import Tokenizer

    file = _tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(file)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise PhalanxError(f"--tokenizer {file} is not a Hugging Face tokenizers file ({err})") from None
    folder = os.path.dirname(file)
    if eos_token is not None:
        if tok.token_to_id(eos_token) is None:
            raise PhalanxError(f"--eos-token {eos_token} is not in the vocabulary of {file}; name one that is")
        name = eos_token
    else:
        candidates = [c for c in (_configured(folder, "eos_token"), *EOS_NAMES) if c]
        name = next((c for c in candidates if tok.token_to_id(c) is not None), None)
        if name is None:
            raise PhalanxError(f"{file} has none of the end-of-text tokens {', '.join(EOS_NAMES)}; "
                               f"name its end-of-text token with --eos-token")
    files = tuple(os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f)))
    if os.path.basename(file) != "tokenizer.json":
        files = (file,)
    bos = next((tok.token_to_id(c) for c in (_configured(folder, "bos_token"), *BOS_NAMES)
                if c and tok.token_to_id(c) is not None), None)
    return TokenizerSpec(os.path.abspath(file), sha256_file(file), tok.get_vocab_size(with_added_tokens=True),
                         tok.token_to_id(name), name, files, bos)


# ---- worker side: one tokenizer per process --------------------------------------------------------------

_WORKER: dict = {}


def init_worker(spec: TokenizerSpec, one_thread: bool = False) -> None:
    """Load the tokenizer once in this process (a pool's initializer; also called in-process for --workers 1).
    `one_thread`: the processes are the parallelism, so each keeps `encode_batch` off its thread pool (which
    would otherwise start one thread per CPU in every worker)."""
    if one_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["spec"] = spec
    if spec.path is not None:
        from tokenizers import Tokenizer

        _WORKER["tokenizer"] = Tokenizer.from_file(spec.path)


def _texts(kind: str, items: list, field: str, where: tuple) -> list:
    """The documents of one task: raw jsonl lines are parsed here, in the worker, not in the parent."""
    path, at = where
    if kind == "parquet":
        for offset, text in enumerate(items):
            if not isinstance(text, str):
                raise PhalanxError(f"{path}: row {at + offset} of column '{field}' is {type(text).__name__}, not "
                                   f"text; name the text column with --field")
    if kind != "jsonl":
        return items
    out = []
    for line, number in zip(items, at):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise PhalanxError(f"{path}:{number}: not a JSON line ({err})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            what = "has no" if not isinstance(record, dict) or field not in record else "has a non-text"
            raise PhalanxError(f"{path}:{number} {what} field '{field}' (keys: {keys}); "
                               f"name the text field with --field")
        out.append(text)
    return out


def encode_task(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a task's documents, each followed by the end-of-text id, and each document's token count."""
    kind, items, field, where = task
    spec: TokenizerSpec = _WORKER["spec"]
    texts = _texts(kind, items, field, where)
    if spec.path is None:
        ids: list = [np.frombuffer(t if isinstance(t, bytes) else t.encode(), dtype=np.uint8) for t in texts]
    else:
        try:
            texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
        except UnicodeDecodeError as err:
            raise PhalanxError(f"{where[0]} is not UTF-8 text ({err}); convert it, or prepare it without "
                               f"--tokenizer (bytes)") from None
        tok = _WORKER["tokenizer"]
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips the offsets (tokenizers >= 0.20)
        ids = [e.ids for e in encode(texts)]
    eos = spec.eos_id is not None
    lengths = np.fromiter((len(x) + eos for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=spec.dtype)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        pos += len(x)
        if eos:
            tokens[pos] = spec.eos_id
            pos += 1
    return tokens, lengths
