"""``clex generate`` and ``clex chat``: generation from the command line, thin over ``clex.cache``/``clex.chat``."""

from __future__ import annotations

import argparse
import os
import sys

from clex.cache import CACHE_MODES
from clex.generation import pad_id
from clex.methods import BASE_LENGTH_HELP
from clex.serve.chat import TextSink


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt, streaming to stdout, with a KV-cache mode for CLEX models."""
    import torch

    from clex.data.tokens import encode, load_tokenizer
    from clex.generation import generate
    from clex.loading import from_pretrained
    from clex.serve.chat import check_sampling, check_token_counts

    check_sampling(args.temperature, args.top_p)
    check_token_counts(args.max_new_tokens)
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be an integer in 0 … 2**64 - 1, got {args.seed}")
    text = _read_prompt(args.prompt_file)
    tok = load_tokenizer(args.tokenizer or args.model)
    model = from_pretrained(args.model).eval()
    ids = torch.tensor([encode(tok, text)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise ValueError(f"prompt file {args.prompt_file} is empty")
    vocab = model.config.get_text_config().vocab_size
    if int(ids.max()) >= vocab:
        raise ValueError(f"the tokenizer gives id {int(ids.max())}, beyond the model's vocabulary of {vocab}")
    streamer = TextSink(tok, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sampling = args.temperature > 0
    extra = {"temperature": args.temperature, "top_p": args.top_p} if sampling else {}
    pad = pad_id(tok, model)
    torch.manual_seed(args.seed)
    generate(model, ids, args.cache_mode, max_new_tokens=args.max_new_tokens, do_sample=sampling,
             streamer=streamer, pad_token_id=pad, **extra)
    print()
    return 0


def _read_prompt(path: str) -> str:
    """The prompt file's text (``-``: stdin), UTF-8; anything else is refused naming the file and line."""
    from clex.data.documents import decode_text, read_text

    if path == "-":
        return decode_text(_stdin_bytes(), "stdin", fix="send UTF-8 text")
    if not os.path.exists(path):
        raise ValueError(f"prompt file {path} not found")
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path} is a folder; give a text file")
    return read_text(path)


def _stdin_bytes() -> bytes:
    """All of stdin as bytes (a text stream without a byte buffer, as in tests, is encoded back)."""
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer.read() if buffer is not None else sys.stdin.read().encode("utf-8")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class _Messages:
    """Messages from stdin: a line, or in a terminal several lines joined while they end with a backslash.
    A pipe is read as bytes and decoded line by line, so a line that is not UTF-8 is named by its number
    (a text stream would fail on a whole buffered chunk, before the lines ahead of it were answered)."""

    def __init__(self, interactive: bool) -> None:
        self.interactive, self.line_no = interactive, 0
        buffer = None if interactive else getattr(sys.stdin, "buffer", None)
        self.raw = iter(buffer) if buffer is not None else None

    def _line(self, prompt: str) -> str:
        self.line_no += 1
        if self.raw is not None:
            from clex.data.documents import decode_text

            line = next(self.raw, None)
            if line is None:
                raise EOFError
            return decode_text(line, "stdin", self.line_no, fix="send UTF-8 text").rstrip("\r\n")
        try:
            return input(prompt)
        except UnicodeDecodeError as err:
            raise ValueError(f"stdin:{self.line_no}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); set the "
                             "terminal to UTF-8") from None

    def read(self) -> str | None:
        """The next message, or None at the end of input."""
        lines: list[str] = []
        while True:
            try:
                line = self._line("you> " if self.interactive and not lines else "...> " if self.interactive else "")
            except EOFError:
                return "\n".join(lines) if lines else None
            if self.interactive and line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model in the terminal (streamed answers, kept history, /reset, /exit). Without a terminal
    on stdin it reads one message per line and writes one answer per line (newlines escaped as \\n)."""
    from transformers.utils import logging as hf_logging

    from clex.data.chat import ChatTemplateError
    from clex.data.tokens import load_tokenizer
    from clex.data.types import DataError
    from clex.loading import from_pretrained
    from clex.methods import declare_length
    from clex.models import use_method
    from clex.serve.chat import ChatSession, check_sampling, check_token_counts

    check_sampling(args.temperature)
    check_token_counts(args.max_new_tokens, args.max_context)
    hf_logging.disable_progress_bar()  # no loading bars in a conversation
    tok = load_tokenizer(args.tokenizer or args.model)
    model = from_pretrained(args.model).eval()
    if args.base_length is not None and not args.method:
        raise ValueError("--base-length declares the L a --method extends from: give --method too")
    if args.method:
        model = use_method(model, declare_length(args.method, args.base_length))
    interactive = sys.stdin.isatty()
    notice = lambda text: print(f"[{args.flag_words(text)}]", file=sys.stderr)  # noqa: E731
    session = ChatSession(model, tok, args.system, args.max_context, args.max_new_tokens, args.cache_mode,
                          args.temperature, notice)
    if interactive:
        print("clex chat: /reset clears the history, /exit leaves; end a line with \\ to continue it", file=sys.stderr)
    messages = _Messages(interactive)
    while (text := messages.read()) is not None:
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            notice("history cleared")
            continue
        if not command:
            if not interactive:  # one output line per input line, always: scripts read them in step
                notice("empty message: no answer")
                print(flush=True)
            continue
        try:
            if interactive:
                print("model> ", end="", flush=True)
                session.reply(text, write=lambda piece: print(piece, end="", flush=True))
                print()
            else:
                print(_escape(session.reply(text)), flush=True)
        except ChatTemplateError:  # every message would fail the same way
            raise
        except DataError as err:
            notice(str(err))
            if not interactive:
                print(flush=True)  # the message's line: empty, the reason on stderr
    return 0


def add_cache_mode(parser: argparse.ArgumentParser, when: str) -> None:
    """``--cache-mode`` (``--policy``, its older name), as every generating command takes it."""
    parser.add_argument("--cache-mode", "--policy", dest="cache_mode", default="rerotate", choices=CACHE_MODES,
                        help=f"CLEX's KV cache {when}: rerotate cached keys once (default), recompute the prefix, "
                        "freeze t from the final length, or off (stock behaviour)")


def add_chat_parsers(sub) -> None:
    """The ``chat`` and ``generate`` subcommands."""
    ch = sub.add_parser("chat", help=cmd_chat.__doc__.split(".")[0], description=cmd_chat.__doc__)
    ch.add_argument("--model", required=True, help="model directory (a chat-tuned one: clex train --format chat)")
    ch.add_argument("--method", default=None, help="switch the model to this method first (default: its own)")
    ch.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
    ch.add_argument("--system", default=None, help="a system message at the start of the conversation")
    ch.add_argument("--max-context", type=int, default=None, help="tokens of history + answer kept; the oldest "
                    "exchanges are dropped beyond it (default: the config's max_position_embeddings)")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    add_cache_mode(ch, "as the conversation grows")
    ch.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ch.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ch.set_defaults(func=cmd_chat)

    ge = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    ge.add_argument("--model", required=True)
    ge.add_argument("--prompt-file", required=True, help="text file with the prompt (- for stdin)")
    ge.add_argument("--max-new-tokens", type=int, default=256)
    add_cache_mode(ge, "as t changes")
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ge.set_defaults(func=cmd_generate)
