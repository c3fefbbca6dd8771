"""Data tools:

    python -m data train-tokenizer --input PATH [PATH ...] --vocab-size N [--model-type bpe|unigram]
                                   --output PREFIX [--input-sentence-size LINES]

``train-tokenizer`` trains a SentencePiece model that round-trips any text (``data/tokenizer.py``)
and writes PREFIX.model. Mistakes are one ``error:`` line and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cli.args import Parser, run, subcommands
from data.tokenizer import train_sentencepiece


def build_parser() -> Parser:
    parser = Parser(prog="python -m data", description="Data tools.")
    sub = subcommands(parser)
    train = sub.add_parser("train-tokenizer", help="train a SentencePiece model on UTF-8 text files")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model")
    train.add_argument("--input-sentence-size", type=int, default=2_000_000, metavar="LINES",
                       help="train on a uniform sample of this many lines when the input has more")
    return parser


def data_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    path = train_sentencepiece(args.input, args.vocab_size, args.model_type, args.output,
                               input_sentence_size=args.input_sentence_size)
    print(f"wrote {path} ({args.vocab_size} pieces, {args.model_type})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(data_command, argv)


if __name__ == "__main__":
    sys.exit(main())
