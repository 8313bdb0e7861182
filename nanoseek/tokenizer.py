"""Byte-level BPE tokenizer (HF `tokenizers`), its special tokens and the chat template.

Saved as `tokenizer.json` + `tokenizer_config.json`, which `transformers.AutoTokenizer` loads. Byte-level
BPE with no normaliser is lossless: decode(encode(s)) == s for any UTF-8 string.

Chat format (DeepSeek-R1's shape, ASCII markers):
    <|bos|>[<|system|>system text]<|user|>question<|assistant|><think>reasoning</think>answer<|eos|>...

Text is text: the markers are special tokens only where the template puts them. A message (and a pretraining
document) that contains the characters "<|assistant|>" is encoded as those characters (`literal=True`), so
a user cannot forge a turn; only an assistant message's <think> and </think> are the special tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanoseek.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK]
ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
THINK_TAGS = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")

# GPT-4-style split, but digits one at a time (small models learn arithmetic better digit by digit)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer:
    """nanoseek's own tokenizer (all SPECIAL_TOKENS present: chat rendered in code, with a loss mask), or a
    foreign one from a transformers directory: BOS/EOS named in its tokenizer_config.json and conversations
    rendered by its own Jinja chat_template there (serving only: no loss mask)."""

    def __init__(self, tk, config: dict | None = None):
        from tokenizers import decoders

        self.tk = tk
        self.config = config = config or {}  # a foreign tokenizer's: save() writes it back
        self._bytes: dict[int, bytes] = {}  # token_bytes, computed once per id
        self._byte_level = isinstance(tk.decoder, decoders.ByteLevel)
        self._added = set(tk.get_added_tokens_decoder())
        self._sizes = None  # text_size's table: [vocab, (bytes, characters)]
        self._literal_tk = None  # a copy that encodes special tokens' text as ordinary text (made when needed)
        found = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
        self.special = {t: i for t, i in found.items() if i is not None}
        self.native = len(self.special) == len(SPECIAL_TOKENS)
        self.chat_template = None if self.native else _chat_template(config.get("chat_template"))
        if self.native:
            self.bos_id, self.eos_id, self.pad_id = found[BOS], found[EOS], found[PAD]
            return
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.bos_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        if self.eos_id is None:
            missing = ", ".join(t for t in SPECIAL_TOKENS if t not in self.special)
            raise UserError(f"tokenizer lacks the special token(s) {missing}, and its tokenizer_config.json "
                            "names no eos_token that it knows")
        self.pad_id = self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def _encoder(self, literal: bool):
        if not literal:
            return self.tk
        if self._literal_tk is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._literal_tk = HFTokenizer.from_str(self.tk.to_str())
            self._literal_tk.encode_special_tokens = True
        return self._literal_tk

    def encode(self, text: str, bos: bool = False, literal: bool = False) -> list[int]:
        """Token ids of text; `literal`: the text of a special token (e.g. "<|eos|>") is encoded as ordinary
        text, not as that token (for text from users and documents)."""
        try:
            ids = self._encoder(literal).encode(text, add_special_tokens=False).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            # a str tokenizers cannot take: lone surrogates (e.g. from JSON "\ud800")
            raise UserError("the text is not valid Unicode (it holds a lone surrogate)") from None
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], literal: bool = False) -> list[list[int]]:
        return [e.ids for e in self._encoder(literal).encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def stop_check(self, stops: list[str]):
        """The engine's stop_check for stop strings: whether one appears in the generated text. It decodes only the
        tail that can hold a new one (a token holds at least one byte), not all the text at every token."""
        hold = max(len(s.encode()) for s in stops) + 8

        def check(generated: list[int]) -> bool:
            tail = self.decode(generated[-hold:])
            return any(s in tail for s in stops)
        return check

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level BPE token may hold part of a UTF-8 character, which
        decode([id]) would turn into U+FFFD (what the OpenAI API's logprobs report as `bytes`)."""
        raw = self._bytes.get(token_id)
        if raw is None:
            piece = self.tk.id_to_token(token_id)
            if piece is None:  # a model's vocabulary may be padded beyond the tokenizer's: such ids decode to nothing
                raw = b""
            elif self._byte_level and token_id not in self._added and all(c in _BYTE_OF_CHAR for c in piece):
                raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
            else:
                raw = self.decode([token_id]).encode()
            self._bytes[token_id] = raw
        return raw

    def text_size(self, ids: Iterable[int]) -> tuple[int, int]:
        """UTF-8 bytes and characters of the text the ids stand for; special tokens stand for none (bits per byte
        counts the bytes of text)."""
        import numpy as np

        if self._sizes is None:
            pieces = [b"" if i in self._added else self.token_bytes(i) for i in range(self.vocab_size)]
            # a character is one UTF-8 lead byte (any byte but 10xxxxxx) and its continuation bytes
            self._sizes = np.array([(len(b), sum((c & 0xC0) != 0x80 for c in b)) for b in pieces], dtype=np.int64)
        n_bytes, n_chars = self._sizes[np.asarray(ids, dtype=np.int64)].sum(0).tolist()
        return n_bytes, n_chars

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask (1 on assistant replies and their <|eos|>)."""
        if not self.native:
            return self._render_template(messages, add_generation_prompt)
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLE_MARKERS or not isinstance(content, str):
                raise UserError(f"message {i}: needs role system/user/assistant and a string content")
            ids.append(self.special[ROLE_MARKERS[role]])
            mask.append(0)
            body = []  # text as text; in an assistant's reply <think> and </think> are the special tokens
            for piece in THINK_TAGS.split(content) if role == "assistant" else [content]:
                tag = role == "assistant" and piece in (THINK, END_THINK)
                body += [self.special[piece]] if tag else self.encode(piece, literal=True)
            if role == "assistant":
                body.append(self.eos_id)
            ids += body
            mask += [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.special[ASSISTANT])
            mask.append(0)
        return ids, mask

    def _render_template(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        if not self.chat_template:
            raise UserError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja): "
                            "chat needs one (plain completions work without)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token, raise_exception=raise_exception)
        except TemplateError as e:
            raise UserError(f"the chat template rejected the conversation: {e}") from None
        ids = self.encode(text)
        return ids, [0] * len(ids)

    def save(self, out_dir: str | Path) -> None:
        from nanoseek.checkpoint import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.tk.to_str())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT, THINK, END_THINK],
            "clean_up_tokenization_spaces": False, "add_bos_token": self.tk.post_processor is not None,
            "model_max_length": 1 << 20,
            "chat_template": CHAT_TEMPLATE,
        } if self.native else self.config  # (a foreign one keeps its own special tokens and template)
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise UserError(f"no tokenizer at {p} (expected tokenizer.json)")
        config = {}
        # transformers reads the special tokens from special_tokens_map.json too; tokenizer_config.json wins
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (f.parent / name).exists():
                try:
                    part = json.loads((f.parent / name).read_text())
                except (ValueError, UnicodeDecodeError) as e:
                    raise UserError(f"cannot read {f.parent / name}: {e}") from None
                if not isinstance(part, dict):
                    raise UserError(f"cannot read {f.parent / name}: not a JSON object")
                config.update(part)
        if (f.parent / "chat_template.jinja").exists():  # transformers >= 4.5x saves it apart; it takes priority
            config["chat_template"] = (f.parent / "chat_template.jinja").read_text()
        try:
            return cls(HFTokenizer.from_file(str(f)), config)
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot read tokenizer {f}: {e}") from None


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other 68 bytes for
    the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_OF_CHAR = _byte_of_char()


def _chat_template(template) -> str | None:
    """tokenizer_config.json's chat_template: one Jinja string, or a list of named ones (transformers then uses the
    one named "default")."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"the tokenizer's chat templates are named {sorted(map(str, named))}; none is "
                            '"default", the one chat uses')
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError("the tokenizer's chat_template is not a Jinja template (a string)")
    return template


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts (any size: tokenizers streams it)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size={vocab_size} is too small: it needs 256 bytes + "
                        f"{len(SPECIAL_TOKENS)} special tokens + at least one merge")
    tk = HFTokenizer(models.BPE(byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    add_bos_template(tk)
    return Tokenizer(tk)


def add_bos_template(tk) -> None:
    """Make transformers' tokenizer(text) start with <|bos|>, as every pretraining document does (a post-processor,
    applied with add_special_tokens=True; nanoseek's own encode passes False and adds it itself)."""
    from tokenizers import processors

    bos = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                      special_tokens=[(BOS, bos)])


# --- `nanoseek tokenizer` ---------------------------------------------------------------------------

def add_arguments(p) -> None:
    from nanoseek.data import add_data_arguments

    add_data_arguments(p, vocab_default="4096")
    p.add_argument("--force", action="store_true", help="retrain even if <run>/tokenizer exists")


def run(args) -> None:
    import time

    from nanoseek import STAGES
    from nanoseek.data import ensure_tokenizer

    run_dir = Path(args.run)
    models = [run_dir / s for s in STAGES if (run_dir / s / "config.json").exists()]
    if args.force and models:
        raise UserError(f"{models[0]} holds a model trained with {run_dir / 'tokenizer'}, which a new tokenizer "
                        "would not match: use another --run, or start the run again with `nanoseek pretrain "
                        "--overwrite` (it trains a new tokenizer when the corpus or --vocab-size changed)")
    t = time.perf_counter()
    tok = ensure_tokenizer(args, run_dir, 4096, force=args.force)
    print(f"tokenizer: {tok.vocab_size} tokens in {run_dir / 'tokenizer'} ({time.perf_counter() - t:.1f}s)")
