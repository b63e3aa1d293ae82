"""Random test cases shared by the reference, finite-difference and torch parity tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from tests.conftest import VARIANTS, make_layer
from tests.tolerances import assert_close


@dataclass
class Case:
    """One layer configuration with random inputs and output gradients (time-major)."""

    variant: str
    dtype: type = np.float64
    num_layers: int = 1
    bidirectional: bool = False
    use_lengths: bool = False
    use_hx: bool = False
    bias: bool = True
    steps: int = 5
    batch: int = 3
    input_size: int = 3
    hidden_size: int = 4
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.cell = VARIANTS[self.variant][0]
        self.n_states = 2 if self.cell == "lstm" else 1
        d = 2 if self.bidirectional else 1
        t, n, h = self.steps, self.batch, self.hidden_size
        self.layer = make_layer(self.variant, self.input_size, h, num_layers=self.num_layers,
                                bidirectional=self.bidirectional, bias=self.bias, dtype=self.dtype,
                                seed=self.seed, **self.extra)  # fmt: skip
        self.x = rng.standard_normal((t, n, self.input_size)).astype(self.dtype)
        self.lengths = None
        if self.use_lengths:
            self.lengths = rng.integers(1, t + 1, size=n)
            self.lengths[rng.integers(n)] = t  # the padded length is used by someone
            if n > 1:
                self.lengths[(np.argmax(self.lengths) + 1) % n] = 1  # and a length-1 sample
        state_shape = (self.num_layers * d, n, h)
        self.h0 = [rng.standard_normal(state_shape).astype(self.dtype) * 0.5 for _ in range(self.n_states)]
        self.grad_out = rng.standard_normal((t, n, d * h)).astype(self.dtype)
        if self.lengths is not None:
            self.grad_out *= (np.arange(t)[:, None] < self.lengths[None, :])[:, :, None]
        self.grad_final = [rng.standard_normal(state_shape).astype(self.dtype) for _ in range(self.n_states)]

    def hx(self):
        if not self.use_hx:
            return None
        return self.h0[0] if self.n_states == 1 else tuple(self.h0)

    def grad_h_n(self):
        return self.grad_final[0] if self.n_states == 1 else tuple(self.grad_final)

    def states(self, value):
        """A layer's state return value as a list of arrays."""
        return [value] if self.n_states == 1 else list(value)

    def run(self):
        """Forward and backward through fastseq; returns out, finals, dx, d_initial."""
        self.layer.zero_grad()
        out, hn = self.layer(self.x, self.hx(), self.lengths)
        dx, dhx = self.layer.backward(self.grad_out, self.grad_h_n())
        return out, self.states(hn), dx, self.states(dhx)

    def loss(self, x=None, h0=None):
        """Scalar loss sum(out * grad_out) + sum(final * grad_final) (forward only)."""
        hx = None
        if self.use_hx or h0 is not None:
            h0 = self.h0 if h0 is None else h0
            hx = h0[0] if self.n_states == 1 else tuple(h0)
        out, hn = self.layer(self.x if x is None else x, hx, self.lengths)
        self.layer._cache = None
        total = float(np.sum(out * self.grad_out))
        for s, g in zip(self.states(hn), self.grad_final, strict=True):
            total += float(np.sum(s * g))
        return total


def assert_matches(case, got, ref, source):
    """Compare fastseq's (out, finals, dx, d_initial) and the layer's grads with a reference's
    (out, finals, dx, d_initial, grads); ``source`` names the reference in the error record."""
    out, finals, dx, dinit = got
    r_out, r_finals, r_dx, r_dinit, r_grads = ref
    dt = case.dtype
    kind = f"{source} {np.dtype(dt).name}"
    assert_close(out, r_out, dt, "output", kind)
    for a, b in zip(finals, r_finals, strict=True):
        assert_close(a, b, dt, "final state", kind)
    assert_close(dx, r_dx, dt, "dx", kind)
    for a, b in zip(dinit, r_dinit, strict=True):
        assert_close(a, b, dt, "d initial state", kind)
    assert set(r_grads) == set(case.layer.grads)
    for name, g in r_grads.items():
        assert_close(case.layer.grads[name], g, dt, name, kind)


def run_in_threads(jobs, repeats=3):
    """Run every job (a callable) ``repeats`` times, each job in its own Python thread, all
    at once; returns each job's last result and raises the first error a thread met."""
    results, errors = [None] * len(jobs), []

    def work(k):
        try:
            for _ in range(repeats):
                results[k] = jobs[k]()
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
