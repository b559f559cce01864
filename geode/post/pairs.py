"""Preference pairs as token ids and as trainer batches.

A pair's prompt is rendered with the one chat format (`geode.chat.render`, generation prompt
included) and each response is the rest of the rendered conversation, ending at the model's
`<end_of_turn>`: the same ids the engine produces when it samples a response to the prompt
(OAIF), so offline and online pairs are scored alike. A batch holds the pairs as adjacent rows
(2k chosen, 2k+1 rejected; `Batch.pair`), right-padded, with `loss_mask` on response targets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from geode.chat import render
from geode.data.loader import Batch
from geode.tokenizer import END_OF_TURN


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: the prompt (with <bos>) and the two responses."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def prompt_text(prompt: Sequence[Mapping[str, Any]]) -> str:
    """The rendered prompt, ending with the model's generation prompt."""
    return render(prompt, add_generation_prompt=True)


def response_text(
    prompt: Sequence[Mapping[str, Any]], response: Sequence[Mapping[str, Any]]
) -> str:
    """What the model writes after `prompt_text(prompt)`, up to its last `<end_of_turn>`."""
    head = prompt_text(prompt)
    full = render([*prompt, *response], add_generation_prompt=False)
    if not full.startswith(head):  # the chat format guarantees it; a guard, not a path
        raise ValueError("response does not continue the rendered prompt")
    return full[len(head) :].removesuffix("\n")


def encode_response(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Response text -> ids (a trailing `<end_of_turn>` kept as its special id)."""
    return tuple(tokenizer.encode(text))


def encode_pair(tokenizer: Any, pair: Mapping[str, Any]) -> EncodedPair:
    """A validated pair (see prefdata.validate_pair) as token ids."""
    prompt = pair["prompt"]
    return EncodedPair(
        prompt=tuple(tokenizer.encode(prompt_text(prompt))),
        chosen=encode_response(tokenizer, response_text(prompt, pair["chosen"])),
        rejected=encode_response(tokenizer, response_text(prompt, pair["rejected"])),
    )


def text_response(content: str) -> list[dict[str, str]]:
    """A sampled answer as the assistant message list of a pair."""
    return [{"role": "assistant", "content": content.removesuffix(END_OF_TURN)}]


def sequences_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    max_len: int | None = None,
    paired: bool = False,
) -> Batch:
    """(prompt ids, response ids) rows -> a right-padded Batch; loss on response targets.

    A row longer than `max_len` tokens keeps its prompt's tail and its response's head
    (the response always keeps at least one token). `paired`: rows 2k/2k+1 form pair k.
    """
    seqs, starts = [], []
    for prompt, response in rows:
        prompt, response = list(prompt), list(response)
        if not response:
            raise ValueError("a response has no tokens")
        if max_len is not None and len(prompt) + len(response) > max_len:
            response = response[: max(1, max_len - min(len(prompt), max_len // 2))]
            prompt = prompt[len(prompt) - (max_len - len(response)) :]
        seqs.append(prompt + response)
        starts.append(len(prompt))
    T1 = max(len(s) for s in seqs)  # T + 1
    B = len(seqs)
    tokens = torch.full((B, T1), pad_id, dtype=torch.long)  # (B, T+1)
    loss_mask = torch.zeros(B, T1 - 1, dtype=torch.bool)  # (B, T)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        tokens[i, : len(s)] = torch.tensor(s)
        loss_mask[i, start - 1 : len(s) - 1] = True  # targets start .. len-1 are the response
    zeros = torch.zeros(B, dtype=torch.long)
    return Batch(
        tokens=tokens,
        positions=torch.arange(T1).expand(B, T1).clone(),
        segment_ids=torch.zeros(B, T1, dtype=torch.long),
        sources=zeros,
        windows=zeros.clone(),
        loss_mask=loss_mask,
        pair=torch.arange(B) // 2 if paired else None,
    )


def pairs_batch(pairs: Sequence[EncodedPair], pad_id: int, max_len: int | None = None) -> Batch:
    """Encoded pairs -> a Batch of 2B rows: 2k chosen, 2k+1 rejected (see `sequences_batch`)."""
    rows = []
    for p in pairs:
        rows += [(p.prompt, p.chosen), (p.prompt, p.rejected)]
    return sequences_batch(rows, pad_id, max_len, paired=True)


def pair_batches(
    pairs: Sequence[EncodedPair],
    pairs_per_batch: int,
    pad_id: int,
    seed: int = 0,
    max_len: int | None = None,
) -> Callable[[], Iterator[Batch]]:
    """A maker of the endless, seeded stream of training batches (reshuffled every epoch;
    the seed sets the data order): hand it to the trainer as TrainData.batches."""
    if not pairs:
        raise ValueError("pair_batches: no pairs")
    if pairs_per_batch < 1:
        raise ValueError(f"pair_batches: pairs_per_batch must be >= 1, got {pairs_per_batch}")

    def make() -> Iterator[Batch]:
        rng = random.Random(f"geode-pair-order:{seed}")
        order: list[int] = []
        while True:
            while len(order) < pairs_per_batch:
                epoch = list(range(len(pairs)))
                rng.shuffle(epoch)
                order += epoch
            take, order = order[:pairs_per_batch], order[pairs_per_batch:]
            yield pairs_batch([pairs[i] for i in take], pad_id, max_len)

    return make


def fixed_batches(
    pairs: Sequence[EncodedPair], pairs_per_batch: int, pad_id: int, max_len: int | None = None
) -> Callable[[], Iterator[Batch]]:
    """A maker of one pass over `pairs` in order (held-out evaluation)."""

    def make() -> Iterator[Batch]:
        for i in range(0, len(pairs), pairs_per_batch):
            yield pairs_batch(pairs[i : i + pairs_per_batch], pad_id, max_len)

    return make
