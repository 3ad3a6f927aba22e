"""Tokenizers shared by the prepare scripts and by data.py: tiktoken encodings and a character vocabulary.

A tiktoken encoding comes from tiktoken's cache (offline: TIKTOKEN_CACHE_DIR pointing at a directory holding its
cache files) or, for GPT-2, from a local directory holding OpenAI's original `vocab.bpe` and `encoder.json`
(`--tokenizer_dir`). Every tokenizer has a hash of its vocabulary, recorded in the dataset's meta.json, so data
prepared with one vocabulary is never read with another.
"""

import hashlib
import os

import numpy as np

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
