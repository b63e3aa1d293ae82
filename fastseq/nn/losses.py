"""Losses with backward: softmax cross-entropy (ignore_index / mask) and mean squared error."""

from __future__ import annotations

import numpy as np


class CrossEntropyLoss:
    """Softmax cross-entropy over integer targets, mean over the valid tokens.

    ``loss = criterion(logits, targets, mask=None)``: logits (..., K), targets (...) integers
    in [0, K) or ``ignore_index``; ``mask`` (...) of bools marks valid tokens (both may be
    used). Uses a numerically stable log-softmax; equal to ``torch.nn.functional.cross_entropy``
    with ``reduction="mean"``. ``backward()`` returns d loss / d logits.
    """

    def __init__(self, ignore_index=-100):
        self.ignore_index = int(ignore_index)
        self._cache = None

    def __call__(self, logits, targets, mask=None):
        logits = np.asarray(logits)
        if logits.dtype.kind != "f":
            raise TypeError(f"logits must be a floating-point array; received dtype {logits.dtype}")
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be an integer array; received dtype {targets.dtype}")
        if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets has shape {targets.shape}; expected logits.shape[:-1] = {logits.shape[:-1]}"
            )
        k = logits.shape[-1]
        valid = targets != self.ignore_index
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != targets.shape:
                raise ValueError(f"mask has shape {mask.shape}; expected targets.shape = {targets.shape}")
            valid &= mask.astype(bool)
        bad = valid & ((targets < 0) | (targets >= k))
        if bad.any():
            raise ValueError(
                f"targets must be in [0, {k}) or ignore_index={self.ignore_index}; received {targets[bad][0]}"
            )
        count = int(valid.sum())
        if count == 0:
            raise ValueError("no valid targets: every token is masked or equal to ignore_index")
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        log_p = shifted - log_z
        safe_targets = np.where(valid, targets, 0)
        picked = np.take_along_axis(log_p, safe_targets[..., None], axis=-1)[..., 0]
        loss = -(picked * valid).sum() / count
        self._cache = (log_p, safe_targets, valid, count)
        return float(loss)

    def backward(self):
        """d loss / d logits, shape of logits (zero rows for ignored tokens)."""
        if self._cache is None:
            raise ValueError("backward() needs a preceding call of the loss")
        log_p, targets, valid, count = self._cache
        grad = np.exp(log_p)
        np.put_along_axis(
            grad, targets[..., None], np.take_along_axis(grad, targets[..., None], axis=-1) - 1, axis=-1
        )
        grad *= (valid / count)[..., None].astype(grad.dtype)
        self._cache = None
        return grad


class MSELoss:
    """Mean squared error, ``mean((pred - target)^2)``; ``backward()`` returns d loss / d pred."""

    def __init__(self):
        self._diff = None

    def __call__(self, pred, target):
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.dtype.kind != "f":
            raise TypeError(f"pred must be a floating-point array; received dtype {pred.dtype}")
        if pred.shape != target.shape:
            raise ValueError(f"target has shape {target.shape}; expected pred's shape {pred.shape}")
        self._diff = pred - target.astype(pred.dtype)
        return float(np.mean(self._diff**2))

    def backward(self):
        if self._diff is None:
            raise ValueError("backward() needs a preceding call of the loss")
        grad = (2.0 / self._diff.size) * self._diff
        self._diff = None
        return grad
