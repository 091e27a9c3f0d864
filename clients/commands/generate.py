"""`headwise generate`: run prompts through the engine together (batched)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headwise.clients.cli import CliError
from headwise.clients.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text for one prompt or a JSON-lines file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--prompts", type=Path, help='JSON lines: {"prompt": "..."} or {"messages": [...]}, optional "plan"'
    )
    p.add_argument("--chat", action="store_true", help="apply the chat template to --prompt / prompt lines")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line, in input order")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", type=Path, help="a JSON schema file every output must match")
    shape.add_argument("--regex", help="a regular expression every output must match")
    add_engine_args(p)
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if not args.prompts.is_file():
        raise CliError(f"--prompts {args.prompts}: no such file")
    items = []
    for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{args.prompts}:{n}: not JSON ({e.msg})") from e
        if not isinstance(item, dict) or not (
            isinstance(item.get("prompt"), str) or isinstance(item.get("messages"), list)
        ):
            raise CliError(f'{args.prompts}:{n}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        items.append(item)
    if not items:
        raise CliError(f"{args.prompts}: no prompts")
    return items


def read_grammar(args: argparse.Namespace):
    """The GrammarSpec of --json-schema / --regex, or None; a bad schema is a CliError."""
    from headwise.engine.grammar_spec import GrammarSpec, json_schema_spec
    from headwise.engine.sampling_params import InvalidRequest

    if args.regex is not None:
        return GrammarSpec("regex", args.regex, "--regex")
    if args.json_schema is None:
        return None
    if not args.json_schema.is_file():
        raise CliError(f"--json-schema {args.json_schema}: no such file")
    try:
        return json_schema_spec(json.loads(args.json_schema.read_text()), "--json-schema")
    except json.JSONDecodeError as e:
        raise CliError(f"--json-schema {args.json_schema}: not JSON ({e.msg})") from e
    except InvalidRequest as e:
        raise CliError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    from headwise.engine.llm_engine import LLMEngine
    from headwise.engine.sampling_params import InvalidRequest, SamplingParams

    items = read_prompts(args)
    grammar = read_grammar(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        grammar=grammar,
    )
    engine = LLMEngine(engine_config_from_args(args))
    if grammar is not None:
        try:  # compiled before any prompt runs: a grammar that does not compile is one error line
            engine.grammars.compile(grammar).result()
        except InvalidRequest as e:
            raise CliError(str(e)) from e
    prompts = []
    for item in items:
        if "messages" in item:
            prompts.append(engine.encode_chat(item["messages"]))
        elif args.chat:
            prompts.append(engine.encode_chat([{"role": "user", "content": item["prompt"]}]))
        else:
            prompts.append(engine.tokenizer(item["prompt"])["input_ids"])
    outs = engine.generate(
        prompts, params, [item.get("plan") for item in items], use_tqdm=not args.json and len(items) > 1
    )
    for out in outs:
        if args.json:
            print(
                json.dumps(
                    {
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": len(out.token_ids),
                        "finish_reason": out.finish_reason,
                        "kv_bytes": out.kv_bytes,
                        "kv_bytes_decode": out.kv_bytes_decode,
                        "cached_tokens": out.num_cached_tokens,
                    }
                )
            )
        else:
            print(out.text)
            if len(outs) > 1:
                print("-" * 40)
    sys.stdout.flush()
    return 0
