"""``lmms-sd generate``: one answer about one's own images, with its speculative statistics.

    lmms-sd generate --model llava_msd --model-args pretrained=TARGET,draft=HEAD,tree.k=4 \\
        --image x.png --prompt "Describe the image." [--max-new-tokens N] [--temperature T]
        [--top-p P] [--top-k K] [--seed S] [--stop STR] [--baseline] [--show | --json]

``--model`` and ``--model-args`` are those of the lmms-eval classes (``lmms_sd.api.open_model``).
It prints the answer, then one line of statistics; ``--show`` colours the answer by origin
(green: accepted draft tokens; plain: the target's own tokens), with ``[brackets]`` around draft
tokens instead when colour is off (``--color never``, ``NO_COLOR`` set, or not a terminal);
``--json`` prints one JSON object (``Generation.to_dict`` plus ``model``) and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from .api import Generation, open_model
from .lmms_eval.args import split_model_args
from .methods import MODEL_NAMES

GREEN, RESET = "\033[32m", "\033[0m"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmms-sd generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=MODEL_NAMES, metavar="NAME",
                   help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--model-args", default="", help="key=value,... as for lmms-eval's --model_args")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--baseline", action="store_true",
                   help="also decode autoregressively: speedup and greedy match")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--show", action="store_true", help="colour the answer by token origin")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="auto: colour on a terminal unless NO_COLOR is set")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sd = open_model(args.model, split_model_args(args.model_args))
    out = sd.generate(args.image or None, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      stop=args.stop, seed=args.seed, baseline=args.baseline or None)
    if args.json:
        print(json.dumps({"model": args.model, **out.to_dict()}))
        return 0
    if args.show:
        colour = use_colour(args.color, sys.stdout)
        print(show(out, sd.target.decode, colour))
        print("(green: accepted draft tokens; plain: target tokens)" if colour else
              "([...]: accepted draft tokens; the rest: target tokens)")
    else:
        print(out.text)
    print(summary(out))
    return 0


def use_colour(choice: str, stream: TextIO) -> bool:
    """``always``, ``never``, or ``auto``: on a terminal unless ``NO_COLOR`` is set and not
    empty (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def show(out: Generation, decode: Callable[[list[int]], str], colour: bool) -> str:
    """The answer with each run of accepted draft tokens marked (ANSI green or brackets)."""
    open_, close = (GREEN, RESET) if colour else ("[", "]")
    text, previous = "", "target"
    for piece, origin in zip(token_pieces(out.tokens, out.text, decode), out.origin):
        if origin != previous:
            text += open_ if origin == "draft" else close
        text, previous = text + piece, origin
    return text + (close if previous == "draft" else "")


def token_pieces(tokens: list[int], text: str, decode: Callable[[list[int]], str]) -> list[str]:
    """Per token the part of ``text`` it adds, from the decodes of growing prefixes (cut where
    ``text`` ends: a stop string's tokens add nothing)."""
    ends, end = [], 0
    for i in range(1, len(tokens) + 1):
        end = max(end, min(len(decode(tokens[:i])), len(text)))
        ends.append(end)
    if ends:
        ends[-1] = len(text)
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def summary(out: Generation) -> str:
    s = out.stats
    line = (f"{s.new_tokens} tokens in {s.wall_time:.3f} s ({out.tokens_per_second:.1f} tokens/s)"
            f", {s.decode_steps} target steps, tau {out.tau:.2f}, acceptance "
            f"{out.acceptance_rate:.2f}, {out.origin.count('draft')} draft tokens")
    if out.speedup is not None:
        line += (f"; autoregressive {out.baseline.stats.tokens_per_second:.1f} tokens/s, "
                 f"speedup {out.speedup:.2f}x")
    if out.greedy_match is not None:
        line += f", greedy output identical: {'yes' if out.greedy_match else 'NO'}"
    return line
