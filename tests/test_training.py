"""Containers, checkpoints, sequence patterns and whole training runs, against torch and
finite differences."""

import json

import numpy as np
import pytest
import torch

import fastseq
from fastseq import nn
from tests.tolerances import FD_EPS, assert_close, assert_fd_close

LAYERS = {
    "rnn": (fastseq.RNN, torch.nn.RNN),
    "lstm": (fastseq.LSTM, torch.nn.LSTM),
    "gru": (fastseq.GRU, torch.nn.GRU),
}
VOCAB, EMB, HID = 11, 5, 7


def _lm(cell, dtype=np.float64, num_layers=2, **kw):
    """Embedding -> recurrent layer -> Linear: a small language model."""
    return nn.Sequential(
        nn.Embedding(VOCAB, EMB, dtype=dtype, seed=1),
        LAYERS[cell][0](EMB, HID, num_layers=num_layers, dtype=dtype, seed=2, **kw),
        nn.Linear(HID, VOCAB, dtype=dtype, seed=3),
    )


class TorchLM(torch.nn.Module):
    def __init__(self, cell, model):
        super().__init__()
        layer = model.modules[1]
        self.emb = torch.nn.Embedding(VOCAB, EMB)
        self.rnn = LAYERS[cell][1](EMB, HID, num_layers=layer.num_layers)
        self.head = torch.nn.Linear(HID, VOCAB)
        dtype = torch.float64 if model.dtype == np.float64 else torch.float32
        self.to(dtype)
        with torch.no_grad():
            for k, part in enumerate((self.emb, self.rnn, self.head)):
                for name, p in part.named_parameters():
                    p.copy_(torch.from_numpy(model.params[f"{k}.{name}"]))

    def forward(self, tokens, state=None):
        out, final = self.rnn(self.emb(tokens), state)
        return self.head(out), final


def _tokens(rng, steps=6, batch=4):
    return rng.integers(0, VOCAB, size=(steps, batch))


# ------------------------------------------------------------------------ containers
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_sequential_forward_backward_matches_torch(cell, dtype):
    model = _lm(cell, dtype)
    ref = TorchLM(cell, model)
    tokens = _tokens(np.random.default_rng(0))
    targets = np.roll(tokens, -1, axis=0)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(tokens), targets)
    assert model.backward(loss_fn.backward()) is None  # Embedding first: no input gradient
    logits, _ = ref(torch.from_numpy(tokens))
    t_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.from_numpy(targets).reshape(-1)
    )
    t_loss.backward()
    assert_close(np.array(loss), t_loss.detach().numpy(), dtype, "loss", "torch training")
    for k, part in enumerate((ref.emb, ref.rnn, ref.head)):
        for name, p in part.named_parameters():
            assert_close(model.grads[f"{k}.{name}"], p.grad.numpy(), dtype, f"{k}.{name}", "torch training")


def test_flat_buffers_are_the_parameters():
    model = _lm("lstm")
    assert model.flat_params.size == sum(p.size for p in model.params.values())
    for name, p in model.params.items():
        assert np.shares_memory(p, model.flat_params), name
        assert np.shares_memory(model.grads[name], model.flat_grads), name
    layer = model.modules[1]
    assert layer.params["weight_hh_l1"] is model.params["1.weight_hh_l1"]
    tokens = _tokens(np.random.default_rng(1))
    before = model(tokens)
    model.flat_params *= 0.5  # an optimiser step on the flat view reaches every module
    assert not np.allclose(model(tokens), before)
    opt = nn.SGD(model, lr=0.1)
    assert len(opt.pairs) == 1 and opt.pairs[0][0] is model.flat_params
    with pytest.raises(ValueError, match="one dtype"):
        nn.Sequential(nn.Linear(2, 3, dtype=np.float32), nn.Linear(3, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="module 1 must be a fastseq module"):
        nn.Sequential(nn.Linear(2, 3), "relu")


def test_checkpoint_round_trip_and_validation(tmp_path):
    model = _lm("gru", recurrent_dropout=0.25, reset_after=False)
    model.flat_params += 0.01
    npz, js = model.save(tmp_path / "model", metadata={"epoch": 4})
    assert npz.name == "model.npz" and js.name == "model.json"
    loaded, meta = nn.load(tmp_path / "model.json")
    assert meta == {"epoch": 4}
    np.testing.assert_array_equal(loaded.flat_params, model.flat_params)
    assert loaded.config() == model.config()
    assert loaded.modules[1].recurrent_dropout == 0.25 and not loaded.modules[1]._opts.reset_after
    tokens = _tokens(np.random.default_rng(2))
    model.eval(), loaded.eval()
    np.testing.assert_array_equal(loaded(tokens), model(tokens))
    with np.load(npz, allow_pickle=False) as f:  # plain arrays, torch-like names
        assert "1.weight_ih_l0" in f.files

    def broken(edit, message, error=ValueError):
        doc = json.loads(js.read_text())
        edit(doc)
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        (tmp_path / "bad.npz").write_bytes(npz.read_bytes())
        with pytest.raises(error, match=message):
            nn.load(tmp_path / "bad")

    broken(lambda d: d.update(format="other"), "not a fastseq-checkpoint")
    broken(lambda d: d.update(version=99), "version 99 is not supported")
    broken(
        lambda d: d["model"]["modules"][1].update(type="Transformer"), r"model.modules\[1\] has unknown type"
    )
    broken(lambda d: d["model"]["modules"][1]["config"].update(hidden_size=9), "has shape")
    broken(lambda d: d["model"]["modules"][2]["config"].update(colour=1), "invalid config")
    broken(lambda d: d["model"]["modules"].pop(), "missing keys")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        nn.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        nn.load(tmp_path / "absent")


# ------------------------------------------------------------------- sequence patterns
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_last_step_is_the_final_state_of_each_direction(cell, bidirectional, batch_first):
    layer = LAYERS[cell][0](3, 4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
                            dtype=np.float64, seed=0)  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 7, 3))  # (N, T, C)
    lengths = np.array([3, 7, 1, 4, 6, 2])
    out, h_n = layer(x if batch_first else x.transpose(1, 0, 2), lengths=lengths)
    pick = nn.LastStep(bidirectional=bidirectional, batch_first=batch_first)
    last = pick(out, lengths)
    h = h_n[0] if cell == "lstm" else h_n
    expected = np.concatenate([h[-2], h[-1]], axis=1) if bidirectional else h[-1]
    np.testing.assert_array_equal(last, expected)
    grad = rng.standard_normal(last.shape)
    dout = pick.backward(grad)
    assert dout.shape == out.shape
    # d/d out of sum(pick(out) * grad), by finite differences (the map is linear)
    probe = rng.standard_normal(out.shape)
    assert np.isclose(np.sum(dout * probe), np.sum(pick(probe, lengths) * grad))


def test_many_to_one_classifier_gradients_by_finite_differences():
    model = nn.Sequential(
        fastseq.GRU(3, 4, bidirectional=True, dtype=np.float64, seed=0),
        nn.LastStep(bidirectional=True),
        nn.Linear(8, 3, dtype=np.float64, seed=1),
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5, 3))
    lengths = np.array([6, 2, 5, 1, 3])
    y = rng.integers(0, 3, 5)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x, lengths), y)
    dx = model.backward(loss_fn.backward())
    analytic = model.flat_grads.copy()

    def loss():
        return loss_fn(model(x, lengths), y)

    idx = rng.choice(model.flat_params.size, 12, replace=False)
    numeric = []
    for i in idx:
        old = model.flat_params[i]
        model.flat_params[i] = old + FD_EPS
        plus = loss()
        model.flat_params[i] = old - FD_EPS
        minus = loss()
        model.flat_params[i] = old
        numeric.append((plus - minus) / (2 * FD_EPS))
    assert_fd_close(analytic[idx], numeric, "many-to-one params")
    assert np.all(dx[3:, 1] == 0) and np.all(dx[1:, 3] == 0)  # padded steps get no gradient


@pytest.mark.parametrize("cell", list(LAYERS))
def test_generate_through_cells_matches_the_layer_path(cell):
    model = _lm(cell)
    prime = np.array([[1, 2, 3], [4, 5, 6]])
    greedy = nn.generate(model, prime, 8, temperature=0)
    assert greedy.shape == (2, 8)
    full = np.concatenate([prime, greedy], axis=1).T  # (T, N)
    model.eval()
    logits = model(full)
    np.testing.assert_array_equal(np.argmax(logits[2:-1], axis=-1).T, greedy)
    assert model.training is False  # generate restores the modes it found
    model.train()
    a = nn.generate(model, prime[0], 20, temperature=1.5, seed=7)
    assert a.shape == (20,)
    np.testing.assert_array_equal(a, nn.generate(model, prime[0], 20, temperature=1.5, seed=7))
    assert not np.array_equal(a, nn.generate(model, prime[0], 20, temperature=1.5, seed=8))
    np.testing.assert_array_equal(nn.generate(model, prime, 8, top_k=1, seed=3), greedy)
    top2 = nn.generate(model, prime, 30, top_k=2, seed=3)
    for n in range(2):
        seq = np.concatenate([prime[n], top2[n]])[:, None]
        model.eval()
        lg = model(seq)[2:-1, 0]
        ranks = (lg > lg[np.arange(len(lg)), top2[n]][:, None]).sum(axis=1)
        assert ranks.max() <= 1, "top_k=2 sampled a token outside the two most likely"
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        nn.generate(model, prime, 3, temperature=-1)
    with pytest.raises(TypeError, match="prime must be integer tokens"):
        nn.generate(model, [0.5], 3)
    bi = nn.Sequential(nn.Embedding(4, 3), fastseq.LSTM(3, 3, bidirectional=True), nn.Linear(6, 4))
    with pytest.raises(ValueError, match="bidirectional layer cannot run step by step"):
        nn.generate(bi, [1], 3)


def _seq2seq(dtype=np.float64):
    enc = nn.Sequential(
        nn.Embedding(VOCAB, EMB, dtype=dtype, seed=1), fastseq.LSTM(EMB, HID, 2, dtype=dtype, seed=2)
    )
    dec = nn.Sequential(
        nn.Embedding(VOCAB, EMB, dtype=dtype, seed=3),
        fastseq.LSTM(EMB, HID, 2, dtype=dtype, seed=4),
        nn.Linear(HID, VOCAB, dtype=dtype, seed=5),
    )
    return nn.Seq2Seq(enc, dec)


def test_seq2seq_teacher_forcing_gradients_and_free_running_decoding():
    model = _seq2seq()
    rng = np.random.default_rng(4)
    src, src_len = _tokens(rng, 6, 3), np.array([6, 3, 4])
    tgt = _tokens(rng, 5, 3)
    tgt_in, tgt_out = tgt[:-1], tgt[1:]
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(src, tgt_in, src_len), tgt_out)
    model.backward(loss_fn.backward())
    analytic = model.flat_grads.copy()
    enc_size = model.encoder.flat_params.size if model.encoder.flat_params is not None else None
    assert enc_size is None  # the encoder's arrays are views of the Seq2Seq buffer
    n_enc = sum(p.size for k, p in model.params.items() if k.startswith("encoder."))
    idx = np.concatenate(
        [rng.choice(n_enc, 8, replace=False), n_enc + rng.choice(model.flat_params.size - n_enc, 8)]
    )
    numeric = []
    for i in idx:
        old = model.flat_params[i]
        model.flat_params[i] = old + FD_EPS
        plus = loss_fn(model(src, tgt_in, src_len), tgt_out)
        model.flat_params[i] = old - FD_EPS
        minus = loss_fn(model(src, tgt_in, src_len), tgt_out)
        model.flat_params[i] = old
        numeric.append((plus - minus) / (2 * FD_EPS))
    assert np.abs(analytic[idx[:8]]).max() > 0, "the encoder must receive gradient through the states"
    assert_fd_close(analytic[idx], numeric, "seq2seq params")
    # free running: greedy decoding from the encoder's states = argmax of teacher forcing on
    # the decoded tokens
    model.eval()
    state = model.encode(src, src_len)
    decoded = nn.generate(model.decoder, tgt[:1].T, 4, temperature=0, state=state)
    teacher = model(src, np.concatenate([tgt[:1], decoded.T[:-1]]), src_len)
    np.testing.assert_array_equal(np.argmax(teacher, axis=-1).T, decoded)
    with pytest.raises(ValueError, match="same number"):
        nn.Seq2Seq(model.encoder, nn.Sequential(nn.Linear(2, 2, dtype=np.float64)))


@pytest.mark.parametrize("cell", list(LAYERS))
def test_truncated_bptt_carries_states(cell):
    model = _lm(cell)
    rng = np.random.default_rng(5)
    tokens = _tokens(rng, 12, 3)
    windows = nn.truncated_bptt(12, 5)
    assert windows == [(0, 5), (5, 10), (10, 12)]
    model.eval()
    full = model(tokens)
    state, pieces = None, []
    for a, b in windows:
        pieces.append(model(tokens[a:b], state=state))
        state = model.final_states
    np.testing.assert_allclose(np.concatenate(pieces), full, rtol=1e-12, atol=1e-12)
    # training: each window back-propagates on its own; the carried state is a constant
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    targets = np.roll(tokens, -1, 0)
    state = None
    model.zero_grad()
    for a, b in windows:
        loss_fn(model(tokens[a:b], state=state), targets[a:b])
        model.backward(loss_fn.backward())
        state = model.final_states
    truncated = model.flat_grads.copy()
    model.zero_grad()
    loss_fn(model(tokens), targets)
    model.backward(loss_fn.backward())
    assert not np.allclose(truncated, model.flat_grads)  # the gradient did stop at the boundaries
    reset = nn.reset_states(state, [False, True, False])
    for s, r in zip(state, reset, strict=True):
        for a, b in zip(
            s if isinstance(s, tuple) else (s,), r if isinstance(r, tuple) else (r,), strict=True
        ):
            assert (
                np.all(b[:, 1] == 0) and np.array_equal(b[:, [0, 2]], a[:, [0, 2]]) and np.any(a[:, 1] != 0)
            )


def test_sliding_windows_are_views_with_the_right_values():
    series = np.arange(30.0).reshape(15, 2)
    x, y = nn.sliding_windows(series, window=4, horizon=2, stride=3)
    count = (15 - 4 - 2) // 3 + 1
    assert x.shape == (count, 4, 2) and y.shape == (count, 2, 2)
    assert np.shares_memory(x, series) and np.shares_memory(y, series)
    for m in range(count):
        np.testing.assert_array_equal(x[m], series[3 * m : 3 * m + 4])
        np.testing.assert_array_equal(y[m], series[3 * m + 4 : 3 * m + 6])
    x1, y1 = nn.sliding_windows(np.arange(10), 3)
    assert x1.shape == (7, 3, 1) and y1[-1, 0, 0] == 9
    with pytest.raises(ValueError, match="window \\+ horizon = 12 must be <= the series length 10"):
        nn.sliding_windows(np.arange(10), 10, 2)
    with pytest.raises(TypeError, match="window must be an integer"):
        nn.sliding_windows(np.arange(10), 2.5)
    with pytest.raises(TypeError, match="series must be numeric"):
        nn.sliding_windows(np.array(["a", "b"]), 1)


# --------------------------------------------------------------- training parity, 50 steps
def _train_both(cell, dtype, optimiser, steps=50):
    model = _lm(cell, dtype)
    ref = TorchLM(cell, model)
    rng = np.random.default_rng(11)
    # learnable data: each token determines the next, (3 t + 1) mod VOCAB
    batches = []
    for _ in range(5):
        seq = [rng.integers(0, VOCAB, 6)]
        for _ in range(7):
            seq.append((3 * seq[-1] + 1) % VOCAB)
        batches.append(np.stack(seq))
    if optimiser == "sgd":
        opt = nn.SGD(model, lr=0.6, momentum=0.9, nesterov=True)
        t_opt = torch.optim.SGD(ref.parameters(), lr=0.6, momentum=0.9, nesterov=True)
    else:
        opt = nn.Adam(model, lr=0.02)
        t_opt = torch.optim.Adam(ref.parameters(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss()
    ours, theirs = [], []
    for step in range(steps):
        tokens = batches[step % len(batches)]
        targets = np.roll(tokens, -1, axis=0)
        opt.zero_grad()
        ours.append(loss_fn(model(tokens), targets))
        model.backward(loss_fn.backward())
        nn.clip_grad_norm(model, 0.5)
        opt.step()
        t_opt.zero_grad()
        logits, _ = ref(torch.from_numpy(tokens))
        t_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), torch.from_numpy(targets).reshape(-1)
        )
        t_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        t_opt.step()
        theirs.append(t_loss.item())
    return np.array(ours), np.array(theirs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_fifty_training_steps_match_torch(cell, optimiser, dtype):
    ours, theirs = _train_both(cell, dtype, optimiser)
    assert ours[-1] < 0.6 * ours[0], "the model should learn the rule in 50 steps"
    # the loss curve on the scale of its largest (first) losses: rounding differences grow
    # over 50 steps (RNN + SGD, float32: 1.9e-4 relative at step 45, where the loss is small)
    assert_close(ours, theirs, dtype, "loss per step", kind="torch training")
