"""`geode generate`: sample a continuation of a prompt with the inference engine."""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags shared by generate-like verbs (names follow the OpenAI/vLLM fields)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no eos/stop before this many")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * p_max (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; needs a tokenizer)")  # fmt: skip
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="extra stop token id (repeatable)")  # fmt: skip
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="report log-probabilities with N alternatives per token")  # fmt: skip
    add_thinking_arg(g)


def add_thinking_arg(g: argparse._ActionsContainer) -> None:
    """--thinking-budget N (generate, chat, serve)."""
    g.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="thinking tokens at most: after N tokens inside a thinking section the "
                   "engine closes it (<end_of_thinking>) and the model goes on to the answer; "
                   "0 = no thinking (default: no budget)")  # fmt: skip


def thinking_budget(args: argparse.Namespace) -> int | None:
    """The --thinking-budget value (None: none); a negative one -> CLIError."""
    from . import CLIError

    if args.thinking_budget is not None and args.thinking_budget < 0:
        raise CLIError(f"--thinking-budget must be >= 0, got {args.thinking_budget}")
    return args.thinking_budget


def sampling_params(args: argparse.Namespace):  # -> SamplingParams
    """SamplingParams from the flags of `add_sampling_args`."""
    from ..infer import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        thinking_budget=thinking_budget(args),
    )


def add_draft_args(p: argparse.ArgumentParser) -> None:
    """Speculative-decoding flags shared by generate, serve and chat (see docs/speculative.md)."""
    g = p.add_argument_group("speculative decoding (output as without a draft)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--draft", metavar="PATH",
                     help="draft model checkpoint (same tokenizer, smaller) whose proposals "
                     "the model verifies, several tokens per forward")  # fmt: skip
    src.add_argument("--draft-ngram", type=int, metavar="N",
                     help="prompt-lookup drafting: propose what followed the last N tokens "
                     "earlier in the context (no draft model)")  # fmt: skip
    g.add_argument("--num-draft-tokens", type=int, default=4, metavar="K",
                   help="tokens drafted per step, adapted between 1 and K (default 4)")  # fmt: skip


def draft_kwargs(args: argparse.Namespace) -> dict:
    """Engine keyword arguments of the --draft flags ({} without a draft); bad values -> CLIError."""
    from . import CLIError

    if args.draft is None and args.draft_ngram is None:
        return {}
    if args.num_draft_tokens < 1:
        raise CLIError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
    if args.draft_ngram is not None:
        if args.draft_ngram < 1:
            raise CLIError(f"--draft-ngram must be >= 1, got {args.draft_ngram}")
        draft = f"ngram:{args.draft_ngram}"
    else:
        from pathlib import Path

        if not (Path(args.draft).is_dir() or Path(args.draft).suffix.lower() == ".gguf"):
            raise CLIError(f"--draft {args.draft}: not a checkpoint directory or .gguf file")
        draft = args.draft
    return {"draft": draft, "num_draft_tokens": args.num_draft_tokens}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` verb."""
    p = sub.add_parser(
        "generate",
        help="generate a continuation of a prompt",
        description="Load a checkpoint (or a preset with random weights) and generate with the "
        "inference engine: batched, KV-cached, with the sampling controls of the OpenAI API. "
        "Text prompts need a tokenizer.model in the checkpoint directory (or --tokenizer); "
        "otherwise pass token ids with --ids.",
        epilog="examples:\n"
        "  geode generate out/model --prompt 'Once upon a time' --temperature 0.7 --stream\n"
        "  geode generate out/model --prompt 'Q: 2+2=' --temperature 0 --max-new-tokens 8\n"
        "  geode generate nano-5m --ids 2,651,1234 --temperature 0 --json   # random weights\n"
        "  geode generate out/model --prompt 'def f(x):' --temperature 0 --draft out/small\n"
        '  geode generate out/model --prompt "$(cat notes.txt)" --draft-ngram 3',
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout) or preset name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text (repeatable: one batch)")  # fmt: skip
    src.add_argument("--ids", action="append", metavar="I,J,...",
                     help="prompt as comma-separated token ids (repeatable)")  # fmt: skip
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model (default: in MODEL)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to text prompts")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quant", choices=["int8", "int4"], help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32/64/128)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_args(p)
    add_draft_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print."""
    import json
    import sys

    import torch

    from ..infer import Engine, Request
    from ..infer.load import load_for_inference
    from . import CLIError

    spec = draft_kwargs(args)
    model, tok = load_for_inference(
        args.model,
        args.dtype,
        args.device,
        quant=args.quant,
        group_size=args.group_size,
        tokenizer=args.tokenizer,
    )
    if args.prompt and tok is None:
        raise CLIError(
            f"{args.model} has no tokenizer.model or tokenizer.json: pass --tokenizer PATH or "
            "token ids with --ids"
        )
    params = sampling_params(args)
    if args.prompt:
        prompts: list = list(args.prompt)
    else:
        try:
            prompts = [[int(t) for t in s.replace(" ", "").split(",") if t] for s in args.ids]
        except ValueError:
            raise CLIError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    try:
        engine = Engine(model, tok, **spec)
    except ValueError as e:  # a draft that cannot draft for this model
        raise CLIError(f"--draft: {e}") from None
    reqs = [Request(p, params=params, add_bos=not args.no_bos) for p in prompts]
    with torch.inference_mode():
        if args.stream:
            if len(reqs) > 1:
                raise CLIError("--stream takes a single prompt")
            result = None
            for delta in engine.stream(reqs[0]):
                if not args.json:
                    text = (
                        delta.text if tok is not None else "".join(f" {t}" for t in delta.token_ids)
                    )
                    sys.stdout.write(text)
                    sys.stdout.flush()
                result = delta.result or result
            results = [result]
            if not args.json:
                sys.stdout.write("\n")
        else:
            results = engine.generate(reqs)
    for i, r in enumerate(results):
        if args.json:
            out = {
                "prompt_token_ids": r.prompt_token_ids,
                "token_ids": r.token_ids,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "stop_reason": r.stop_reason,
                "logprobs": r.logprobs,
                "top_logprobs": (
                    [{str(k): v for k, v in t.items()} for t in r.top_logprobs]
                    if r.top_logprobs
                    else None
                ),
                "metrics": r.metrics,
            }
            if engine.speculator is not None:
                out["speculative"] = speculative_stats(engine, r.request_id)
            print(json.dumps(out))
            continue
        if not args.stream:
            print(r.text if r.text is not None else " ".join(map(str, r.token_ids)))
        if r.logprobs is not None:
            print(format_logprobs(r, tok))
        if r.text is not None and not r.text.strip():
            where = f"prompt {i + 1}: " if len(results) > 1 else ""
            print(f"geode generate: {where}{explain_empty(r, tok)}", file=sys.stderr)
    return 0


def speculative_stats(engine, request_id: str) -> dict:
    """A request's drafting: the draft, target runs with drafts, drafted and accepted tokens."""
    st = engine.speculator.request_stats(request_id) or {}
    drafted, accepted = st.get("draft_tokens", 0), st.get("accepted_tokens", 0)
    return {
        "draft": repr(engine.speculator.drafter),
        "rounds": st.get("rounds", 0),
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
    }


def _piece(tok, token_id: int) -> str:
    """How a token reads in notes and tables: its piece (e.g. '▁the', '<eos>'), else its id."""
    if tok is None:
        return f"id {token_id}"
    try:
        if hasattr(tok, "id_to_piece"):
            return repr(tok.id_to_piece(token_id))
        return repr(tok.decode([token_id]))
    except (IndexError, ValueError, KeyError):
        return f"id {token_id} (no piece)"


def explain_empty(result, tok) -> str:
    """Why a result has no visible text: the finish reason and the token or stop that ended it."""
    ids, stop = result.token_ids, result.stop_reason
    head = f"empty result (finish_reason={result.finish_reason})"
    if result.text:
        shown = repr(result.text[:16]) + ("..." if len(result.text) > 16 else "")
        head = (
            f"only whitespace ({len(result.text)} characters: {shown}; "
            f"finish_reason={result.finish_reason})"
        )
    if isinstance(stop, int) and len(ids) == 1:
        return (
            f"{head}: the model produced {_piece(tok, stop)} (id {stop}) first; "
            "--min-new-tokens N or --ignore-eos generates past it (a random or barely "
            "trained model often ends at once; try another prompt or a sampling --seed)"
        )
    body = ids[:-1] if isinstance(stop, int) else ids
    shown = " ".join(_piece(tok, t) for t in body[:8]) + (" ..." if len(body) > 8 else "")
    if isinstance(stop, str):
        where = "after whitespace" if result.text else "at the start of the output"
        return f"{head}: the stop string {stop!r} matched {where} (generated: {shown})"
    end = f", then {_piece(tok, stop)} (id {stop})" if isinstance(stop, int) else ""
    return f"{head}: {len(body)} generated token(s) without visible text: {shown}{end}"


def format_logprobs(result, tok) -> str:
    """One line per generated token: its log-probability and the top alternatives."""
    lines = ["logprobs (token, log p, top alternatives):"]
    tops = result.top_logprobs or [None] * len(result.token_ids)
    for t, lp, top in zip(result.token_ids, result.logprobs, tops, strict=True):
        alts = "  ".join(f"{_piece(tok, k)} {v:.3f}" for k, v in (top or {}).items())
        lines.append(f"  {_piece(tok, t):<16} {lp:8.3f}" + (f"   {alts}" if alts else ""))
    return "\n".join(lines)
