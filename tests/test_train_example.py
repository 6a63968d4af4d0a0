"""examples/train.py end to end on a tiny config (pydoc_data corpus): an interrupted and resumed run
(log, loss curve, summary, state), and an export that refbitnet.load reads; then an SFT run started from it."""

import importlib.util
import json
from pathlib import Path

import numpy as np

import refbitnet

TINY_ARGS = ["--corpus", "pydoc", "--vocab", "300", "--hidden", "32", "--intermediate", "64", "--layers", "1",
             "--heads", "2", "--kv-heads", "1", "--seq-len", "32", "--batch", "2", "--warmup", "1",
             "--eval-batches", "2", "--save-every", "2"]


def load_example():
    path = Path(__file__).parent.parent / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("train_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example_end_to_end(tmp_path):
    train = load_example()
    out = tmp_path / "run"
    train.main(["--out", str(out), "--steps", "6", "--stop-after", "4"] + TINY_ARGS)     # interrupted run
    assert not (out / "model.safetensors").exists()
    train.main(["--out", str(out), "--steps", "6", "--resume"] + TINY_ARGS)
    for name in ("log.jsonl", "loss.png", "summary.json", "train_state.npz", "config.json",
                 "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6)) and all(r["lr"] > 0 for r in log)
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["val_loss"]) and summary["unigram_val_loss"] > 0
    model = refbitnet.load(out)
    assert model.config.vocab_size == 300 and len(model.generate("def", max_new_tokens=3)) <= 3


    # SFT from the pre-trained weights: summed loss over answer tokens only
    sft = tmp_path / "sft"
    train.main(["--out", str(sft), "--steps", "4", "--sft", "--init", str(out / "train_state.npz")]
               + [a if a != "32" or i != TINY_ARGS.index("--seq-len") + 1 else "256"
                  for i, a in enumerate(TINY_ARGS)])
    log = [json.loads(line) for line in (sft / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["loss"] > 10 for r in log)       # a sum over tokens, not a mean
