"""Linear, Embedding and Dropout with forward and backward passes (torch's semantics)."""

from __future__ import annotations

import numpy as np

from fastseq import _validate as v
from fastseq._module import Module


def _backward_needs_forward(name):
    return ValueError(f"{name}.backward() needs a preceding forward() in training mode (each forward once)")


class Linear(Module):
    """y = x @ weight.T + bias over the last axis, as ``torch.nn.Linear``.

    Parameters: ``weight`` (out_features, in_features), ``bias`` (out_features,), both from
    U(-1/sqrt(in_features), 1/sqrt(in_features)). ``forward(x)`` takes (..., in_features),
    e.g. (T, N, C) or (N, C), and returns (..., out_features); ``backward(grad)`` returns
    d x and adds into ``grads``.
    """

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, seed=None):
        self.in_features = v.positive_int("in_features", in_features)
        self.out_features = v.positive_int("out_features", out_features)
        self.dtype = v.dtype_option(dtype)
        rng = np.random.default_rng(v.seed_option(seed))
        bound = 1.0 / np.sqrt(self.in_features)
        self.params = {
            "weight": rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(self.dtype)
        }
        if v.flag("bias", bias):
            self.params["bias"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)
        self.grads = {k: np.zeros_like(p) for k, p in self.params.items()}
        self._x = None

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": "bias" in self.params, "dtype": self.dtype.name}  # fmt: skip

    def forward(self, x):
        """x (..., in_features) -> (..., out_features)."""
        x = v.float_array("x", x, self.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {x.shape}; expected (..., in_features={self.in_features})")
        y = x @ self.params["weight"].T
        if "bias" in self.params:
            y += self.params["bias"]
        self._x = x if self.training else None
        return y

    def backward(self, grad):
        """grad (..., out_features) -> d x (..., in_features); parameter gradients added."""
        if self._x is None:
            raise _backward_needs_forward("Linear")
        g = v.float_array("grad", grad, self.dtype)
        v.shape("grad", g, self._x.shape[:-1] + (self.out_features,), "(..., out_features)")
        x2 = self._x.reshape(-1, self.in_features)
        g2 = g.reshape(-1, self.out_features)
        self.grads["weight"] += g2.T @ x2
        if "bias" in self.params:
            self.grads["bias"] += g2.sum(axis=0)
        self._x = None
        return (g2 @ self.params["weight"]).reshape(g.shape[:-1] + (self.in_features,))


class Embedding(Module):
    """Rows of ``weight`` (num_embeddings, embedding_dim) looked up by integer index, as
    ``torch.nn.Embedding`` (init N(0, 1); ``padding_idx`` row zero and never updated)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, *, dtype=np.float32, seed=None):
        self.num_embeddings = v.positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = v.positive_int("embedding_dim", embedding_dim)
        self.dtype = v.dtype_option(dtype)
        if padding_idx is not None:
            padding_idx = v.positive_int("padding_idx", padding_idx, minimum=0)
            if padding_idx >= self.num_embeddings:
                raise ValueError(
                    f"padding_idx must be < num_embeddings={self.num_embeddings}; received {padding_idx}"
                )
        self.padding_idx = padding_idx
        weight = np.random.default_rng(v.seed_option(seed)).standard_normal(
            (self.num_embeddings, self.embedding_dim)
        )
        if padding_idx is not None:
            weight[padding_idx] = 0
        self.params = {"weight": weight.astype(self.dtype)}
        self.grads = {"weight": np.zeros_like(self.params["weight"])}
        self._index = None

    def config(self):
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "dtype": self.dtype.name}  # fmt: skip

    def forward(self, index):
        """index (...) of integers in [0, num_embeddings) -> (..., embedding_dim)."""
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise TypeError(f"index must be an integer array; received dtype {index.dtype}")
        if index.size and (index.min() < 0 or index.max() >= self.num_embeddings):
            raise ValueError(
                f"index must be in [0, {self.num_embeddings}); received min {index.min()}, max {index.max()}"
            )
        self._index = index if self.training else None
        return self.params["weight"][index]

    def backward(self, grad):
        """grad (..., embedding_dim): added into ``grads['weight']`` (no input gradient)."""
        if self._index is None:
            raise _backward_needs_forward("Embedding")
        g = v.float_array("grad", grad, self.dtype)
        v.shape("grad", g, self._index.shape + (self.embedding_dim,), "(..., embedding_dim)")
        np.add.at(self.grads["weight"], self._index.ravel(), g.reshape(-1, self.embedding_dim))
        if self.padding_idx is not None:
            self.grads["weight"][self.padding_idx] = 0
        self._index = None


class Dropout(Module):
    """Zero each element with probability p and scale the rest by 1/(1-p) in training mode;
    identity in eval mode (``torch.nn.Dropout``). Seeded."""

    def __init__(self, p=0.5, *, seed=None):
        self.p = v.probability("p", p)
        self._rng = np.random.default_rng(v.seed_option(seed))
        self.params, self.grads = {}, {}
        self._mask = None

    def config(self):
        return {"p": self.p}

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array; received dtype {x.dtype}")
        if not self.training or self.p == 0:
            self._mask = np.ones((), x.dtype) if self.training else None
            return x
        keep = self._rng.random(x.shape, dtype=x.dtype) >= self.p
        scale = x.dtype.type(0) if self.p >= 1 else x.dtype.type(1 / (1 - self.p))
        self._mask = keep.astype(x.dtype) * scale
        return x * self._mask

    def backward(self, grad):
        if self._mask is None:
            raise _backward_needs_forward("Dropout")
        grad = np.asarray(grad)
        if self._mask.ndim and grad.shape != self._mask.shape:
            raise ValueError(f"grad has shape {grad.shape}; expected the forward's shape {self._mask.shape}")
        out = grad * self._mask
        self._mask = None
        return out
