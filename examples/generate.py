"""Generate text with refbitnet, streaming it as it is produced (the ``refbitnet generate`` command).

    python examples/generate.py                 # the shipped model continues "To be, or not to be"
    python examples/generate.py --greedy        # greedy decoding instead of the model's sampling defaults
    python examples/generate.py --model microsoft/bitnet-b1.58-2B-4T --prompt "The capital of France is"
    python examples/generate.py --model bitnet-b1.58-2B-4T --chat            # interactive, multi-turn
    python examples/generate.py --model DIR --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1
    python examples/generate.py --model bitnet-b1.58-2B-4T --kv-cache float16    # half the KV cache memory

--model is a Hugging Face model directory (config.json, model.safetensors or shards, tokenizer files), a
GGUF file, or a hub id found in the Hugging Face cache. Without --model the small model that ships
inside the package is used. Sampling defaults come from the model's generation_config.json (the shipped
model samples with a fixed seed, printed); flags override them. A plain --prompt is continued as text
(BOS + the prompt); --chat renders turns with the model's chat template and keeps the conversation
(--prompt, if given, is the first user turn; then one turn per line read from stdin; an empty line or
EOF ends). At the end of each reply: prefill tokens/s, decode tokens/s and peak memory (on stderr).
Flags: --threads, --backend, --numerics, --kv-cache, --max-new-tokens, --temperature, --top-k, --top-p,
--seed, --greedy, --system; `python examples/generate.py --help` lists them.
"""

import sys

from refbitnet.cli import DEFAULT_PROMPT, generate_main as main  # noqa: F401  (DEFAULT_PROMPT: for tests)

if __name__ == "__main__":
    sys.exit(main())
