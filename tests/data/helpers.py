"""Test helpers for the data pipeline."""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """Deterministic stand-in: one token per UTF-8 byte (id = byte + 3); pad 0, eos 1, bos 2."""

    pad_id, eos_id, bos_id = 0, 1, 2

    def __init__(self, vocab_size: int = 259):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")
