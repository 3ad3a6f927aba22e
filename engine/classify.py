"""Sequence classification with an encoder (a classifier: GPTConfig.n_labels > 0), as BERT is fine-tuned (Devlin et
al. 2019, section 4): each text, read as `[CLS] text [SEP]`, gets one label, predicted from [CLS]'s final state.

A classification dataset (prepare/classify.py) holds each split's texts' tokens one after another, where each text
starts, and one label index per text; meta.json's "classify" lists the labels. A batch draws batch_size texts from
its key (training: seed, iteration, global micro-step, rollbacks; evaluation: seed and batch number), as chat's
conversations are drawn, so resume is exact and W ranks read what one process reads. Each row is `[CLS] text [SEP]`,
the text cut to block_size - 2 tokens, then [PAD] to block_size: one shape for every batch (compiled graphs stay
one), the padding kept out of attention by the model (pad_id). The loss is the mean cross-entropy of the labels.
"""

from dataclasses import dataclass

import numpy as np
import torch

from engine.data import TokenData, to_device


def encoder_rows(texts: list, special: dict[str, int], block_size: int) -> torch.Tensor:
    """(len(texts), block_size) int64: each text (token ids) as `[CLS] text [SEP]`, cut to fit, then [PAD]."""
    rows = torch.full((len(texts), block_size), special["[PAD]"], dtype=torch.long)
    for r, ids in enumerate(texts):
        ids = torch.as_tensor(np.asarray(ids[: block_size - 2], dtype=np.int64))
        rows[r, 0], rows[r, 1 : 1 + len(ids)], rows[r, 1 + len(ids)] = special["[CLS]"], ids, special["[SEP]"]
    return rows


def texts_of(data: TokenData, split: str, picks) -> list[np.ndarray]:
    """The token ids of the split's texts numbered picks."""
    tokens, starts = data.memmap(split), data.memmap(split, "starts_file")
    return [np.asarray(tokens[starts[i] : starts[i + 1]]) for i in picks]


@dataclass(frozen=True)
class Labelled:
    """A classifier's batches: what Masking is to a masked-language model (train.py and engine/batch_schedule.py use
    either through batch() and count())."""

    special: dict[str, int]  # the encoder's [CLS], [SEP], [MASK], [PAD] (engine/masking.py special_tokens)

    def batch(self, data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
        """(x (B, block_size) rows of texts drawn from `key`, y (B,) their labels) on device."""
        n = len(data.memmap(split, "starts_file")) - 1
        picks = np.random.default_rng(list(key)).integers(0, n, size=batch_size)
        x = encoder_rows(texts_of(data, split, picks), self.special, block_size)
        y = torch.from_numpy(np.asarray(data.memmap(split, "labels_file")[picks], dtype=np.int64))
        return to_device(x, device), to_device(y, device)

    def count(self, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
        """Every text of a batch has its label: batch_size targets."""
        return batch_size
