"""Training building blocks against torch: modules, losses, optimisers, clipping, schedules."""

import numpy as np
import pytest
import torch

import fastseq
from fastseq import nn
from tests.tolerances import assert_close

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(dtype, bias, rng):
    lin = nn.Linear(5, 3, bias=bias, dtype=dtype, seed=0)
    ref = torch.nn.Linear(5, 3, bias=bias).to(TORCH_DTYPE[dtype])
    ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((4, 2, 5)).astype(dtype)
    g = rng.standard_normal((4, 2, 3)).astype(dtype)
    y = lin(x)
    dx = lin.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))
    assert_close(y, yt.detach().numpy(), dtype, "y")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    for name, p in ref.named_parameters():
        assert_close(lin.grads[name], p.grad.numpy(), dtype, name)
    with pytest.raises(ValueError, match=r"x has shape \(4, 2, 6\); expected \(\.\.\., in_features=5\)"):
        lin(np.zeros((4, 2, 6), dtype))


def test_embedding_matches_torch(rng):
    emb = nn.Embedding(7, 4, padding_idx=0, dtype=np.float64, seed=0)
    assert not emb.params["weight"][0].any()
    ref = torch.nn.Embedding(7, 4, padding_idx=0).double()
    ref.load_state_dict({"weight": torch.from_numpy(emb.params["weight"].copy())})
    idx = np.array([[1, 0, 3], [3, 6, 1]])
    g = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(emb(idx), ref(torch.from_numpy(idx)).detach().numpy())
    emb.backward(g)
    ref(torch.from_numpy(idx)).backward(torch.from_numpy(g))
    np.testing.assert_allclose(emb.grads["weight"], ref.weight.grad.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"index must be in \[0, 7\); received min 0, max 7"):
        emb(np.array([0, 7]))
    with pytest.raises(TypeError, match=r"index must be an integer array"):
        emb(np.array([0.5]))


def test_dropout_training_and_eval(rng):
    drop = nn.Dropout(0.3, seed=0)
    x = np.ones((200, 50), np.float32)
    y = drop(x)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.02 and np.allclose(y[kept], 1 / 0.7)
    g = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(drop.backward(g), g * (y != 0) / np.float32(0.7), rtol=1e-6)
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_matches_torch_with_ignore_index_and_mask(dtype, rng):
    logits = (rng.standard_normal((5, 3, 6)) * 4).astype(dtype)
    targets = rng.integers(0, 6, size=(5, 3))
    targets[0, 1] = -100
    mask = np.ones((5, 3), bool)
    mask[4, :] = False
    ce = nn.CrossEntropyLoss()
    loss = ce(logits, targets, mask)
    grad = ce.backward()
    t_targets = np.where(mask, targets, -100)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        lt.reshape(-1, 6), torch.from_numpy(t_targets.reshape(-1)), ignore_index=-100
    )
    ref.backward()
    assert_close(np.array(loss), ref.detach().numpy(), dtype, "loss")
    assert_close(grad, lt.grad.numpy(), dtype, "dlogits")
    big = np.array([[1000.0, -1000.0, 0.0]], dtype)  # stable log-softmax
    assert np.isfinite(ce(big, np.array([1])))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 6\) or ignore_index=-100; received 9"):
        ce(logits, np.full((5, 3), 9))
    with pytest.raises(ValueError, match=r"no valid targets"):
        ce(logits, np.full((5, 3), -100))


def test_mse_matches_torch(rng):
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    mse = nn.MSELoss()
    pt = torch.tensor(pred, requires_grad=True)
    ref = torch.nn.functional.mse_loss(pt, torch.from_numpy(target))
    ref.backward()
    np.testing.assert_allclose(mse(pred, target), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(mse.backward(), pt.grad.numpy(), rtol=1e-12)


class _Params:
    def __init__(self, rng):
        self.params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}


def _run_optimizer(make_ours, make_theirs, rng, steps=6):
    mod = _Params(rng)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in mod.params.values()]
    ours, theirs = make_ours(mod), make_theirs(tparams)
    for _ in range(steps):
        for g, tp in zip(mod.grads.values(), tparams, strict=True):
            g[...] = rng.standard_normal(g.shape)
            tp.grad = torch.from_numpy(g.copy())
        ours.step()
        theirs.step()
    for p, tp in zip(mod.params.values(), tparams, strict=True):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    ours.zero_grad()
    assert all(not g.any() for g in mod.grads.values())


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01},
    ],
)
def test_sgd_matches_torch(kw, rng):
    _run_optimizer(lambda m: nn.SGD(m, lr=0.1, **kw), lambda p: torch.optim.SGD(p, lr=0.1, **kw), rng)


@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", {}),
        ("Adam", {"weight_decay": 0.05}),
        ("AdamW", {}),
        ("AdamW", {"weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ],
)
def test_adam_matches_torch(cls, kw, rng):
    _run_optimizer(
        lambda m: getattr(nn, cls)(m, lr=0.01, **kw),
        lambda p: getattr(torch.optim, cls)(p, lr=0.01, **kw),
        rng,
    )


def test_clipping_matches_torch(rng):
    mod = _Params(rng)
    for g in mod.grads.values():
        g[...] = rng.standard_normal(g.shape) * 3
    tparams = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in mod.grads.values()]
    for tp, g in zip(tparams, mod.grads.values(), strict=True):
        tp.grad = torch.from_numpy(g.copy())
    norm = nn.clip_grad_norm(mod, 1.5)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.5)
    np.testing.assert_allclose(norm, tnorm.item(), rtol=1e-12)
    for g, tp in zip(mod.grads.values(), tparams, strict=True):
        np.testing.assert_allclose(g, tp.grad.numpy(), rtol=1e-12)
    nn.clip_grad_value(mod, 0.1)
    torch.nn.utils.clip_grad_value_(tparams, 0.1)
    for g, tp in zip(mod.grads.values(), tparams, strict=True):
        np.testing.assert_allclose(g, tp.grad.numpy(), rtol=1e-12)
        assert np.abs(g).max() <= 0.1


def test_schedules_match_torch(rng):
    mod = _Params(rng)
    for ours_cls, theirs_cls, kw in [
        (nn.StepLR, torch.optim.lr_scheduler.StepLR, {"step_size": 3, "gamma": 0.5}),
        (nn.CosineAnnealingLR, torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": 7, "eta_min": 0.01}),
    ]:
        opt = nn.SGD(mod, lr=0.2)
        topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        ours, theirs = ours_cls(opt, **kw), theirs_cls(topt, **kw)
        for _ in range(10):
            topt.step()
            theirs.step()
            np.testing.assert_allclose(ours.step(), theirs.get_last_lr()[0], rtol=1e-12)
            assert opt.lr == ours.lr_at(ours.epoch)


def test_lstm_with_linear_head_learns_with_adam():
    """Integration: many-to-many tagging (predict the previous input symbol) trains."""
    rng = np.random.default_rng(0)
    vocab, steps, batch = 5, 12, 16
    emb = nn.Embedding(vocab, 8, seed=0)
    lstm = fastseq.LSTM(8, 32, seed=0)
    head = nn.Linear(32, vocab, seed=0)
    ce = nn.CrossEntropyLoss()
    opt = nn.Adam([emb, lstm, head], lr=0.02)
    losses = []
    for _ in range(60):
        seq = rng.integers(0, vocab, size=(steps, batch))
        targets = np.concatenate([np.full((1, batch), -100), seq[:-1]])
        out, _ = lstm(emb(seq))
        losses.append(ce(head(out), targets))
        emb.backward(lstm.backward(head.backward(ce.backward()))[0])
        nn.clip_grad_norm([emb, lstm, head], 5.0)
        opt.step()
        opt.zero_grad()
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5])
