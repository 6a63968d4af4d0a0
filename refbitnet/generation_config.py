"""A model's generation defaults, from its ``generation_config.json``, with arguments overriding them.

transformers and llama.cpp users expect the model directory to say how it should be sampled: the
``generation_config.json`` next to ``config.json`` holds ``do_sample``, ``temperature``, ``top_k``,
``top_p``, ``eos_token_id`` (an int or a list) and ``max_new_tokens``. refbitnet reads those, plus
one key of its own, ``seed`` (refbitnet's sampler is seeded; transformers keeps an unknown key as an
attribute and ignores it), so that a model's sampled text reproduces on every machine.

The rules are transformers': without a file, greedy decoding; ``do_sample: false`` is greedy whatever
the temperature says; with ``do_sample: true``, a key the file leaves out takes transformers' default
(temperature 1.0, top_k 50, top_p 1.0). Then an argument given by the caller wins
(``GenerationDefaults.resolve``): ``temperature=0`` (or ``do_sample=False``) is greedy, a positive
temperature samples. In refbitnet's sampler temperature 0 is greedy, top_k 0 and top_p 1 are off.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .errors import RefBitNetError

GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' GenerationConfig defaults for what a file with do_sample: true leaves out
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass(frozen=True)
class Sampling:
    """What one generate call uses: temperature 0 = greedy; top_k 0 and top_p 1 = off; seed None =
    a fresh random seed; max_new_tokens None = the caller must say."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationDefaults:
    """The defaults a model directory declares (all None/empty when it has no generation_config.json).

    do_sample, temperature, top_k, top_p, seed, max_new_tokens: as the file says (None if absent);
    eos_token_id: the file's stop ids as a tuple; source: the file read, or None.
    """
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    source: str | None = None

    @classmethod
    def from_dir(cls, directory) -> "GenerationDefaults":
        """Read ``directory/generation_config.json``; no file gives the empty defaults (greedy)."""
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
        if not os.path.exists(path):
            return cls()
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path) -> "GenerationDefaults":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise RefBitNetError(f"{path}: expected a regular file (a generation_config.json), found "
                                 f"{'nothing' if not os.path.exists(path) else 'a directory, FIFO or device'}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, RecursionError) as exc:
            raise RefBitNetError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data, source: str = "generation_config") -> "GenerationDefaults":
        if not isinstance(data, dict):
            raise RefBitNetError(f"{source}: expected a JSON object, found {type(data).__name__}")

        def get(key, kinds, what, ok=lambda v: True):
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds) or not ok(value):
                raise RefBitNetError(f"{source}: {key}: expected {what}, found {value!r}")
            return value

        eos = data.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_ids):
            raise RefBitNetError(f"{source}: eos_token_id: expected a token id or a list of them, found {eos!r}")
        temperature = get("temperature", (int, float), "a number >= 0", lambda v: 0 <= v < float("inf"))
        top_p = get("top_p", (int, float), "a number in (0, 1]", lambda v: 0 < v <= 1)
        return cls(do_sample=get("do_sample", (bool,), "true or false"),
                   temperature=None if temperature is None else float(temperature),
                   top_k=get("top_k", (int,), "an int >= 0", lambda v: v >= 0),
                   top_p=None if top_p is None else float(top_p),
                   seed=get("seed", (int,), "an int >= 0", lambda v: v >= 0),
                   max_new_tokens=get("max_new_tokens", (int,), "an int >= 1", lambda v: v >= 1),
                   eos_token_id=tuple(eos_ids), source=source)

    def sampling(self) -> Sampling:
        """What the file alone asks for, in refbitnet's terms (transformers' rules, module docstring)."""
        if not self.do_sample:
            return Sampling(seed=self.seed, max_new_tokens=self.max_new_tokens)
        pick = {k: getattr(self, k) if getattr(self, k) is not None else default
                for k, default in HF_SAMPLING_DEFAULTS.items()}
        return Sampling(temperature=pick["temperature"], top_k=pick["top_k"], top_p=pick["top_p"],
                        seed=self.seed, max_new_tokens=self.max_new_tokens)

    def resolve(self, *, do_sample: bool | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                max_new_tokens: int | None = None) -> Sampling:
        """The file's defaults with every argument that is not None put over them.

        do_sample=False or temperature=0: greedy. do_sample=True with no temperature anywhere: 1.0.
        A positive temperature samples even if the file says do_sample: false (the caller asked).
        """
        base = self.sampling()
        if do_sample is False or temperature == 0:
            sampled = False
        elif do_sample is True or temperature is not None:
            sampled = True
        else:
            sampled = not base.greedy
        if not sampled:
            chosen_temperature = 0.0
        elif temperature is not None:
            chosen_temperature = temperature
        elif not base.greedy:
            chosen_temperature = base.temperature
        else:
            chosen_temperature = self.temperature if self.temperature else HF_SAMPLING_DEFAULTS["temperature"]
        file_k = base.top_k if not base.greedy else (self.top_k or 0)
        file_p = base.top_p if not base.greedy else (self.top_p or 1.0)
        return Sampling(temperature=chosen_temperature,
                        top_k=top_k if top_k is not None else file_k,
                        top_p=top_p if top_p is not None else file_p,
                        seed=seed if seed is not None else self.seed,
                        max_new_tokens=max_new_tokens if max_new_tokens is not None else self.max_new_tokens)

    def to_dict(self) -> dict:
        """The file's keys that are set (for writing a generation_config.json back)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "source"}
        eos = out.pop("eos_token_id")
        if eos:
            out["eos_token_id"] = list(eos) if len(eos) > 1 else eos[0]
        return out

    def save(self, directory) -> None:
        """Write ``directory/generation_config.json`` (nothing if no key is set)."""
        data = self.to_dict()
        if data:
            with open(os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
