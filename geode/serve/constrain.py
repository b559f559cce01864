"""Constrained decoding with llguidance: JSON schemas and forced tool calls as logits processors.

llguidance (https://github.com/guidance-ai/llguidance) compiles a JSON schema or a Lark grammar
into a matcher that, given the tokens generated so far, returns the set of tokens that keep the
output a valid prefix of the language. `GrammarProcessor` is an engine logits processor
(`(generated ids, logits (V,)) -> logits`): it feeds the matcher the newly sampled tokens and
sets every disallowed logit to -inf. Once the grammar is complete only end-of-sequence tokens
are allowed, so the engine stops with finish reason "stop".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

# Compact JSON (no free whitespace): a random or weak model cannot pad forever with spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}
# Characters of a forced tool call's string argument whose schema sets no bound of its own.
TOOL_STRING_MAX = 256
# Schema keywords whose values are schemas, or maps / lists of schemas.
_SUBSCHEMA = ("items", "additionalProperties", "then", "else", "contains")  # not `not`, `if`
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def close_schema(schema: Any, max_string: int = TOOL_STRING_MAX) -> Any:
    """A copy of a tool's parameter schema as a forced call follows it, so that it always ends.

    As OpenAI's strict mode does, an object schema that does not set `additionalProperties`
    gets `false` (only its declared properties; otherwise a model may invent keys forever); a
    string schema with no `maxLength`, `enum`, `const` or `pattern` gets `maxLength:
    max_string`. Everything the schema states itself is kept.
    """
    if isinstance(schema, list):
        return [close_schema(s, max_string) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = close_schema(out[key], max_string)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_schema(v, max_string) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = close_schema(out[key], max_string)
    kinds = out.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if ("object" in kinds or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "string" in kinds and not any(k in out for k in ("maxLength", "enum", "const", "pattern")):
        out["maxLength"] = max_string
    return out


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile (the message says why)."""


class _TokenizerView:
    """What llguidance's TokenizerWrapper needs from a geode Tokenizer."""

    def __init__(self, tokenizer: Any, eos_id: int):
        self._tok = tokenizer
        self.eos_token_id = eos_id
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self.tokens = [bytes(b) for b in tokenizer._bytes]  # exact bytes per id
        specials = set(getattr(tokenizer, "special_ids", {}).values())
        specials |= {i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)}
        self.special_token_ids = sorted(specials)

    def __call__(self, text: str) -> list[int]:
        return list(self._tok.encode(text))


class Grammars:
    """Compiles grammars for one tokenizer; `processor(...)` makes a per-request processor."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]):
        import llguidance

        self._llg = llguidance
        eos = sorted(int(i) for i in eos_token_ids)
        view = _TokenizerView(tokenizer, eos[0])
        self.tokenizer = tokenizer
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), eos_token=eos)

    def json_schema(self, schema: dict[str, Any] | None) -> str:
        """The grammar of JSON matching `schema` (None: any JSON object)."""
        schema = {"type": "object"} if schema is None else schema
        try:
            return self._llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None

    def tool_call(self, tools: Sequence[dict[str, Any]]) -> str:
        """The grammar of exactly one tool call to one of `tools` (OpenAI function dicts), their
        parameter schemas closed and bounded by `close_schema`."""
        specials = self.tokenizer.special_ids
        try:
            start, end = specials["<start_of_tool_call>"], specials["<end_of_tool_call>"]
        except KeyError as e:
            raise GrammarError(f"the tokenizer has no {e.args[0]} token") from None
        options = []
        for fn in tools:
            params = close_schema(fn.get("parameters") or {"type": "object"})
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": fn["name"]}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        schema = {"x-guidance": _JSON_OPTIONS, **schema}
        lark = f"start: <[{start}]> call <[{end}]>\ncall: %json {json.dumps(schema)}\n"
        return self._llg.LLMatcher.grammar_from_lark(lark)

    def check(self, grammar: str) -> None:
        """Raise GrammarError if the grammar does not compile."""
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")

    def processor(self, grammar: str) -> GrammarProcessor:
        """A fresh logits processor enforcing `grammar` (one per sequence)."""
        matcher = self._llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarProcessor(matcher, self.lltok.vocab_size)


class GrammarProcessor:
    """An engine logits processor that masks tokens the grammar does not allow next."""

    def __init__(self, matcher: Any, tok_vocab: int):
        self.matcher = matcher
        self.consumed = 0
        self.tok_vocab = tok_vocab
        self.failed = False

    def _mask(self, width: int) -> torch.Tensor:
        """Allowed next ids as a bool mask (width,): ids past the tokenizer are never allowed."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.tok_vocab].astype(bool)
        mask = torch.zeros(width, dtype=torch.bool)
        n = min(self.tok_vocab, width)
        mask[:n] = torch.from_numpy(allowed[:n])
        return mask

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Consume the tokens sampled since the last call; -inf on every disallowed logit."""
        for t in generated[self.consumed :]:
            if not self.matcher.consume_token(int(t)):
                self.failed = True
        self.consumed = len(generated)
        if self.failed or self.matcher.is_error():
            return logits  # cannot happen when every token was drawn from our mask
        mask = self._mask(logits.shape[-1]).to(logits.device)
        if not bool(mask.any()):
            return logits
        return logits.masked_fill(~mask, float("-inf"))
