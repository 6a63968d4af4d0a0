"""The training loop: gradient accumulation, clipping, AdamW on the two-stage schedule, checkpoints, export.

A run is a pure function of its TrainConfig and data: the batches of step t are drawn from
``numpy.random.default_rng([seed, t])``, so a run resumed from a checkpoint at step t continues
exactly as if it had never stopped (the checkpoint holds the latent weights and AdamW's moments).

Loss: "mean" over the counted tokens for pre-training (each micro-batch's mean, averaged over the
accumulation steps); "sum" over tokens for SFT, as the 2B4T report does (summed over micro-batches too).
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from . import model as M
from .optim import AdamW
from .schedule import TwoStageSchedule
from ..config import Config
from ..errors import CheckpointError, RefBitNetError


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256                      # T
    batch_size: int = 8                     # B sequences per micro-batch
    grad_accum: int = 1                     # micro-batches per optimizer step
    total_steps: int = 1000
    peak_lr: float = 3e-3
    cooldown_peak_lr: float = 1e-3
    final_lr: float = 0.0
    warmup_steps: int = 0
    cooldown_step: int | None = None
    weight_decay_peak: float = 0.1
    grad_clip: float = 1.0                  # global gradient norm; 0 = off
    seed: int = 0
    quantize: bool = True                   # False: same architecture, float linear layers (baseline)
    reduction: str = "mean"                 # "mean" (pre-training) or "sum" (SFT)
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RefBitNetError(f"train {name}: expected a positive integer, found {value!r}")
        if self.reduction not in ("mean", "sum"):
            raise RefBitNetError(f"train reduction: expected 'mean' or 'sum', found {self.reduction!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise RefBitNetError(f"train grad_clip: expected a finite number >= 0, found {self.grad_clip!r}")
        self.schedule()                      # validates the learning-rate settings

    def schedule(self) -> TwoStageSchedule:
        return TwoStageSchedule(total_steps=self.total_steps, peak_lr=self.peak_lr,
                                cooldown_peak_lr=self.cooldown_peak_lr, final_lr=self.final_lr,
                                warmup_steps=self.warmup_steps, cooldown_step=self.cooldown_step,
                                weight_decay_peak=self.weight_decay_peak)


def clip_gradients(grads: dict, max_norm: float) -> float:
    """Scale grads in place so their global L2 norm is at most max_norm (as torch's clip_grad_norm_);
    returns the norm before clipping."""
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads.values():
                g *= g.dtype.type(coef)
    return norm


class Trainer:
    """Holds the latent parameters, the optimizer and the step counter of one run."""

    def __init__(self, config: Config, train: TrainConfig, batch_fn, dtype=np.float32):
        """batch_fn(rng) -> (ids int [B, T], targets int [B, T], -1 = not counted): one micro-batch."""
        if train.seq_len > config.max_position_embeddings:
            raise RefBitNetError(f"train seq_len {train.seq_len} exceeds the model's max_position_embeddings "
                                 f"{config.max_position_embeddings}")
        self.config, self.train, self.batch_fn = config, train, batch_fn
        self.schedule = train.schedule()
        self.params = M.init_parameters(config, train.seed, dtype=dtype, std=train.init_std)
        self.optimizer = AdamW(self.params)
        self.step = 0

    def loss_and_grads(self, ids, targets):
        loss, caches = M.forward(self.config, self.params, ids, targets,
                                 quantize=self.train.quantize, reduction=self.train.reduction)
        return loss, M.backward(self.config, self.params, caches)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns {step, loss, lr, wd, grad_norm}."""
        if self.step >= self.train.total_steps:
            raise RefBitNetError(f"train_step: the run is over (step {self.step} of {self.train.total_steps})")
        rng = np.random.default_rng([self.train.seed, self.step])
        accum = self.train.grad_accum
        # mean: average the micro-batch means; sum (SFT): add the micro-batch sums
        weight = 1.0 / accum if self.train.reduction == "mean" else 1.0
        total_loss, grads = 0.0, None
        for _ in range(accum):
            ids, targets = self.batch_fn(rng)
            loss, g = self.loss_and_grads(ids, targets)
            total_loss += float(loss) * weight
            if grads is None:
                grads = {k: v * v.dtype.type(weight) for k, v in g.items()}
            else:
                for k, v in g.items():
                    grads[k] += v * v.dtype.type(weight)
        norm = clip_gradients(grads, self.train.grad_clip)
        lr, wd = self.schedule.lr(self.step), self.schedule.weight_decay(self.step)
        self.optimizer.step(self.params, grads, lr, wd)
        record = {"step": self.step, "loss": total_loss, "lr": lr, "wd": wd, "grad_norm": norm}
        self.step += 1
        return record

    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats/token) over the given (ids, targets) batches, every token counted once."""
        total, count = 0.0, 0
        for ids, targets in batches:
            loss, _ = M.forward(self.config, self.params, ids, targets, quantize=self.train.quantize,
                                reduction="sum")
            total += float(loss)
            count += int((np.asarray(targets) >= 0).sum())
        if count == 0:
            raise RefBitNetError("evaluate: no validation tokens")
        return total / count

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        """One .npz with the latent weights, AdamW state, step and both configs."""
        meta = {"config": self.config.to_dict(), "train": dataclasses.asdict(self.train), "step": self.step}
        arrays = {f"param.{k}": v for k, v in self.params.items()}
        arrays.update(self.optimizer.state_dict())
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = os.fspath(path) + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def load(self, path, weights_only: bool = False) -> None:
        """Resume from save(path): the checkpoint must hold a model of exactly this shape, saved by a run
        with the same TrainConfig (else the resumed run would not be the run that was saved).

        weights_only=True takes only the latent weights (e.g. to start SFT from a pre-trained model)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: training checkpoint not found")
        try:
            data = np.load(path)
            state = {k: data[k] for k in data.files}
            meta = json.loads(state.pop("meta").tobytes().decode())
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a refbitnet training checkpoint ({e})") from None
        for name, p in self.params.items():
            key = f"param.{name}"
            if key not in state:
                raise CheckpointError(f"{path}: missing parameter {name} (checkpoint of another model?)")
            if state[key].shape != p.shape:
                raise CheckpointError(f"{path}: parameter {name}: expected shape {p.shape} for this config, "
                                      f"found {state[key].shape} (checkpoint of another model shape)")
        extra = [k[6:] for k in state if k.startswith("param.") and k[6:] not in self.params]
        if extra:
            raise CheckpointError(f"{path}: unexpected parameters {extra[:3]} (checkpoint of another model shape)")
        if weights_only:
            for name, p in self.params.items():
                self.params[name] = state[f"param.{name}"].astype(p.dtype).copy()
            return
        saved_train = meta.get("train", {})
        differ = [f"{k}: checkpoint {saved_train.get(k)!r}, now {v!r}" for k, v in dataclasses.asdict(self.train).items()
                  if saved_train.get(k) != v]
        if differ:
            raise CheckpointError(f"{path}: saved by a run with other training settings ({'; '.join(differ)}); "
                                  f"resume with the same settings, or load weights_only")
        step = int(meta["step"])
        if not 0 <= step <= self.train.total_steps:
            raise CheckpointError(f"{path}: checkpoint step {step} is outside this run's 0..{self.train.total_steps}")
        self.optimizer.load_state_dict(state, path)
        for name, p in self.params.items():
            self.params[name] = state[f"param.{name}"].astype(p.dtype).copy()
        self.step = step

    def export(self, directory, tokenizer_file=None) -> None:
        """Write the release layout (packed ternary weights, bf16 rest, config.json) that refbitnet.load reads.

        A float baseline (quantize=False) cannot be exported: the release format is ternary."""
        if not self.train.quantize:
            raise RefBitNetError("export: this run trained float linear layers (quantize=False); "
                                 "only a quantization-aware run exports to the ternary release layout")
        from ..checkpoint import save_checkpoint
        save_checkpoint(directory, self.config, self.params, tokenizer_file)
