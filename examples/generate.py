"""Generate text with refbitnet, streaming it as it is produced.

    python examples/generate.py                 # the shipped model continues "To be, or not to be"
    python examples/generate.py --model bitnet-b1.58-2B-4T --prompt "The capital of France is"
    python examples/generate.py --model bitnet-b1.58-2B-4T --chat            # interactive, multi-turn
    python examples/generate.py --model DIR --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1
    python examples/generate.py --model bitnet-b1.58-2B-4T --kv-cache float16    # half the KV cache memory

--model is a Hugging Face model directory (config.json, model.safetensors or shards, tokenizer.json),
e.g. microsoft/bitnet-b1.58-2B-4T downloaded with `huggingface-cli download`. Without --model the
small model that ships inside the package is used. A plain --prompt is continued as text (BOS + the
prompt); --chat wraps turns in the model's chat format and keeps the conversation (--prompt, if
given, is the first user turn; then one turn per line read from stdin; an empty line or EOF ends).
At the end of each reply: prefill tokens/s, decode tokens/s and peak memory (on stderr).
"""

import argparse
import os
import sys
import time


DEFAULT_PROMPT = "To be, or not to be"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--prompt", default=None,
                   help=f"text to continue (with --chat: the first user turn); default {DEFAULT_PROMPT!r}")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat reading stdin")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed of refbitnet's RNG (sampling only)")
    p.add_argument("--threads", type=int, default=None, help="threads for the kernels and NumPy's BLAS")
    p.add_argument("--numerics", choices=("int", "fake-quant"), default="int")
    p.add_argument("--backend", choices=("numpy", "numba"), default="numba",
                   help="numba: the fast kernels (default); numpy: the readable reference path")
    p.add_argument("--kv-cache", choices=("float32", "float16"), default="float32",
                   help="KV cache element type: float32 (exact, default) or float16 (half the memory, "
                        "as llama.cpp; keys/values rounded when stored)")
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        args.prompt = DEFAULT_PROMPT   # the shipped model learned Shakespeare: give it a line to continue
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.backend == "numba" and args.numerics != "int":
        args.backend = "numpy"   # the kernels compute the integer form only
        print("note: --numerics fake-quant runs on the numpy backend", file=sys.stderr)
    return args


def set_threads(n):
    """Before NumPy is imported: BLAS reads these once. Numba reads REFBITNET_THREADS via refbitnet."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFBITNET_THREADS"):
        os.environ[name] = str(n)


def peak_memory_mib():
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB on Linux


def stream_reply(model, prompt_ids, args, echo="", cache=None):
    """Generate after prompt_ids, printing echo (once the arguments are checked) and then the text as it
    arrives; returns (new ids, text). cache: continue this KV cache (chat: the conversation so far)."""
    from refbitnet.generate import generate
    tokens = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      kv_dtype=None if cache is not None else args.kv_cache,
                      cache=cache)                                                # raises before any work
    # prompt tokens whose keys and values the cache already holds (what generate keeps, computed the same way)
    reused = cache.keep_prefix(prompt_ids[:-1]) if cache is not None else 0
    print(echo, end="", flush=True)
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
        ids = model.tokenizer.apply_chat_template(messages)
        if len(ids) + max_new_tokens <= context:
            return ids, messages
        first_turn = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first_turn <= 1:
            return ids, messages      # one turn alone is too long: generate() says so
        messages = messages[:first_turn] + messages[first_turn + 1:]


def chat(model, args):
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
        ids, messages = fit_chat(model, messages, args.max_new_tokens)
        _, reply = stream_reply(model, ids, args, cache=cache)
        messages.append({"role": "assistant", "content": reply})


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    import refbitnet                                   # NumPy is imported from here on
    from refbitnet.errors import CheckpointError, RefBitNetError
    from refbitnet.sampling import check_sampling_args
    try:                                               # what generate() checks, before the model loads
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.seed)
    except RefBitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model = refbitnet.load(args.model, numerics=args.numerics, backend=args.backend)
    except CheckpointError as exc:
        if args.model is None:
            print(f"error: no --model given and no shipped model found ({exc}).\n"
                  "Pass --model DIR, a Hugging Face model directory with config.json, model.safetensors "
                  "and tokenizer.json (e.g. microsoft/bitnet-b1.58-2B-4T).", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print(f"error: {args.model or 'the shipped model'} has no tokenizer.json; this example needs one",
              file=sys.stderr)
        return 2
    if args.threads is not None and args.backend == "numba":
        from refbitnet import kernels
        kernels.set_num_threads(args.threads)
    print(f"[{model!r}]", file=sys.stderr)
    if args.backend == "numba":
        # load (or compile) the kernels now, so the prefill rate below measures the model, not the JIT: one token
        # (decode), and a block of more than 4 (prefill: v5 and the row-parallel glue)
        for block in (1, 5):
            model.forward([model.tokenizer.bos_id] * block)
    try:
        if args.chat:
            chat(model, args)
        else:
            stream_reply(model, model.tokenizer.encode(args.prompt, add_bos=True), args, echo=args.prompt)
    except RefBitNetError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)     # the newline ends a reply cut off mid-stream
        return 2
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
