"""Optimisers (SGD, Adam, AdamW), gradient clipping and learning-rate schedules.

Update rules follow ``torch.optim`` exactly (tested step by step against it). Optimisers take
the modules to train (anything with ``params`` and ``grads`` dicts) and update the parameter
arrays in place.
"""

from __future__ import annotations

import math

import numpy as np

from fastseq import _validate as v


def _pairs(modules):
    """(parameter, gradient) arrays to update: a container's one flat buffer pair, or each
    parameter of plain modules."""
    if hasattr(modules, "params"):
        modules = [modules]
    pairs = []
    for m in modules:
        if getattr(m, "flat_params", None) is not None:
            pairs.append((m.flat_params, m.flat_grads))
        else:
            pairs.extend((p, m.grads[name]) for name, p in m.params.items())
    if not pairs:
        raise ValueError("modules have no parameters to optimise")
    return pairs


class _Optimizer:
    def __init__(self, modules, lr):
        self.pairs = _pairs(modules)
        self.lr = _positive("lr", lr)

    def zero_grad(self):
        """Set every gradient of the optimised modules to zero."""
        for _, g in self.pairs:
            g.fill(0)


def _positive(name, value):
    value = v.finite_float(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0; received {value}")
    return value


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay
    (``torch.optim.SGD``)."""

    def __init__(self, modules, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(modules, lr)
        self.momentum = _positive("momentum", momentum)
        self.dampening = _positive("dampening", dampening)
        self.weight_decay = _positive("weight_decay", weight_decay)
        self.nesterov = v.flag("nesterov", nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self._buffers = [None] * len(self.pairs)

    def step(self):
        for k, (p, g) in enumerate(self.pairs):
            d = g + self.weight_decay * p if self.weight_decay else g.copy()
            if self.momentum:
                buf = self._buffers[k]
                if buf is None:
                    buf = self._buffers[k] = d.copy()
                else:
                    buf *= self.momentum
                    buf += (1 - self.dampening) * d
                d = d + self.momentum * buf if self.nesterov else buf
            p -= self.lr * d


class Adam(_Optimizer):
    """Adam (``torch.optim.Adam``; weight decay as an L2 term added to the gradient)."""

    _decoupled = False

    def __init__(self, modules, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(modules, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1); received {betas}")
        self.betas = (float(b1), float(b2))
        self.eps = _positive("eps", eps)
        self.weight_decay = _positive("weight_decay", weight_decay)
        self._m = [np.zeros_like(p) for p, _ in self.pairs]
        self._v = [np.zeros_like(p) for p, _ in self.pairs]
        self.steps = 0

    def step(self):
        self.steps += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.steps)
        root_c2 = math.sqrt(1 - b2**self.steps)
        for (p, g), m, sq in zip(self.pairs, self._m, self._v, strict=True):
            if self.weight_decay:
                if self._decoupled:
                    p *= 1 - self.lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p
            m *= b1
            m += (1 - b1) * g
            sq *= b2
            sq += (1 - b2) * g * g
            p -= step_size * m / (np.sqrt(sq) / root_c2 + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``, default weight_decay 0.01)."""

    _decoupled = True

    def __init__(self, modules, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(modules, lr, betas, eps, weight_decay)


def clip_grad_norm(modules, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping (``torch.nn.utils.clip_grad_norm_``)."""
    max_norm = _positive("max_norm", max_norm)
    pairs = _pairs(modules)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for _, g in pairs))
    coef = min(max_norm / (total + 1e-6), 1.0)
    for _, g in pairs:
        g *= g.dtype.type(coef)
    return total


def clip_grad_value(modules, clip_value):
    """Clip every gradient element to [-clip_value, clip_value] (``clip_grad_value_``)."""
    clip_value = _positive("clip_value", clip_value)
    for _, g in _pairs(modules):
        np.clip(g, -clip_value, clip_value, out=g)


class _Schedule:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    def step(self):
        """Advance one epoch and set the optimiser's learning rate."""
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)
        return self.optimizer.lr


class StepLR(_Schedule):
    """lr = base_lr * gamma ** (epoch // step_size) (``torch.optim.lr_scheduler.StepLR``)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer)
        self.step_size = v.positive_int("step_size", step_size)
        self.gamma = _positive("gamma", gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2
    (``torch.optim.lr_scheduler.CosineAnnealingLR``)."""

    def __init__(self, optimizer, T_max, eta_min=0.0):  # noqa: N803 - torch's name
        super().__init__(optimizer)
        self.T_max = v.positive_int("T_max", T_max)
        self.eta_min = _positive("eta_min", eta_min)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
