"""The ``refbitnet`` command: what users do with a model, one subcommand each.

    refbitnet generate [--model M] [--prompt TEXT]          continue a text (default: the shipped model)
    refbitnet chat [--model M] [--system TEXT]              multi-turn chat, one turn per line of stdin
    refbitnet perplexity --model M --file text.txt [--ctx 512]   as llama.cpp's llama-perplexity
    refbitnet gguf info FILE.gguf                           what a GGUF file holds
    refbitnet gguf export M OUT.gguf [--layout i2_s]        for bitnet.cpp / llama.cpp

--model is a model directory, a GGUF file, or a Hugging Face id (``org/name``, ``org/name/file.gguf``)
found in the local Hugging Face cache or downloaded (see refbitnet.hub). Generated text goes to stdout;
figures (rates, memory, the sampling settings, progress) go to stderr, so pipes get the text alone.
Every bad input ends in one line ``error: ...`` on stderr and exit status 2, never a traceback
(set REFBITNET_DEBUG=1 to see one).

Sampling defaults come from the model's generation_config.json (refbitnet.generation_config), flags
override them; ``--greedy`` is greedy decoding. A sampled run prints its seed, so it reproduces.
``examples/generate.py`` is this module's ``generate`` with the same flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_PROMPT = "To be, or not to be"    # the shipped model learned Shakespeare: a line to continue
EXIT_ERROR = 2
_stdout_mid_line = [False]                # a reply is being streamed: an error starts a new line


# ================================================================================ arguments

def add_model_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", default=None, required=model_required,
                   help="model directory, GGUF file or Hugging Face id" +
                        ("" if model_required else " (default: the shipped model)"))
    p.add_argument("--threads", type=int, default=None, help="threads for the kernels and NumPy's BLAS")
    from refbitnet.api import NUMERICS
    p.add_argument("--numerics", choices=NUMERICS, default="int",
                   help="int (default), fake-quant, or the whole model as transformers computes it in bf16: "
                        "transformers-bf16 / transformers-legacy-bf16 (numpy backend)")
    p.add_argument("--backend", choices=("auto", "numba", "numpy"), default="auto",
                   help="auto (default): the fast Numba kernels where they run, else numpy; numba: the "
                        "kernels or an error; numpy: the readable reference path")


def add_generate_args(p: argparse.ArgumentParser, chat: bool) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default=None,
                   help="the first user turn" if chat else f"text to continue (default {DEFAULT_PROMPT!r})")
    if not chat:
        p.add_argument("--chat", action="store_true", help="interactive multi-turn chat reading stdin")
    p.add_argument("--system", default=None, help="system message of the chat")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: generation_config.json's max_new_tokens, else 128")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config.json (greedy without one)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off; default: generation_config.json")
    p.add_argument("--top-p", type=float, default=None, help="1 = off; default: generation_config.json")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of refbitnet's RNG; default: generation_config.json's, else a fresh one (printed)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding, whatever generation_config.json says")
    p.add_argument("--kv-cache", choices=("float32", "float16"), default="float32",
                   help="KV cache element type: float32 (exact, default) or float16 (half the memory, as "
                        "llama.cpp; keys/values rounded when stored)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refbitnet", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_args(sub.add_parser("generate", help="continue a prompt, streaming the text"), chat=False)
    add_generate_args(sub.add_parser("chat", help="multi-turn chat in the model's chat template"), chat=True)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama-perplexity does")
    add_model_args(ppl, model_required=False)
    ppl.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    ppl.add_argument("--ctx", "-c", type=int, default=None,
                     help="tokens per chunk (default: 512, or the model's context if shorter)")
    ppl.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    ppl.add_argument("--kv-cache", choices=("float32", "float16"), default="float32",
                     help="KV cache element type: float32 (exact, default) or float16 (llama.cpp's default)")

    gguf = sub.add_parser("gguf", help="GGUF files: info, export")
    gsub = gguf.add_subparsers(dest="gguf_command", required=True, metavar="ACTION")
    info = gsub.add_parser("info", help="summarize a GGUF file")
    info.add_argument("file")
    export = gsub.add_parser("export", help="write a model (directory or hub id) as GGUF")
    export.add_argument("model")
    export.add_argument("out")
    export.add_argument("--layout", default="i2_s", help="i2_s (bitnet.cpp; default), tq2_0 or tq1_0 (llama.cpp)")
    export.add_argument("--embedding-type", default="f16", help="f16 (default), bf16 or f32")
    export.add_argument("--arch", default=None, help="general.architecture (default: refbitnet.gguf's, 2B4T's)")
    export.add_argument("--tokenizer", default=None, help="tokenizer.json to embed (default: the model's)")

    dump = sub.add_parser("dump", help="the oracle's reference dumps (python -m refbitnet.testing dump)",
                          add_help=False)
    dump.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# ================================================================================ the model

def set_threads(n: int) -> None:
    """Before NumPy is imported: BLAS reads these once. Numba reads REFBITNET_THREADS via refbitnet."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFBITNET_THREADS"):
        os.environ[name] = str(n)


def load_model(spec: str | None, numerics: str = "int", backend: str = "auto"):
    """(model, local path or None for the shipped model): a directory, a GGUF file or a hub id
    (refbitnet.loading.load: the tokenizer's specials and generation_config.json come with the model)."""
    from refbitnet import hub
    from refbitnet.loading import load
    path = hub.resolve(spec) if spec is not None else None
    return load(path, numerics=numerics, backend=backend), path


def peak_memory_mib() -> float:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB on Linux


def warm_up(model) -> None:
    """Load (or compile) the kernels now, so the prefill rate measures the model, not the JIT: one token
    (decode), and a block of more than 4 (prefill)."""
    token = model.tokenizer.bos_id if model.tokenizer is not None and model.tokenizer.bos_id is not None else 0
    for block in (1, 5):
        model.forward([token] * block)


# ================================================================================ generate / chat

class Settings:
    """The resolved sampling of a run: flags over generation_config.json (refbitnet.generation_config)."""

    def __init__(self, args, defaults):
        import secrets
        resolved = defaults.resolve(do_sample=False if args.greedy else None, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens)
        self.temperature, self.top_k, self.top_p = resolved.temperature, resolved.top_k, resolved.top_p
        self.max_new_tokens = resolved.max_new_tokens if resolved.max_new_tokens is not None else 128
        self.seed = resolved.seed
        self.seed_from = "--seed" if args.seed is not None else (defaults.source and "generation_config.json")
        if not resolved.greedy and self.seed is None:
            self.seed, self.seed_from = secrets.randbelow(2 ** 31), "fresh"   # printed, so the run reproduces
        self.stop = list(defaults.eos_token_id)
        self.from_file = defaults.source is not None

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy decoding"
        where = f" ({self.seed_from})" if self.seed_from else ""
        return (f"sampling: temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}, "
                f"seed {self.seed}{where}; --greedy for greedy decoding")


def stream_reply(model, prompt_ids, settings, kv_dtype, echo: str = "", cache=None):
    """Generate after prompt_ids, printing echo (once the arguments are checked) and then the text as it
    arrives; returns (new ids, text). cache: continue this KV cache (chat: the conversation so far).
    Rates and memory go to stderr."""
    tokens = model.generate(prompt_ids, settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                            stop=settings.stop or None, stream=True,
                            kv_dtype=None if cache is not None else kv_dtype, cache=cache)  # raises before work
    # prompt tokens whose keys and values the cache already holds (what generate keeps, computed the same way)
    reused = cache.keep_prefix(prompt_ids[:-1]) if cache is not None else 0
    print(echo, end="", flush=True)
    _stdout_mid_line[0] = True
    text_stream = model.tokenizer.text_stream()
    pieces, new_ids = [], []
    start = time.perf_counter()
    first = last = None
    for token_id in tokens:
        last = time.perf_counter()
        if first is None:
            first = last            # prefill + the first token's draw
        new_ids.append(token_id)
        piece = text_stream.push(token_id)
        pieces.append(piece)
        print(piece, end="", flush=True)
    tail = text_stream.flush()
    pieces.append(tail)
    print(tail, flush=True)
    _stdout_mid_line[0] = False
    prefill = (first - start) if first is not None else time.perf_counter() - start
    decode_steps = max(len(new_ids) - 1, 0)
    decode_rate = f"{decode_steps / (last - first):.2f}" if decode_steps and last > first else "n/a"
    cached = f" ({reused} of them from the cache)" if reused else ""
    print(f"[{len(prompt_ids)} prompt tokens{cached}, {len(new_ids)} new | prefill "
          f"{(len(prompt_ids) - reused) / prefill:.2f} tokens/s | decode {decode_rate} tokens/s | "
          f"peak memory {peak_memory_mib():.0f} MiB]", file=sys.stderr)
    return new_ids, "".join(pieces)


def fit_chat(model, messages, max_new_tokens):
    """Chat ids, dropping the oldest turns (never the system message) until the reply fits."""
    context = model.config.max_position_embeddings
    while True:
        ids = model.tokenizer.chat_prompt(messages)
        if len(ids) + max_new_tokens <= context:
            return ids, messages
        first_turn = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first_turn <= 1:
            return ids, messages      # one turn alone is too long: generate() says so
        messages = messages[:first_turn] + messages[first_turn + 1:]


def chat(model, args, settings):
    """One turn per line of stdin. The conversation so far is the prompt of each turn, and one KV cache serves
    all turns: generate() keeps the cached positions that match the new prompt, so a turn runs only its own
    tokens (and whatever follows the first difference, e.g. after old turns are dropped to fit)."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cache = model.new_cache(kv_dtype=args.kv_cache)          # the model's context; pages are touched as it fills
    pending = args.prompt
    interactive = sys.stdin.isatty()
    while True:
        if pending is None:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return
            pending = line.rstrip("\n")
        messages.append({"role": "user", "content": pending})
        pending = None
        ids, messages = fit_chat(model, messages, settings.max_new_tokens)
        _, reply = stream_reply(model, ids, settings, args.kv_cache, cache=cache)
        messages.append({"role": "assistant", "content": reply})


def run_generate(args, chat_mode: bool) -> int:
    from refbitnet.errors import RefBitNetError
    from refbitnet.sampling import check_sampling_args
    if args.numerics != "int" and args.backend == "numba":
        args.backend = "numpy"   # the kernels compute the integer form only
        print(f"note: --numerics {args.numerics} runs on the numpy backend", file=sys.stderr)
    if not chat_mode and args.prompt is None:
        args.prompt = DEFAULT_PROMPT
    for name in ("temperature", "top_k", "top_p"):      # what generate() checks, before the model loads
        value = getattr(args, name)
        if value is not None:
            check_sampling_args(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, name: value})
    model, _ = load_model(args.model, args.numerics, args.backend)
    if model.tokenizer is None:
        raise RefBitNetError(f"{args.model or 'the shipped model'}: has no tokenizer.json; generating text "
                             f"needs one")
    settings = Settings(args, model.generation_defaults)
    if args.threads is not None and model.backend == "numba":
        from refbitnet import kernels
        kernels.set_num_threads(args.threads)
    print(f"[{model!r}]", file=sys.stderr)
    print(f"[{settings.describe()}]", file=sys.stderr)
    if model.backend == "numba":
        warm_up(model)
    if chat_mode:
        chat(model, args, settings)
    else:
        stream_reply(model, model.tokenizer.encode_prompt(args.prompt), settings, args.kv_cache, echo=args.prompt)
    return 0


# ================================================================================ perplexity

def run_perplexity(args) -> int:
    from refbitnet.errors import RefBitNetError
    from refbitnet.perplexity import (DEFAULT_CTX, ProgressBar, check_ctx, chunk_starts, perplexity,
                                      tokenize_file_text)
    if args.numerics != "int" and args.backend == "numba":
        args.backend = "numpy"   # the kernels compute the integer form only
        print(f"note: --numerics {args.numerics} runs on the numpy backend", file=sys.stderr)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise RefBitNetError(f"{args.file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    model, _ = load_model(args.model, args.numerics, args.backend)
    if model.tokenizer is None:
        raise RefBitNetError(f"{args.model or 'the shipped model'}: has no tokenizer.json; perplexity of a text "
                             f"file needs one")
    if args.threads is not None and model.backend == "numba":
        from refbitnet import kernels
        kernels.set_num_threads(args.threads)
    default_ctx = min(DEFAULT_CTX, model.config.max_position_embeddings)
    n_ctx = check_ctx(model, args.ctx if args.ctx is not None else default_ctx)
    ids = tokenize_file_text(model.tokenizer, text)
    print(f"[{model!r}]", file=sys.stderr)
    print(f"[{args.file}: {len(text)} characters, {len(ids)} tokens; chunks of {n_ctx} tokens, "
          f"BOS {'on' if model.tokenizer.add_bos else 'off'}, the second half of each scored]", file=sys.stderr)
    bar = ProgressBar(len(chunk_starts(len(ids), n_ctx, args.chunks)), "perplexity")   # checks ctx and length

    def on_chunk(done, total, running):
        bar.update(done, f"PPL {running:.4f}")

    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    result = perplexity(model, ids, n_ctx=n_ctx, bos_id=bos, max_chunks=args.chunks, kv_dtype=args.kv_cache,
                        on_chunk=on_chunk)
    print("".join(f"[{i}]{p:.4f}," for i, p in enumerate(result.running, 1)), file=sys.stderr)
    print(result.summary())                             # the command's result: stdout
    return 0


# ================================================================================ gguf, dump

def run_gguf(args) -> int:
    import refbitnet.gguf as gguf
    if args.gguf_command == "info":
        print(gguf.describe(args.file))
        return 0
    import inspect
    import warnings

    from refbitnet import hub
    source = hub.resolve(args.model)
    options = {"layout": args.layout, "tokenizer_file": args.tokenizer, "embedding_type": args.embedding_type}
    if args.arch is not None:
        options["arch"] = args.arch
    parameters = inspect.signature(gguf.save_gguf).parameters
    start = time.perf_counter()
    bar = None
    if "progress" in parameters:                      # per-tensor progress where refbitnet.gguf offers it

        def progress(done, total, *_):
            nonlocal bar
            if bar is None:
                from refbitnet.perplexity import ProgressBar
                bar = ProgressBar(total, "export")
            bar.update(done)
        options["progress"] = progress
    print(f"[exporting {source} -> {args.out} ({args.layout})]", file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught, _watch_output(args.out, "export", bar is None
                                                                      and "progress" not in options):
        warnings.simplefilter("always")
        gguf.save_gguf(source, args.out, **options)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"[exported in {time.perf_counter() - start:.1f} s, {os.path.getsize(args.out) / 2**20:.1f} MiB]",
          file=sys.stderr)
    print(gguf.describe(args.out))
    return 0


class _watch_output:
    """While a long write runs without progress reports of its own: a status line on stderr every
    half second (a terminal) or ten seconds (a pipe) with the elapsed time and the MiB written so far."""

    def __init__(self, path, label: str, active: bool = True):
        self.path, self.label, self.active = path, label, active

    def __enter__(self):
        import threading
        self.stop = threading.Event()
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        if self.active:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.5 if self.tty else 10.0):
            size = os.path.getsize(self.path) / 2**20 if os.path.isfile(self.path) else 0.0
            line = f"{self.label}: {time.perf_counter() - self.start:.0f} s, {size:.0f} MiB written"
            print(("\r\x1b[K" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc):
        if self.active:
            self.stop.set()
            self.thread.join()
            if self.tty:
                print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        return False


def run_dump(args) -> int:
    from refbitnet.errors import RefBitNetError
    try:
        from refbitnet.testing.__main__ import main as testing_main
    except ImportError:
        raise RefBitNetError("dump: this refbitnet build has no `python -m refbitnet.testing dump` yet") from None
    rest = list(args.args)
    if "--model" in rest[:-1]:                        # a hub id works here as everywhere
        from refbitnet import hub
        where = rest.index("--model") + 1
        rest[where] = str(hub.resolve(rest[where]))
    return testing_main(["dump"] + rest) or 0


# ================================================================================ entry points

def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _guarded(run) -> int:
    """Run; every error becomes one line on stderr and a non-zero status (a traceback only with
    REFBITNET_DEBUG=1)."""
    from refbitnet.errors import RefBitNetError
    try:
        return run()
    except RefBitNetError as exc:
        print(("\n" if _stdout_mid_line[0] else "") + f"error: {_one_line(exc)}", file=sys.stderr)
    except OSError as exc:              # a missing file, a directory given for a file, disk full, ...
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"error: {where}{_one_line(exc.strerror or exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except Exception as exc:            # a bug in refbitnet, not bad input: still one line, and say so
        if os.environ.get("REFBITNET_DEBUG"):
            raise
        print(f"error: internal error {type(exc).__name__}: {_one_line(exc)} (REFBITNET_DEBUG=1 shows the "
              f"traceback; please report it)", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    """``refbitnet COMMAND ...`` (the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        set_threads(args.threads)
    if args.command == "generate":
        return _guarded(lambda: run_generate(args, chat_mode=args.chat))
    if args.command == "chat":
        return _guarded(lambda: run_generate(args, chat_mode=True))
    if args.command == "perplexity":
        return _guarded(lambda: run_perplexity(args))
    if args.command == "gguf":
        return _guarded(lambda: run_gguf(args))
    return _guarded(lambda: run_dump(args))


def generate_main(argv=None) -> int:
    """``examples/generate.py``: the generate subcommand (with --chat) as a command of its own."""
    parser = argparse.ArgumentParser(prog="examples/generate.py", description="Generate text with refbitnet, "
                                     "streaming it as it is produced (= refbitnet generate)")
    add_generate_args(parser, chat=False)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        set_threads(args.threads)
    return _guarded(lambda: run_generate(args, chat_mode=args.chat))


if __name__ == "__main__":
    sys.exit(main())
