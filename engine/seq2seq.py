"""Sequence-to-sequence data for encoder-decoders (arch=encoder_decoder), as T5 is trained (Raffel et al. 2020).

A seq2seq dataset (prepare/seq2seq.py) holds each split's sources one after another (<split>.bin, with
<split>.starts.bin: where each begins, then the end) and their targets likewise (<split>.target.bin,
<split>.target_starts.bin). Two special tokens, recorded in meta.json's "seq2seq": "<pad>" (padding, and the
decoder's start token, as T5's) and "</s>" (the end of a source or a target). Their ids follow the text's
vocabulary, or are a tokenizer.json's own when it has both (T5's SentencePiece vocabulary: 0 and 1).

A batch draws batch_size pairs from its key (training: seed, iteration, global micro-step, rollbacks; evaluation:
seed and batch number), so resume is exact and W ranks read what one process reads. Its rows are `source </s>` and
`target </s>`, each cut to block_size (the </s> kept) and padded: the source with <pad> (kept out of attention), the
target with -1 (out of the loss). The loss is the mean cross-entropy over the target tokens of the global batch.
"""

import json
from dataclasses import dataclass

import numpy as np
import torch

from engine.data import TokenData, to_device

SPECIAL = ("<pad>", "</s>")


def special_tokens(text_vocab_size: int, tokenizer_json: str | None = None) -> dict[str, int]:
    """<pad> and </s>: a tokenizer.json's own when it has both as added tokens (T5's), else the ids after the text's
    vocabulary, in SPECIAL's order."""
    if tokenizer_json:
        added = {t.get("content"): t.get("id") for t in json.loads(tokenizer_json).get("added_tokens") or ()}
        if all(isinstance(added.get(name), int) for name in SPECIAL):
            return {name: added[name] for name in SPECIAL}
    return {name: text_vocab_size + i for i, name in enumerate(SPECIAL)}


def rows(sequences: list, end: int, fill: int, block_size: int) -> torch.Tensor:
    """(len(sequences), block_size) int64: each sequence of token ids then `end`, cut to block_size (the end kept),
    then `fill`."""
    out = torch.full((len(sequences), block_size), fill, dtype=torch.long)
    for r, ids in enumerate(sequences):
        ids = np.append(np.asarray(ids[: block_size - 1], dtype=np.int64), end)
        out[r, : len(ids)] = torch.from_numpy(ids)
    return out


def pairs_of(data: TokenData, split: str, picks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The source and target token ids of the split's pairs numbered picks."""
    out = []
    for part in ("", "target_"):
        tokens, starts = data.memmap(split, f"{part}file"), data.memmap(split, f"{part}starts_file")
        out.append([np.asarray(tokens[starts[i] : starts[i + 1]]) for i in picks])
    return out[0], out[1]


@dataclass(frozen=True)
class Pairs:
    """An encoder-decoder's batches: what Masking is to a masked-language model (train.py and
    engine/batch_schedule.py use either through batch() and count())."""

    data: TokenData  # its train split is what count() reads
    special: dict[str, int]  # <pad> and </s> (special_tokens)

    def picks(self, split: str, batch_size: int, key: tuple[int, ...]) -> np.ndarray:
        n = len(self.data.memmap(split, "starts_file")) - 1
        return np.random.default_rng(list(key)).integers(0, n, size=batch_size)

    def batch(self, data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
        """(x (B, block_size) the sources, y (B, block_size) the targets, -1 after their end) on device."""
        sources, targets = pairs_of(data, split, self.picks(split, batch_size, key))
        pad, end = self.special["<pad>"], self.special["</s>"]
        x, y = rows(sources, end, pad, block_size), rows(targets, end, -1, block_size)
        return to_device(x, device), to_device(y, device)

    def count(self, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
        """The target tokens (</s> included) of the training batch of `key`, from the target starts alone."""
        starts = self.data.memmap("train", "target_starts_file")
        lengths = starts[1:] - starts[:-1]
        return int(np.minimum(lengths[self.picks("train", batch_size, key)] + 1, block_size).sum())
