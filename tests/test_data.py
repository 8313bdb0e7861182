import json

import numpy as np
import pytest
from helpers import corpus_text

from nanoseek.data import (
    TokenLoader,
    build_default_corpus,
    encode_documents,
    ensure_data,
    eval_windows,
    iter_documents,
    load_documents,
    load_tokens,
    prepare,
    resolve_sources,
    split_documents,
    split_stream,
)
from nanoseek.errors import UserError
from nanoseek.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter([corpus_text()]), vocab_size=300)


def test_reads_txt_jsonl_parquet_dirs_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first doc")
    rows = [{"text": "second"}, {}, {"text": None, "id": 3}, {"text": "third"}]  # rows without text are skipped
    (tmp_path / "a" / "two.jsonl").write_text("\n\n".join(map(json.dumps, rows)))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fourth", None, "fifth"]}), tmp_path / "a" / "three.parquet")
    (tmp_path / "a" / "skip.bin").write_bytes(b"\x00\x01")  # not a corpus suffix: ignored in directories
    assert load_documents([str(tmp_path / "a")]) == ["first doc", "fourth", "fifth", "second", "third"]
    assert load_documents([str(tmp_path / "a" / "*.txt")]) == ["first doc"]
    assert len(resolve_sources([str(tmp_path / "**" / "*.jsonl")])) == 1
    # JSON strings may hold U+2028 and U+0085 unescaped: only "\n" ends a JSONL record
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "line\u2028sep\x85x"}, ensure_ascii=False) + "\r\n")
    assert load_documents([str(tmp_path / "b.jsonl")]) == ["line\u2028sep\x85x"]


def test_sources_resolve_each_file_once_through_links(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "top.txt").write_text("top")
    (tmp_path / "d" / "sub" / "low.txt").write_text("low")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "linked.txt").write_text("linked")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "other", target_is_directory=True)
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)  # a cycle: walked once
    names = lambda srcs: [p.name for p in resolve_sources(map(str, srcs))]
    # dir/** matches the directories above each file too: each file is still read once
    assert names([tmp_path / "d" / "**"]) == ["linked.txt", "low.txt", "top.txt"]
    assert names([tmp_path / "d", tmp_path / "d" / "top.txt"]) == ["linked.txt", "low.txt", "top.txt"]
    (tmp_path / "notes[1].txt").write_text("brackets")  # an existing path is a path, not a glob
    assert names([tmp_path / "notes[1].txt"]) == ["notes[1].txt"]


def test_documents_are_read_as_they_go(tmp_path):
    """A corpus larger than memory: JSONL and parquet files are read a document at a time (bytes further on that
    are not UTF-8 are not even decoded yet), and prepare writes the shards as it tokenizes."""
    (tmp_path / "c.jsonl").write_bytes(json.dumps({"text": "first"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    docs = iter_documents([str(tmp_path / "c.jsonl")])
    assert next(docs) == "first"
    with pytest.raises(UserError, match="not UTF-8 text \\(line 2"):
        next(docs)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10_000)]}), tmp_path / "p.parquet", row_group_size=100)
    assert list(iter_documents([str(tmp_path / "p.parquet")])) == [f"row {i}" for i in range(10_000)]


def test_split_stream_is_the_list_split_in_order():
    docs = ["aaaa", "bbbb", "cc", "d"]
    for fraction in (0.1, 0.3, 0.5, 0.9):
        train, val = split_documents(docs, fraction)
        assert list(split_stream(docs, 11, fraction)) == [(False, d) for d in train] + [(True, d) for d in val]
        assert "".join(train + val) == "".join(docs) and len("".join(val)) == 11 - int(11 * (1 - fraction))


def test_byte_order_mark_and_lone_surrogates(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain")
    assert load_documents([str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.txt")]) == ["first", "plain"]
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "abc\\ud800"}\n')
    with pytest.raises(UserError, match=r"s.jsonl:2: .*lone surrogate"):
        load_documents([str(tmp_path / "s.jsonl")])


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_bytes(b"\x7fELF\x00\x00binary"), "binary"),
    (lambda p: p.write_bytes(b"caf\xe9"), "not UTF-8"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"body": "x"}\n{"text": null}\n'), "no row has a string field"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "x"}\n{"text": 5}\n'), ":2: field 'text' is not a"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "x"}\n["text"]\n'), ":2: not a JSON object"),
])
def test_bad_corpora_fail_with_a_message(tmp_path, setup, match):
    p = tmp_path / "c.txt"
    setup(p)
    if p.with_suffix(".jsonl").exists():
        p = p.with_suffix(".jsonl")
    with pytest.raises(UserError, match=match):
        load_documents([str(p)])


def test_every_document_starts_with_bos_in_the_stream(tok):
    docs = [corpus_text(5), "short one", corpus_text(900) * 3, "ünï"]  # the third is cut into pieces
    expected = np.concatenate([[tok.bos_id, *tok.encode(d)] for d in docs])
    for batch_chars in (1, 100, 1 << 22):  # a flush after every document, after some, at the end only
        assert encode_documents(tok, docs, batch_chars).tolist() == expected.tolist()
    # a document's "<|eos|>" is text, not the special token
    stream = encode_documents(tok, ["a <|eos|> b <|bos|>"]).tolist()
    assert stream[0] == tok.bos_id and tok.eos_id not in stream and tok.bos_id not in stream[1:]
    assert tok.decode(stream[1:]) == "a <|eos|> b <|bos|>"


def test_split_is_nanogpts_on_one_file():
    text = corpus_text(200)
    train, val = split_documents([text], 0.1)
    n = len(text)
    assert train == [text[: int(n * 0.9)]] and val == [text[int(n * 0.9):]]
    train, val = split_documents(["aaaa", "bbbb", "cc"], 0.5)
    assert train == ["aaaa", "b"] and val == ["bbb", "cc"]


def test_prepare_counts_bytes_and_rejects_tiny_corpora(tmp_path, tok):
    (tmp_path / "c.txt").write_text(corpus_text(300) + "ünïcödé\n")
    meta = prepare([str(tmp_path / "c.txt")], tok, tmp_path / "data", 0.1)
    val = load_tokens(tmp_path / "data", "val")
    assert val.dtype == np.uint16 and len(val) == meta["val"]["tokens"]
    assert tok.decode(val[1:].tolist()).endswith("ünïcödé\n")  # val keeps the tail, after its <|bos|>
    assert meta["val"]["bytes"] == meta["val"]["chars"] + 4
    # train is the rest, with nothing of val in it: the two shards decode back to the text, in order
    train = load_tokens(tmp_path / "data", "train")
    assert train[0] == val[0] == tok.bos_id and tok.bos_id not in train[1:] and tok.bos_id not in val[1:]
    assert tok.decode(train[1:].tolist()) + tok.decode(val[1:].tolist()) == (tmp_path / "c.txt").read_text()
    assert meta["train"]["chars"] + meta["val"]["chars"] == len((tmp_path / "c.txt").read_text())
    (tmp_path / "small.txt").write_text("too small")
    with pytest.raises(UserError, match="fewer than one training sequence"):
        prepare([str(tmp_path / "small.txt")], tok, tmp_path / "d2", 0.1, min_tokens=65)


def test_loader_resumes_at_the_exact_position():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = TokenLoader(tokens, batch_size=4, seq_len=64, seed=3)
    for _ in range(45):  # crosses an epoch boundary (37 windows per epoch / 4 per batch)
        a.next_batch()
    b = TokenLoader(tokens, batch_size=4, seq_len=64, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(10):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert (xa == xb).all() and (ya == yb).all()
        assert (ya[:, :-1] == xa[:, 1:]).all()


def test_loader_windows_are_whole_and_inside_the_stream():
    """Over many epochs (each its own random offset): every window has S+1 tokens, and an epoch visits each of its
    windows once."""
    tokens = np.arange(2 * 64 * 7 + 3, dtype=np.uint16)
    loader = TokenLoader(tokens, batch_size=1, seq_len=64, seed=5)
    for epoch in range(200):
        loader.epoch = epoch
        starts = loader._epoch_order()
        assert len(set(starts.tolist())) == len(starts) >= 12 and starts.min() >= 0
        assert starts.max() + 64 + 1 <= len(tokens) and len({s % 64 for s in starts.tolist()}) == 1
    loader.epoch, seen = 0, 0
    while loader.epoch < 3:
        x, y = loader.next_batch()
        assert x.shape == y.shape == (1, 64) and (y[0] - x[0] == 1).all()
        seen += 1
    assert seen >= 36


def test_ranks_split_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = TokenLoader(tokens, 4, 32, seed=1).next_batch()[0]
    parts = [TokenLoader(tokens, 2, 32, seed=1, rank=r, world=2).next_batch()[0] for r in range(2)]
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, (parts[0].tolist() + parts[1].tolist())))


def test_eval_windows_score_every_token_once():
    tokens = np.arange(1, 101, dtype=np.uint16)
    for stream in (tokens, np.concatenate([[0], tokens])):  # the shards' val split starts with <|bos|> (id 0)
        for batch in (1, 2, 5):
            windows = list(eval_windows(stream, 32, bos_id=0, batch=batch))
            assert windows[0][0][0, 0] == 0 and windows[0][1][0, 0] == 1  # one <|bos|>, which predicts the text
            assert np.concatenate([y.numpy().ravel() for _, y in windows]).tolist() == list(range(1, 101))
            assert all(np.array_equal(x[:, 1:], y[:, :-1]) for x, y in windows)  # y is x shifted by one
            assert [len(x) for x, _ in windows] == {1: [1, 1, 1, 1], 2: [2, 1, 1], 5: [3, 1]}[batch]


def test_text_size_counts_the_bytes_of_text(tmp_path, tok):
    (tmp_path / "c.txt").write_text(corpus_text(300) + "ünïcödé €\n")
    meta = prepare([str(tmp_path / "c.txt")], tok, tmp_path / "data", 0.1)
    val = load_tokens(tmp_path / "data", "val")
    assert val[0] == tok.bos_id and tok.text_size(val) == (meta["val"]["bytes"], meta["val"]["chars"])
    assert tok.text_size(tok.encode("é€")) == (5, 2) and tok.text_size([tok.bos_id, tok.eos_id]) == (0, 0)


def test_prepared_data_is_remade_when_the_corpus_changes(tmp_path, tok, monkeypatch):
    from argparse import Namespace

    import nanoseek.data

    corpus = tmp_path / "c.jsonl"
    rows = [{"text": corpus_text(40), "body": "other " * 400}] * 3
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = Namespace(data=[str(corpus)], text_field="text", val_fraction=0.1)
    first = ensure_data(args, tmp_path, tok, 8)
    with monkeypatch.context() as m:  # unchanged: reused, not prepared again
        m.setattr(nanoseek.data, "prepare", lambda *a: pytest.fail("prepared again"))
        assert ensure_data(args, tmp_path, tok, 8) == first
    args.text_field = "body"
    assert ensure_data(args, tmp_path, tok, 8)["train"]["chars"] != first["train"]["chars"]
    args.text_field = "text"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))  # the file grew
    grown = ensure_data(args, tmp_path, tok, 8)
    assert grown["train"]["chars"] > first["train"]["chars"] and grown["train"]["sha256"] != first["train"]["sha256"]
    args.val_fraction = 0.2
    assert ensure_data(args, tmp_path, tok, 8)["val"]["chars"] > grown["val"]["chars"]
    other = train_tokenizer(iter([corpus_text(seed=1)]), vocab_size=290)  # e.g. after `nanoseek tokenizer --force`
    remade = ensure_data(args, tmp_path, other, 8)
    assert remade["vocab_size"] == 290 and load_tokens(tmp_path / "data", "train").max() < 290


def test_the_default_corpus_is_the_bible_and_worked_problems(tmp_path):
    path = build_default_corpus(tmp_path / "a.jsonl", n_reasoning=40)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert any(d.startswith("In the beginning God created the heaven and the earth.") for d in docs)
    problems = [d for d in docs if d.startswith("Question: ")]
    assert len(problems) == 40 and all("\nAnswer: " in d for d in problems)
    assert sum("\nSolution: " in d for d in problems) >= 20  # gsm_symbolic and chain_sum show their work
    assert build_default_corpus(tmp_path / "b.jsonl", n_reasoning=40).read_bytes() == path.read_bytes()
