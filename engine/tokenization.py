"""Tokenizers shared by the prepare scripts and by engine/data.py: tiktoken encodings and a character vocabulary.

A tiktoken encoding comes from tiktoken's cache (offline: TIKTOKEN_CACHE_DIR pointing at a directory holding its
cache files) or, for GPT-2, from a local directory holding OpenAI's original `vocab.bpe` and `encoder.json`
(`--tokenizer_dir`). Every tokenizer has a hash of its vocabulary, recorded in the dataset's meta.json, so data
prepared with one vocabulary is never read with another. A Hugging Face tokenizer.json, which may come from anywhere,
is loaded through tokenizer_from_json, which checks it before the `tokenizers` library reads it.
"""

import hashlib
import json
import os

import numpy as np

from engine.errors import UserError
from engine.schemas import MAX_TOKENIZER_BYTES, TokenizerJson, check, parse_json, read_text

ENDOFTEXT = "<|endoftext|>"


class TokenizerUnavailable(ValueError):
    """The tokenizer cannot be loaded; the message says how to fix it."""


def load_encoding(name: str, tokenizer_dir: str | None = None):
    """The tiktoken Encoding `name`, or GPT-2's built from tokenizer_dir/{vocab.bpe,encoder.json}."""
    import tiktoken

    if tokenizer_dir is not None:
        if name != "gpt2":
            raise TokenizerUnavailable(f"--tokenizer_dir holds GPT-2's vocab.bpe and encoder.json; tokenizer={name}")
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        files = [os.path.join(tokenizer_dir, f) for f in ("vocab.bpe", "encoder.json")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise TokenizerUnavailable(
                f"{', '.join(missing)} not found; --tokenizer_dir needs vocab.bpe and encoder.json"
            )
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=files[0], encoder_json_file=files[1])
        return tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)}
        )
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise TokenizerUnavailable(f"unknown tiktoken encoding {name!r} ({str(e).splitlines()[0]})") from None
    except Exception as e:  # the first use downloads the vocabulary; network errors share no base class
        raise TokenizerUnavailable(
            f"could not load the {name!r} tokenizer ({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR to a "
            "directory holding tiktoken's cache files, or for gpt2 pass --tokenizer_dir=<dir with vocab.bpe and "
            "encoder.json>"
        ) from None


def encoding_hash(enc) -> str:
    """sha256 of a tiktoken encoding's ranks and special tokens: equal hashes, equal token ids."""
    h = hashlib.sha256()
    specials = {enc.encode_single_token(t): t for t in enc.special_tokens_set}
    for rank in range(enc.n_vocab):
        if rank in specials:
            token = b"special:" + specials[rank].encode()
        else:
            try:
                token = enc.decode_single_token_bytes(rank)
            except KeyError:  # a hole in the id space
                continue
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    return h.hexdigest()


def chars_hash(chars: str) -> str:
    """sha256 of a character vocabulary (the characters in id order)."""
    return hashlib.sha256(chars.encode("utf-8")).hexdigest()


def char_lookup(chars: str) -> np.ndarray:
    """A table from Unicode code point to character id (-1 for characters outside the vocabulary)."""
    codes = np.array([ord(c) for c in chars], dtype=np.int64)
    table = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, dtype=np.int64)
    table[codes] = np.arange(len(chars))
    return table


def char_encode(text: str, table: np.ndarray) -> np.ndarray:
    """Character ids of `text` via char_lookup's table; ValueError for characters outside the vocabulary."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < len(table), table[np.minimum(codes, len(table) - 1)], -1)
    if (ids < 0).any():
        bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
        raise ValueError(f"characters {''.join(bad)!r} are not in the vocabulary")
    return ids


# --- Hugging Face tokenizer.json, for exports (transformers.AutoTokenizer reads it) -----------------------------------


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as Hugging Face byte-level BPE files spell tokens: printable
    Latin-1 bytes stand for themselves, the other 68 bytes for code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_tokenizer_json(enc):
    """A `tokenizers.Tokenizer` equal to tiktoken encoding `enc` (GPT-2 style: byte-level BPE, its split regex, its
    special tokens). tiktoken keeps only ranks; BPE files need merges: each multi-byte token is the merge of every
    split of it into two tokens, ordered by the token's rank (lower merges first), as tiktoken applies them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spell = byte_to_unicode()
    ranks = enc._mergeable_ranks  # bytes -> rank, tiktoken's own table
    vocab = {"".join(spell[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])):
            if ranks[left] < rank and ranks[right] < rank:
                merges.append(("".join(spell[b] for b in left), "".join(spell[b] for b in right)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(sorted(enc.special_tokens_set))
    for special in enc.special_tokens_set:
        assert tok.token_to_id(special) == enc.encode_single_token(special), special
    return tok


def char_tokenizer_json(chars: str):
    """A `tokenizers.Tokenizer` for a character vocabulary: every character one token, id i is chars[i]."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n included
    tok.decoder = decoders.Fuse()  # joined without spaces
    return tok


# --- a byte-level BPE trained on your own corpus (prepare/text.py --tokenizer=bpe) -----------------------------------


def train_bpe(texts, vocab_size: int, length: int | None = None):
    """A byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, GPT-2's split regex, merges learned
    most-frequent-pair first) of vocab_size ids trained with the `tokenizers` library on the iterable `texts`, with
    <|endoftext|> as its one special token. Every string encodes (the 256 byte symbols are all in it) and decodes
    back exactly. `length` (the number of texts) only sizes the progress bar."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def specials_as_text(tokenizer):
    """`tokenizer` (a `tokenizers.Tokenizer`), set to encode special-token strings found in text as ordinary text,
    as tiktoken's encode_ordinary does: the literal "<|endoftext|>" in a document or a prompt becomes its BPE pieces,
    exactly as if the tokenizer had no special tokens, never the special id, which only our code inserts. The library
    matches them by default, and the setting is not saved in tokenizer.json: set it on every tokenizer loaded."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def endoftext_as_vocabulary(tokenizer):
    """`tokenizer` (a `tokenizers.Tokenizer`) with <|endoftext|> an ordinary vocabulary entry at its id rather than an
    added token, for exports: no tokenizer read from the file (the `tokenizers` library, transformers' AutoTokenizer
    and its chat template, which sees the rendered conversation as one string) then matches the literal in text, while
    the id still decodes to it. No merge builds it from text: GPT-2's split regex cuts it into "<|", "endoftext" and
    "|>" first. A model whose vocabulary is not a dict (Unigram) keeps it as an added token."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    ids = [t["id"] for t in spec["added_tokens"] if t["content"] == ENDOFTEXT]
    vocab = spec["model"].get("vocab")
    if not ids or not isinstance(vocab, dict) or vocab.get(ENDOFTEXT, ids[0]) != ids[0]:
        return tokenizer
    vocab[ENDOFTEXT] = ids[0]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != ENDOFTEXT]
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_from_json(text: str, where: str):
    """A `tokenizers.Tokenizer` from the text of a tokenizer.json that may not be ours (`where` names it in messages):
    its structure is checked first (engine/schemas.py TokenizerJson: ids within the vocabulary, merges of vocabulary
    entries, regexes that cannot backtrack without end, no padding), since the library panics or aborts on some
    malformed files; what it still refuses, panics included, is one UserError line too."""
    if len(text) > MAX_TOKENIZER_BYTES:
        raise UserError(f"{where}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB, too large for a tokenizer.json")
    check(TokenizerJson, parse_json(text, where), where)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except BaseException as e:  # a plain Exception, or pyo3's PanicException, which derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: the tokenizers library cannot load it ({detail})") from None


def added_token_ids(tokenizer_json: str | None, names) -> dict[str, int] | None:
    """A tokenizer.json's (its text's) ids of the tokens `names` when it has every one of them as an added token (BERT's
    [CLS]..., T5's <pad>...), else None."""
    if not tokenizer_json:
        return None
    added = {t.get("content"): t.get("id") for t in json.loads(tokenizer_json).get("added_tokens") or ()}
    return {name: added[name] for name in names} if all(isinstance(added.get(n), int) for n in names) else None


def special_token_ids(names, text_vocab_size: int, tokenizer_json: str | None = None) -> dict[str, int]:
    """The ids of the special tokens `names`: a tokenizer.json's own when it has them all, else the ids after the
    text's vocabulary, in order."""
    return added_token_ids(tokenizer_json, names) or {name: text_vocab_size + i for i, name in enumerate(names)}


def read_tokenizer_json(path: str) -> tuple[str, object]:
    """(the text, the `tokenizers.Tokenizer`) of the tokenizer.json file at `path`, checked as tokenizer_from_json."""
    text = read_text(path, MAX_TOKENIZER_BYTES)
    return text, tokenizer_from_json(text, path)


def tokenizer_json_hash(text: str) -> str:
    """The vocabulary hash of a tokenizer.json: the sha256 of its text, as saved beside the dataset."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tiktoken_manifest(name: str, tokenizer_dir: str | None = None):
    """(encoding, its meta.json entry: name, vocabulary hash, vocab_size, end-of-text id) for the prepare scripts.
    Raises TokenizerUnavailable offline without the encoding's files."""
    enc = load_encoding(name, tokenizer_dir)
    eot = enc.encode_single_token(ENDOFTEXT) if ENDOFTEXT in enc.special_tokens_set else enc.eot_token
    return enc, {"tokenizer": name, "tokenizer_hash": encoding_hash(enc), "vocab_size": enc.n_vocab, "eot_id": eot}
