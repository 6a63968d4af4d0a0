"""What the opt-in 8-bit LM head (kernels.lm_head_int8) costs in accuracy and gains in decode speed (not a test).

    python benchmarks/bench_int8_head.py [--chunks 40] [--ctx 256] [--steps 40] [--model-2b4t DIR]
                                         [--results PATH]

Accuracy, on the shipped model and its held-out text (the last 10% of the tokens of each of the 49
Shakespeare texts it was trained on, as refbitnet.train.data.encode_split holds them out): the same chunks
through the bf16 head and the int8 head: max and mean |logit difference| (also relative to the logits'
standard deviation), the fraction of positions whose argmax (greedy choice) agrees, and perplexity by
refbitnet.perplexity (llama-perplexity's method) with each head.
Speed, on the 2B4T-shaped random model (benchmarks/make_random_2b4t.py): decode steps alternating between
the two heads in one process (interleaved, so load changes hit both), median ms per token each.
Writes --results (default benchmarks/results/int8_head.md).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import refbitnet  # noqa: E402
from refbitnet import kernels  # noqa: E402
from refbitnet.perplexity import perplexity  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int8_head.md")


def held_out_ids(model):
    from refbitnet.train.data import BOS_ID, END_OF_TEXT_ID, shakespeare_documents
    val = []
    for _, text in shakespeare_documents():
        ids = [BOS_ID] + list(model.tokenizer.encode(text)) + [END_OF_TEXT_ID]
        val.extend(ids[len(ids) - int(round(len(ids) * 0.1)):])
    return np.array(val, np.int64)


def accuracy(args, say):
    model = refbitnet.load(backend="numba")
    fp = model._fast
    ids = held_out_ids(model)
    n = min(args.chunks, len(ids) // args.ctx)
    diffs, rel, agree, total = [], [], 0, 0
    for c in range(n):
        chunk = ids[c * args.ctx:(c + 1) * args.ctx]
        fp.use_int8_head(False)
        exact = model.forward(chunk)
        fp.use_int8_head(True)
        approx = model.forward(chunk)
        d = np.abs(approx - exact)
        diffs.append(d.max()), rel.append(float(d.mean() / exact.std()))
        agree += int((approx.argmax(1) == exact.argmax(1)).sum())
        total += chunk.shape[0]
    fp.use_int8_head(False)
    ppl_bf16 = perplexity(model, ids[:n * args.ctx], n_ctx=args.ctx)
    fp.use_int8_head(True)
    ppl_int8 = perplexity(model, ids[:n * args.ctx], n_ctx=args.ctx)
    fp.use_int8_head(False)
    say(f"## Accuracy: shipped model, held-out text ({len(ids)} ids; {n} chunks of {args.ctx})\n")
    say("| measure | value |")
    say("|---|---:|")
    say(f"| max abs logit difference | {max(diffs):.4g} |")
    say(f"| mean abs logit difference / std of logits | {np.mean(rel):.4g} |")
    say(f"| greedy (argmax) agreement | {agree}/{total} = {100 * agree / total:.2f}% |")
    say(f"| perplexity, bf16 head | {ppl_bf16.ppl:.4f} +/- {ppl_bf16.ppl_error:.4f} |")
    say(f"| perplexity, int8 head | {ppl_int8.ppl:.4f} +/- {ppl_int8.ppl_error:.4f} |")
    say(f"| mean nll difference (int8 - bf16) | {ppl_int8.nll_mean - ppl_bf16.nll_mean:+.5f} nats |\n")


def speed(args, say):
    if not os.path.exists(os.path.join(args.model_2b4t, "model.safetensors")):
        say(f"(speed skipped: no model at {args.model_2b4t}; run benchmarks/make_random_2b4t.py)")
        return
    kernels.set_num_threads(args.threads)
    model = refbitnet.load(args.model_2b4t, backend="numba")
    fp = model._fast
    t = time.perf_counter()
    fp.use_int8_head(True)
    quantize_s = time.perf_counter() - t
    int8_bytes = sum(a.nbytes for a in fp.int8_head)
    rng = np.random.default_rng(0)
    caches = {flag: model.new_cache(64 + args.steps + 2) for flag in (False, True)}
    prompt = rng.integers(0, model.config.vocab_size, 32)
    for flag, cache in caches.items():
        fp.use_int8_head(flag)
        model.forward(prompt, cache=cache, last_only=True)
    times = {False: [], True: []}
    load0 = os.getloadavg()[0]
    for step in range(args.steps):
        for flag in ((False, True) if step % 2 == 0 else (True, False)):
            fp.use_int8_head(flag)
            t = time.perf_counter()
            model.forward(np.array([7 + step]), cache=caches[flag])
            times[flag].append(time.perf_counter() - t)
    bf16, int8 = (1e3 * np.median(times[f]) for f in (False, True))
    say(f"## Speed: 2B4T-shaped random model, {args.threads} threads, {args.steps} decode steps each, alternating\n")
    say(f"bf16 head: {bf16:.1f} ms per token ({1e3 / bf16:.2f} tokens/s); int8 head: {int8:.1f} ms per token "
        f"({1e3 / int8:.2f} tokens/s); ratio {bf16 / int8:.2f}x. Quantizing the table once: {quantize_s:.1f} s. "
        f"Table bytes read per token: {fp.output_table.nbytes / 1e9:.3f} GB (bf16) vs "
        f"{int8_bytes / 1e9:.3f} GB (int8 + scales). Load average {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f}.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-2b4t", default="/tmp/refbitnet-random-2b4t")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()
    lines = []

    def say(text=""):
        print(text)
        lines.append(text)

    say("# The opt-in 8-bit LM head: accuracy and speed\n")
    say(f"Command: `python benchmarks/bench_int8_head.py --chunks {args.chunks} --ctx {args.ctx} --steps "
        f"{args.steps}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs.\n")
    accuracy(args, say)
    speed(args, say)
    if args.results:
        with open(args.results, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
