"""Live parity with torch 2.13: same weights, same inputs -> same outputs, final states and
gradients of the input, initial states and all parameters. Lengths go through
``pack_padded_sequence(enforce_sorted=False)``."""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from tests.cases import Case, assert_matches
from tests.conftest import CELL_CLASSES, TORCH_VARIANTS, VARIANTS, make_cell
from tests.tolerances import assert_close

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def torch_run(case, batch_first=False):
    """Run case through torch.nn; returns out, finals, dx, d_initial, param grads (NumPy)."""
    cell, opts = VARIANTS[case.variant]
    layer = case.layer
    cls = getattr(torch.nn, fastseq.registry.CELLS[cell].torch_layer)
    kwargs = {"num_layers": case.num_layers, "bias": case.bias, "bidirectional": case.bidirectional,
              "batch_first": batch_first, **opts}  # fmt: skip
    module = cls(case.input_size, case.hidden_size, **kwargs).to(TORCH_DTYPE[np.dtype(case.dtype)])
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})
    x_np = case.x.transpose(1, 0, 2) if batch_first else case.x
    x = torch.tensor(x_np, requires_grad=True)
    h0 = [torch.tensor(s if case.use_hx else np.zeros_like(s), requires_grad=True) for s in case.h0]
    hx = h0[0] if case.n_states == 1 else tuple(h0)
    if case.lengths is not None:
        packed = pack_padded_sequence(
            x, torch.tensor(case.lengths), batch_first=batch_first, enforce_sorted=False
        )
        out, hn = module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=case.steps)
    else:
        out, hn = module(x, hx)
    finals = [hn] if case.n_states == 1 else list(hn)
    go = case.grad_out.transpose(1, 0, 2) if batch_first else case.grad_out
    loss = (out * torch.from_numpy(go)).sum()
    for s, g in zip(finals, case.grad_final, strict=True):
        loss = loss + (s * torch.from_numpy(g)).sum()
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return (
        out.detach().numpy(),
        [f.detach().numpy() for f in finals],
        x.grad.numpy(),
        [s.grad.numpy() for s in h0],
        grads,
    )


def compare(case, got, ref):
    assert_matches(case, got, ref, "torch parity")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("variant", TORCH_VARIANTS)
def test_layer_parity(variant, num_layers, bidirectional, use_lengths, use_hx, bias, dtype):
    case = Case(
        variant,
        dtype,
        num_layers,
        bidirectional,
        use_lengths,
        use_hx,
        bias,
        steps=7,
        batch=5,
        input_size=6,
        hidden_size=8,
    )
    compare(case, case.run(), torch_run(case))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("variant", ["rnn-tanh", "rnn-relu", "lstm"])
def test_columns_layout_parity(variant, use_lengths, dtype, columns_everywhere):
    """Training and inference in the transposed layout (_engine.runs_in_columns, forced
    for any batch) against torch, 2 layers x 2 directions, 40 samples."""
    case = Case(variant, dtype, 2, True, use_lengths, True, steps=7, batch=40, input_size=6, hidden_size=8)
    compare(case, case.run(), torch_run(case))
    case.layer.eval()
    out, hn = case.layer(case.x, case.hx(), case.lengths)
    ref_out, ref_finals, *_ = torch_run(case)
    assert_close(out, ref_out, dtype, "output", "columns inference")
    for a, b in zip(case.states(hn), ref_finals, strict=True):
        assert_close(a, b, dtype, "final state", "columns inference")
    forwards, backwards = columns_everywhere
    assert forwards == [True] * 4 + [False] * 4 and len(backwards) == 4


@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("variant", TORCH_VARIANTS)
def test_batch_first_parity(variant, use_lengths):
    case = Case(variant, np.float64, 2, True, use_lengths, True, seed=3)
    layer = case.layer
    layer.batch_first = True
    out, hn = layer(case.x.transpose(1, 0, 2), case.hx(), case.lengths)
    dx, dhx = layer.backward(case.grad_out.transpose(1, 0, 2), case.grad_h_n())
    ref = torch_run(case, batch_first=True)
    compare(case, (out, case.states(hn), dx, case.states(dhx)), ref)


@pytest.mark.parametrize("variant", TORCH_VARIANTS)
def test_unbatched_parity(variant):
    case = Case(variant, np.float64, 2, True, False, True, batch=1, seed=4)
    hx = case.hx()
    squeeze = (lambda s: s[:, 0]) if case.n_states == 1 else (lambda s: tuple(a[:, 0] for a in s))
    out, hn = case.layer(case.x[:, 0], squeeze(hx))
    dx, dhx = case.layer.backward(case.grad_out[:, 0], squeeze(case.grad_h_n()))
    assert out.ndim == 2 and dx.shape == case.x[:, 0].shape
    ref = torch_run(case)
    expand = lambda s: s[:, None]  # noqa: E731
    got = (
        out[:, None],
        [expand(s) for s in case.states(hn)],
        dx[:, None],
        [expand(s) for s in case.states(dhx)],
    )
    compare(case, got, ref)


def _random_configs(count):
    rng = np.random.default_rng(2026)
    for k in range(count):
        yield pytest.param(
            TORCH_VARIANTS[k % 4], [np.float32, np.float64][rng.integers(2)], int(rng.integers(1, 4)),
            bool(rng.integers(2)), bool(rng.integers(2)), bool(rng.integers(2)), bool(rng.integers(2)),
            int(rng.integers(1, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 10)), int(rng.integers(1, 17)),
            id=f"random{k}",
        )  # fmt: skip


@pytest.mark.parametrize(
    "variant,dtype,layers,bidir,lengths,use_hx,bias,steps,batch,c,h", list(_random_configs(24))
)
def test_random_config_parity(variant, dtype, layers, bidir, lengths, use_hx, bias, steps, batch, c, h):
    case = Case(
        variant,
        dtype,
        layers,
        bidir,
        lengths and batch > 1,
        use_hx,
        bias,
        steps,
        batch,
        c,
        h,
        seed=steps * 31 + h,
    )
    compare(case, case.run(), torch_run(case))


@pytest.mark.parametrize("layout", ["default", "columns"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", TORCH_VARIANTS)
def test_cell_parity(variant, dtype, layout, rng, request):
    """A cell's step and its backward against torch's cell; "columns": in the transposed
    layout where the cell has it (_engine.runs_in_columns forced)."""
    cell_name, opts = VARIANTS[variant]
    ran = request.getfixturevalue("columns_everywhere") if layout == "columns" else ([], [])
    cell = make_cell(variant, 5, 6, dtype=dtype, seed=1)
    tcls = getattr(torch.nn, fastseq.registry.CELLS[cell_name].torch_cell)
    tcell = tcls(5, 6, **opts).to(TORCH_DTYPE[np.dtype(dtype)])
    tcell.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in cell.state_dict().items()})
    x = rng.standard_normal((4, 5)).astype(dtype)
    states = [rng.standard_normal((4, 6)).astype(dtype) for _ in range(2 if cell_name == "lstm" else 1)]
    grads = [rng.standard_normal((4, 6)).astype(dtype) for _ in states]
    hx = states[0] if len(states) == 1 else tuple(states)
    new = cell(x, hx)
    dx, dhx = cell.backward(grads[0] if len(grads) == 1 else tuple(grads))
    xt = torch.tensor(x, requires_grad=True)
    st = [torch.tensor(s, requires_grad=True) for s in states]
    tnew = tcell(xt, st[0] if len(st) == 1 else tuple(st))
    tnew = [tnew] if len(st) == 1 else list(tnew)
    sum((a * torch.from_numpy(g)).sum() for a, g in zip(tnew, grads, strict=True)).backward()
    new = [new] if len(st) == 1 else list(new)
    dhx = [dhx] if len(st) == 1 else list(dhx)
    kind = f"torch parity {np.dtype(dtype).name}"
    for a, b in zip(new, tnew, strict=True):
        assert_close(a, b.detach().numpy(), dtype, "new state", kind)
    assert_close(dx, xt.grad.numpy(), dtype, "dx", kind)
    for a, b in zip(dhx, st, strict=True):
        assert_close(a, b.grad.numpy(), dtype, "dhx", kind)
    for name, p in tcell.named_parameters():
        assert_close(cell.grads[name], p.grad.numpy(), dtype, name, kind)
    assert ran[1] == ([True] if layout == "columns" and cell_name != "gru" else [])


def test_every_torch_cell_is_covered():
    assert {VARIANTS[v][0] for v in TORCH_VARIANTS} == set(CELL_CLASSES)
