"""Tokenizers: Gemma-style SentencePiece training, loading, special tokens, streaming decode.

A `Tokenizer` reads a vocabulary through one of two backends: a `sentencepiece` model
(`tokenizer.model`, the file Gemma checkpoints ship) or a Hugging Face `tokenizer.json` of the
same family (SentencePiece-style: `▁` for spaces, `<0xNN>` byte fallback), read with the
`tokenizers` library, for checkpoints that ship only that file. Encoding matches the Hugging
Face Gemma tokenizer built from the same file: special token strings in the text
(`<start_of_turn>`, `<bos>`, ...) become their single ids; the rest goes through the backend
unchanged. Decoding is geode's own, the same for both backends: every id renders as its bytes
(`▁` -> space, byte-fallback pieces `<0xNN>` -> raw bytes, special pieces -> their text) and
the bytes are read as UTF-8, each invalid byte becoming U+FFFD exactly as SentencePiece does;
`StreamDecoder` does the same one token at a time, so its deltas always add up to `decode`.
See docs/tokenizer.md.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece as spm

from .fileio import atomic_write_bytes

MODEL_FILENAME = "tokenizer.model"
JSON_FILENAME = "tokenizer.json"
JSON_CONFIG_FILENAME = "tokenizer_config.json"  # names of <bos>/<eos>/<pad> beside a tokenizer.json

# Gemma's reserved pieces and ids (a trained geode tokenizer uses the same layout).
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# Gemma 3 turn and image tokens.
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
# Gemma3Config.image_token_index: the id of <image_soft_token>, one past tokenizer.model's
# 262,144 pieces (HF's tokenizer.json adds it as token 262144).
IMAGE_TOKEN_INDEX = 262144
# geode's thinking and tool tokens (Gemma 3 has none; see docs/tokenizer.md).
START_OF_THINKING, END_OF_THINKING = "<start_of_thinking>", "<end_of_thinking>"
START_OF_TOOLS, END_OF_TOOLS = "<start_of_tools>", "<end_of_tools>"
START_OF_TOOL_CALL, END_OF_TOOL_CALL = "<start_of_tool_call>", "<end_of_tool_call>"
START_OF_TOOL_RESPONSE, END_OF_TOOL_RESPONSE = "<start_of_tool_response>", "<end_of_tool_response>"

# The names `Tokenizer.special_ids` reports (those present in the vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    PAD,
    START_OF_TURN,
    END_OF_TURN,
    START_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_SOFT_TOKEN,
    START_OF_THINKING,
    END_OF_THINKING,
    START_OF_TOOLS,
    END_OF_TOOLS,
    START_OF_TOOL_CALL,
    END_OF_TOOL_CALL,
    START_OF_TOOL_RESPONSE,
    END_OF_TOOL_RESPONSE,
)
# User-defined pieces `train_tokenizer` adds by default, in id order after <unk>
# (`<mask>` and `[multimodal]` take ids 4 and 5 as in Gemma).
DEFAULT_USER_SYMBOLS: tuple[str, ...] = ("<mask>", "[multimodal]") + SPECIAL_TOKENS[3:]

# What a backend says each id is: decoding and `skip_special` follow from it.
NORMAL, CONTROL, UNKNOWN, BYTE = 0, 1, 2, 3

_ERRORS = "geode.sentencepiece_replace"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _replace_each_byte(err: UnicodeError) -> tuple[str, int]:
    """Replace one invalid byte with U+FFFD and resume after it (SentencePiece's behaviour)."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "\ufffd", err.start + 1


codecs.register_error(_ERRORS, _replace_each_byte)


# ---- backends -------------------------------------------------------------------------------
# A backend gives `Tokenizer` the vocabulary (pieces, kinds, reserved ids), encodes plain text
# and serializes itself; everything else (special tokens, decoding, streaming) is `Tokenizer`'s.


class SentencePieceVocab:
    """Backend over a SentencePiece model (`tokenizer.model`)."""

    filename = MODEL_FILENAME
    # SentencePiece matches user-defined pieces in text itself, control pieces and <unk> not:
    # `Tokenizer` splits those out of the text first, as HF's Gemma tokenizer does.
    matches_control_text = False

    def __init__(self, proto: bytes, where: str = "<bytes>") -> None:
        """Load serialized model bytes; `where` names the file in errors."""
        if not proto:
            raise ValueError(f"{where}: empty file, not a SentencePiece model")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{where}: not a valid SentencePiece model ({e})") from e
        sp = self._sp
        self.size: int = sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        self.unk_id: int = sp.unk_id()
        self.pieces: list[str] = [sp.id_to_piece(i) for i in range(self.size)]
        self.kinds: list[int] = [
            CONTROL
            if sp.IsControl(i)
            else UNKNOWN
            if sp.IsUnknown(i)
            else BYTE
            if sp.IsByte(i)
            else NORMAL
            for i in range(self.size)
        ]

    def piece_id(self, piece: str) -> int | None:
        """Id of a piece, None if absent."""
        i = self._sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.pieces[i] else i

    @cached_property
    def strips_leading_space(self) -> bool:
        """Whether SentencePiece drops the first piece's leading space (dummy prefix, Llama-style)."""
        for i, piece in enumerate(self.pieces):
            if piece.startswith("\u2581") and self.kinds[i] in (NORMAL, UNKNOWN):
                return self._sp.decode([i]) != piece.replace("\u2581", " ")
        return False

    def encode(self, text: str) -> list[int]:
        """Ids of plain text."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """Ids of each plain text (SentencePiece's multithreaded batch encoder)."""
        return self._sp.encode(texts, num_threads=num_threads)

    def serialized(self) -> bytes:
        """The model file's bytes."""
        return self._sp.serialized_model_proto()

    def state(self) -> dict[str, Any]:
        """What pickling needs besides `serialized()`."""
        return {}


def _json_tokens(node: Any) -> Iterator[dict[str, Any]]:
    """Every component dict in a tokenizer.json section (through `Sequence` nesting)."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "decoders", "processors"):
            for child in node.get(key) or ():
                yield from _json_tokens(child)


def _json_strips_leading_space(spec: dict[str, Any], where: str) -> bool:
    """Check the decoder is SentencePiece-style (so geode's byte rule is exact); say if it strips
    the first leading space (Llama's `Strip`, `Metaspace` with a prepended `▁`)."""
    strips = False
    for d in _json_tokens(spec.get("decoder")):
        kind = d.get("type")
        if kind in ("Sequence", "ByteFallback", "Fuse"):
            continue
        if (
            kind == "Replace"
            and d.get("pattern") == {"String": "\u2581"}
            and d.get("content") == " "
        ):
            continue
        if (
            kind == "Strip"
            and d.get("content") == " "
            and d.get("stop") == 0
            and d.get("start") in (0, 1)
        ):
            strips = strips or d["start"] == 1
            continue
        if kind == "Metaspace" and d.get("replacement") == "\u2581":
            strips = strips or d.get("prepend_scheme", "always") != "never"
            continue
        raise ValueError(
            f"{where}: decoder {kind} ({json.dumps(d)[:120]}) is not supported: geode reads "
            "SentencePiece-style tokenizers whose decoder only maps '\u2581' to a space and "
            "<0xNN> pieces to bytes (Replace, ByteFallback, Fuse, Strip, Metaspace)"
        )
    return strips


def _check_json_family(spec: Any, where: str) -> None:
    """A clear error for a tokenizer.json geode cannot read exactly (another model family)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError(f"{where}: no 'model' object; not a Hugging Face tokenizer.json")
    for section in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        for comp in _json_tokens(spec.get(section)):
            if comp.get("type") == "ByteLevel":
                raise ValueError(
                    f"{where}: {section} type ByteLevel: a byte-level BPE (GPT-2 family) is not "
                    "supported; geode reads SentencePiece-style tokenizers (Gemma, Llama: "
                    "'\u2581' for spaces, <0xNN> byte-fallback pieces)"
                )
    kind = spec["model"].get("type")
    if kind not in ("BPE", "Unigram"):
        raise ValueError(
            f"{where}: model.type {kind!r} is not supported; geode reads SentencePiece-style "
            "BPE or Unigram tokenizers (Gemma, Llama)"
        )


class TokenizerJsonVocab:
    """Backend over a Hugging Face `tokenizer.json` of the SentencePiece family, encoded by the
    `tokenizers` library. Added tokens marked `special` count as control pieces."""

    filename = JSON_FILENAME
    # The `tokenizers` library matches every added token in text itself.
    matches_control_text = True

    def __init__(
        self, text: str, where: str = "<tokenizer.json>", names: dict[str, str] | None = None
    ) -> None:
        """Load tokenizer.json text; `names` maps bos/eos/pad to pieces (default Gemma's)."""
        import tokenizers

        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        _check_json_family(spec, where)
        self.strips_leading_space = _json_strips_leading_space(spec, where)
        try:
            self._tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library raises plain Exception on malformed specs
            raise ValueError(f"{where}: the tokenizers library cannot read it ({e})") from None
        self._text = text
        self.names = {"bos": BOS, "eos": EOS, "pad": PAD, **(names or {})}
        tk = self._tk
        self.size = tk.get_vocab_size(with_added_tokens=True)
        pieces = [tk.id_to_token(i) for i in range(self.size)]
        if None in pieces:
            raise ValueError(f"{where}: token id {pieces.index(None)} has no piece (ids have gaps)")
        self.pieces: list[str] = pieces  # type: ignore[assignment]
        model = spec["model"]
        unk = model.get("unk_token") if model["type"] == "BPE" else model.get("unk_id")
        self.unk_id = (
            tk.token_to_id(unk) if isinstance(unk, str) else unk if unk is not None else -1
        )
        added = {a["id"]: a for a in spec.get("added_tokens") or ()}
        byte_fallback = bool(model.get("byte_fallback"))
        self.kinds: list[int] = []
        for i, piece in enumerate(self.pieces):
            if i in added:
                kind = CONTROL if added[i].get("special") else NORMAL
            elif byte_fallback and _BYTE_PIECE.fullmatch(piece):
                kind = BYTE
            else:
                kind = NORMAL
            self.kinds.append(UNKNOWN if i == self.unk_id else kind)
        ids = [self.piece_id(self.names[k]) for k in ("bos", "eos", "pad")]
        self.bos_id, self.eos_id, self.pad_id = (-1 if i is None else i for i in ids)

    def piece_id(self, piece: str) -> int | None:
        """Id of a piece, None if absent."""
        return self._tk.token_to_id(piece)

    def encode(self, text: str) -> list[int]:
        """Ids of text (added tokens in it become their ids; no <bos> added)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """Ids of each text (the library's batch encoder; threads from RAYON_NUM_THREADS)."""
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def serialized(self) -> bytes:
        """The tokenizer.json bytes."""
        return self._text.encode("utf-8")

    def state(self) -> dict[str, Any]:
        """What pickling needs besides `serialized()`."""
        return {"names": self.names}


def _json_names(config: Path) -> dict[str, str]:
    """bos/eos/pad piece names from a tokenizer_config.json (missing file or keys: none)."""
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: cannot read it as JSON ({e})") from None
    out = {}
    for key in ("bos", "eos", "pad"):
        value = data.get(f"{key}_token") if isinstance(data, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


Backend = SentencePieceVocab | TokenizerJsonVocab


def _open_backend(path: Path) -> Backend:
    """The backend for a tokenizer file: `.json` -> tokenizer.json, else SentencePiece."""
    data = _read_model_file(path)
    if path.suffix == ".json":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        return TokenizerJsonVocab(
            text, str(path), _json_names(path.with_name(JSON_CONFIG_FILENAME))
        )
    return SentencePieceVocab(data, str(path))


class Tokenizer:
    """A vocabulary (SentencePiece model or tokenizer.json) with Gemma's special-token handling
    and exact byte-level decoding."""

    def __init__(
        self, model: str | os.PathLike[str] | bytes | Backend, num_threads: int = -1
    ) -> None:
        """Load from a `.model` / `tokenizer.json` path, SentencePiece model bytes, or a backend."""
        self.path: Path | None = None
        if isinstance(model, bytes):
            self._vocab: Backend = SentencePieceVocab(model)
        elif isinstance(model, SentencePieceVocab | TokenizerJsonVocab):
            self._vocab = model
        else:
            self.path = Path(model)
            self._vocab = _open_backend(self.path)
        self.num_threads = num_threads
        self._init_tables()

    def _init_tables(self) -> None:
        v = self._vocab
        # Pieces the backend does not match in text by itself but HF does: control pieces
        # (<bos>, <eos>, <pad>, ...) and <unk>.
        self._text_specials: dict[str, int] = {}
        if not v.matches_control_text:
            for i, kind in enumerate(v.kinds):
                if kind in (CONTROL, UNKNOWN):
                    self._text_specials.setdefault(v.pieces[i], i)
        self._split_re = (
            re.compile(
                "|".join(re.escape(p) for p in sorted(self._text_specials, key=len, reverse=True))
            )
            if self._text_specials
            else None
        )
        special: dict[str, int] = {}
        for name, fixed in ((BOS, v.bos_id), (EOS, v.eos_id), (PAD, v.pad_id)):
            if fixed >= 0:
                special[name] = fixed
        for name in SPECIAL_TOKENS:
            if name not in special and (i := v.piece_id(name)) is not None:
                special[name] = i
        self._special_ids = special

    # ---- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are 0 .. vocab_size-1)."""
        return self._vocab.size

    def __len__(self) -> int:
        """Same as `vocab_size`."""
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        """Id of `<bos>` (-1 if the model has none)."""
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int:
        """Id of `<eos>` (-1 if the model has none)."""
        return self._vocab.eos_id

    @property
    def pad_id(self) -> int:
        """Id of `<pad>` (-1 if the model has none)."""
        return self._vocab.pad_id

    @property
    def unk_id(self) -> int:
        """Id of `<unk>` (-1 if the model has none)."""
        return self._vocab.unk_id

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the `SPECIAL_TOKENS` this vocabulary has; absent tokens are not listed."""
        return dict(self._special_ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of an id (e.g. `▁the`, `<0x0A>`, `<start_of_turn>`)."""
        self._check_ids([token_id])
        return self._vocab.pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece, or None if the vocabulary has no such piece."""
        return self._vocab.piece_id(piece)

    def is_special(self, token_id: int) -> bool:
        """True for control pieces, `<unk>`, and the ids in `special_ids`."""
        return self._skip[token_id]

    # ---- encoding ---------------------------------------------------------------------------

    def _segments(self, text: str) -> list[str | int]:
        """Split text at special-token strings: plain text segments and special ids."""
        if self._split_re is None:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self._text_specials[m.group()])
            pos = m.end()
        if pos < len(text) or not out:
            out.append(text[pos:])
        return out

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id < 0:
                raise ValueError(f"add_bos=True but tokenizer {self.path} has no <bos> piece")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id < 0:
                raise ValueError(f"add_eos=True but tokenizer {self.path} has no <eos> piece")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for seg in self._segments(text):
            if isinstance(seg, int):
                ids.append(seg)
            elif seg:
                ids.extend(self._vocab.encode(seg))
        return self._wrap(ids, add_bos, add_eos)

    def image_token_id(self, image_token_index: int | None = None) -> int:
        """The id `<image_soft_token>` encodes to: the config's `image_token_index` (default:
        the vocabulary's piece, else Gemma 3's 262144); an error if the vocabulary gives the
        piece another id."""
        own = self._vocab.piece_id(IMAGE_SOFT_TOKEN)
        if image_token_index is None:
            return IMAGE_TOKEN_INDEX if own is None else own
        if own is not None and own != image_token_index:
            raise ValueError(
                f"image_token_index {image_token_index} differs from the tokenizer's "
                f"{IMAGE_SOFT_TOKEN} id {own} ({self.path or 'tokenizer'})"
            )
        return image_token_index

    def encode_with_images(
        self,
        parts: Sequence[str | int],
        add_bos: bool = False,
        add_eos: bool = False,
        *,
        image_token_index: int | None = None,
    ) -> list[int]:
        """Token ids of a prompt given as text pieces and image soft-token counts (from
        `geode.image.image_parts` / `geode.chat.render_multimodal`): an int n becomes n x the
        image id (`image_token_id`), where tokenizing n x `<image_soft_token>` would give 7
        pieces each with `tokenizer.model`. Text pieces are encoded as `encode` does; one that
        yields the image id itself (text typed with `<image_soft_token>` in it, under a
        tokenizer.json that has the token) is an error: only images make soft tokens."""
        image_id = self.image_token_id(image_token_index)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if isinstance(part, str):
                piece = self.encode(part)
                if image_id in piece:
                    raise ValueError(
                        f"prompt text piece {k} holds {IMAGE_SOFT_TOKEN} (id {image_id}) typed "
                        "as text; only image parts may produce image soft tokens"
                    )
                ids += piece
            elif isinstance(part, int) and not isinstance(part, bool) and part > 0:
                ids += [image_id] * part
            else:
                raise ValueError(
                    f"prompt part {k}: expected text or a positive count, got {part!r}"
                )
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` of each text, using the backend's multithreaded batch encoder."""
        split = [self._segments(t) for t in texts]
        plain = [seg for segs in split for seg in segs if isinstance(seg, str) and seg]
        encoded = iter(self._vocab.encode_batch(plain, self.num_threads) if plain else [])
        out = []
        for segs in split:
            ids: list[int] = []
            for seg in segs:
                if isinstance(seg, int):
                    ids.append(seg)
                elif seg:
                    ids.extend(next(encoded))
            out.append(self._wrap(ids, add_bos, add_eos))
        return out

    # ---- decoding ---------------------------------------------------------------------------

    @cached_property
    def _bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id decodes to (special pieces as their text)."""
        table = []
        for piece, kind in zip(self._vocab.pieces, self._vocab.kinds):
            if kind == BYTE and (m := _BYTE_PIECE.fullmatch(piece)):
                table.append(bytes([int(m.group(1), 16)]))
            elif kind in (CONTROL, UNKNOWN):
                table.append(piece.encode("utf-8"))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    @cached_property
    def _skip(self) -> list[bool]:
        """Per id: dropped by `decode(..., skip_special=True)`."""
        skip = [kind in (CONTROL, UNKNOWN) for kind in self._vocab.kinds]
        for i in self._special_ids.values():
            skip[i] = True
        return skip

    @cached_property
    def _bytes_skip(self) -> list[bytes]:
        return [b"" if s else b for b, s in zip(self._bytes, self._skip)]

    @property
    def _strips_leading_space(self) -> bool:
        """Whether decoding drops the leading space of the first piece.

        True for models with a dummy prefix or whitespace normalisation (Llama-style);
        False for Gemma-style models, whose decoding keeps every space.
        """
        return self._vocab.strips_leading_space

    def _leading_space_id(self, token_id: int) -> bool:
        """True if this id is a piece whose leading space decoding strips at the start."""
        return (
            self._strips_leading_space
            and self._bytes[token_id][:1] == b" "
            and self._vocab.kinds[token_id] == NORMAL
        )

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(f"token id {bad} out of range for vocabulary size {self.vocab_size}")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of token ids; `skip_special` drops control, `<unk>` and `special_ids` tokens."""
        ids = _as_list(ids)
        self._check_ids(ids)
        table = self._bytes_skip if skip_special else self._bytes
        data = b"".join([table[i] for i in ids])
        if self._strips_leading_space:
            first = next((i for i in ids if table[i]), None)
            if first is not None and self._leading_space_id(first):
                data = data[1:]
        return data.decode("utf-8", _ERRORS)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special: bool = False) -> list[str]:
        """`decode` of each id sequence."""
        return [self.decode(ids, skip_special) for ids in batch]

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for one sequence (see `StreamDecoder`)."""
        return StreamDecoder(self, skip_special)

    # ---- persistence ------------------------------------------------------------------------

    @property
    def filename(self) -> str:
        """The file name this kind of tokenizer has in a checkpoint (`tokenizer.model` / `.json`)."""
        return self._vocab.filename

    def serialized_model(self) -> bytes:
        """The tokenizer file's bytes (SentencePiece model, or tokenizer.json text)."""
        return self._vocab.serialized()

    def save(self, dir_or_path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer file (into `dir/<filename>` for a directory); returns the path."""
        path = Path(dir_or_path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / self.filename
        atomic_write_bytes(path, self.serialized_model())
        return path

    def __getstate__(self) -> dict[str, Any]:
        return {
            "proto": self.serialized_model(),
            "json": isinstance(self._vocab, TokenizerJsonVocab),
            "state": self._vocab.state(),
            "path": self.path,
            "threads": self.num_threads,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        where = str(state["path"] or "<pickled>")
        vocab: Backend = (
            TokenizerJsonVocab(state["proto"].decode("utf-8"), where, **state["state"])
            if state.get("json")
            else SentencePieceVocab(state["proto"], where)
        )
        self.__init__(vocab, state["threads"])  # type: ignore[misc]
        self.path = state["path"]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path) if self.path else '<bytes>'!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text deltas.

    Guarantee: `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)` exactly, for
    any id sequence. A delta never contains part of a character: bytes of a multi-byte
    character split over byte-fallback pieces are held until the character is complete (or
    known invalid, then it becomes U+FFFD as in `decode`). Spaces are kept as `decode` keeps them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        """Start decoding a new sequence with `tokenizer`."""
        self._tok = tokenizer
        self._table = tokenizer._bytes_skip if skip_special else tokenizer._bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_ERRORS)
        self._at_start = tokenizer._strips_leading_space
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly completed text (possibly empty)."""
        return self.extend([token_id])

    def extend(self, ids: Iterable[int]) -> str:
        """Add several ids; returns the newly completed text (possibly empty)."""
        ids = _as_list(ids)
        self._tok._check_ids(ids)
        self.ids.extend(ids)
        data = b"".join([self._table[i] for i in ids])
        if self._at_start and data:
            first = next(i for i in ids if self._table[i])
            if self._tok._leading_space_id(first):
                data = data[1:]
            self._at_start = False
        delta = self._utf8.decode(data)
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of sequence: returns held bytes (an incomplete character becomes U+FFFD)."""
        delta = self._utf8.decode(b"", final=True)
        self.text += delta
        return delta


def _as_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


def _read_model_file(path: Path) -> bytes:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; use load_tokenizer() for checkpoint dirs")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer model file not found: {path}") from None
    except OSError as e:
        raise OSError(f"cannot read tokenizer model {path}: {e.strerror or e}") from e


def find_tokenizer(path: str | os.PathLike[str]) -> Path | None:
    """The file `load_tokenizer(path)` reads: in a directory its `tokenizer.model`, else its
    `tokenizer.json`; a file itself; None when there is none."""
    p = Path(path)
    if p.is_dir():
        return next((p / n for n in (MODEL_FILENAME, JSON_FILENAME) if (p / n).is_file()), None)
    return p if p.exists() else None


def load_tokenizer(path: str | os.PathLike[str], num_threads: int = -1) -> Tokenizer:
    """Load a `tokenizer.model` / `tokenizer.json` file, or the one in a checkpoint directory
    (`tokenizer.model` preferred), or the tokenizer in a .gguf file's metadata."""
    p = Path(path)
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(p, num_threads=num_threads)
    found = find_tokenizer(p)
    if found is None and p.is_dir():
        raise FileNotFoundError(
            f"no {MODEL_FILENAME} in checkpoint directory {p} (and no {JSON_FILENAME})"
        )
    if found is None:
        raise FileNotFoundError(
            f"tokenizer not found: {p} (expected a {MODEL_FILENAME} or {JSON_FILENAME} file or a dir)"
        )
    return Tokenizer(found, num_threads=num_threads)


# ---- training -------------------------------------------------------------------------------


def _chunks(text: str, max_bytes: int) -> Iterator[str]:
    """Split a document into training 'sentences' of whole lines (newlines kept), <= max_bytes."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if buf and size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:  # a single overlong line: cut it by characters
            cut = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            yield cut
            line = line[len(cut) :]
            n = len(line.encode("utf-8"))
        if line:
            buf.append(line)
            size += n
    if buf:
        yield "".join(buf)


def _read_training_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"training file not found: {path}") from None
    except OSError as e:
        raise OSError(f"cannot read training file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"training file {path} is not UTF-8 (byte {e.start})") from e


def train_tokenizer(
    files: Iterable[str | os.PathLike[str]] = (),
    texts: Iterable[str] = (),
    *,
    vocab_size: int,
    out: str | os.PathLike[str],
    model_type: str = "bpe",
    user_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
    extra_symbols: Sequence[str] = (),
    reserved_tokens: int = 0,
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = 2048,
    max_input_bytes: int = 0,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
    **spm_options: Any,
) -> Tokenizer:
    """Train a Gemma-style SentencePiece model on text files and/or strings; write it to `out`.

    Gemma's options: BPE, byte fallback, digits split, whitespace kept as is (identity
    normalisation, no dummy prefix, whitespace-only pieces allowed), ids pad=0 eos=1 bos=2
    unk=3, then `user_symbols` + `extra_symbols` + `<unused0..N-1>` as user-defined pieces.
    `out` is a file path or a directory (gets `tokenizer.model`). Documents are cut into
    training sentences of whole lines up to `max_sentence_bytes`; `max_input_bytes` caps the
    input read (0: no cap). `spm_options` pass through to `SentencePieceTrainer`.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if max_sentence_bytes < 64:
        raise ValueError(f"max_sentence_bytes must be at least 64, got {max_sentence_bytes}")
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"training file not found: {f}")
    symbols = list(dict.fromkeys([*user_symbols, *extra_symbols]))
    symbols += [f"<unused{i}>" for i in range(reserved_tokens)]
    for s in symbols:
        if not s or s in (PAD, EOS, BOS, UNK):
            raise ValueError(f"invalid user symbol {s!r}: empty or a reserved piece")

    def documents() -> Iterator[str]:
        for f in files:
            yield _read_training_file(f)
        yield from texts

    def sentences() -> Iterator[str]:
        total = 0
        for doc in documents():
            if not isinstance(doc, str):
                raise TypeError(f"training texts must be str, got {type(doc).__name__}")
            for chunk in _chunks(doc, max_sentence_bytes):
                if not chunk.strip():
                    continue
                yield chunk
                total += len(chunk.encode("utf-8"))
                if max_input_bytes and total >= max_input_bytes:
                    return

    stream = sentences()
    first = next(stream, None)
    if first is None:
        where = ", ".join(map(str, files)) or "no files"
        raise ValueError(f"no training text: the inputs ({where}; plus given texts) are empty")

    options: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece=PAD,
        eos_piece=EOS,
        bos_piece=BOS,
        unk_piece=UNK,
        user_defined_symbols=symbols,
        character_coverage=character_coverage,
        max_sentence_length=max(4 * max_sentence_bytes, 4192),
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    options.update(spm_options)
    model = _BytesSink()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], stream), model_writer=model, **options
        )
    except RuntimeError as e:
        why = str(e).split("] ", 1)[-1]  # drop SentencePiece's source location
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {why}") from e
    tok = Tokenizer(model.getvalue())
    tok.path = tok.save(out)
    return tok


class _BytesSink:
    """The `model_writer` SentencePiece writes the trained model into."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
