"""AdamW with decoupled weight decay, step for step as torch.optim.AdamW computes it.

Per parameter p with gradient g at step t (1-based), learning rate lr and weight decay wd::

    p = p * (1 - lr * wd)                       # decoupled decay (matrices only; norms are not decayed)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    p = p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
"""

import math

import numpy as np

from ..errors import RefBitNetError


class AdamW:
    def __init__(self, params: dict, betas=(0.9, 0.95), eps=1e-8):
        self.betas, self.eps = betas, eps
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    @staticmethod
    def decays(name: str, p: np.ndarray) -> bool:
        """Weight decay applies to matrices (projections and the embedding), not to norm weights."""
        return p.ndim >= 2

    def step(self, params: dict, grads: dict, lr: float, weight_decay: float) -> None:
        """Update params in place."""
        if not (math.isfinite(lr) and lr >= 0):
            raise RefBitNetError(f"AdamW lr: expected a finite learning rate >= 0, found {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise RefBitNetError(f"AdamW weight_decay: expected a finite value >= 0, found {weight_decay}")
        b1, b2 = self.betas
        self.t += 1
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, p in params.items():
            g = grads[name]
            if self.decays(name, p):
                p *= p.dtype.type(1 - lr * weight_decay)
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v) / p.dtype.type(math.sqrt(bias2)) + p.dtype.type(self.eps)
            p -= p.dtype.type(lr / bias1) * m / denom

    def state_dict(self) -> dict:
        out = {"adam.t": np.array(self.t)}
        out.update({f"adam.m.{k}": v for k, v in self.m.items()})
        out.update({f"adam.v.{k}": v for k, v in self.v.items()})
        return out

    def load_state_dict(self, state: dict, source: str) -> None:
        from ..errors import CheckpointError
        for k in self.m:
            for kind, table in (("m", self.m), ("v", self.v)):
                key = f"adam.{kind}.{k}"
                if key not in state:
                    raise CheckpointError(f"{source}: missing optimizer tensor {key}")
                if state[key].shape != table[k].shape:
                    raise CheckpointError(f"{source}: optimizer tensor {key}: expected shape {table[k].shape}, "
                                          f"found {state[key].shape}")
                table[k] = state[key].astype(table[k].dtype).copy()
        self.t = int(state["adam.t"])
