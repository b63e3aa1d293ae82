"""The bench's peers compute what fastseq computes: ONNX Runtime's graphs, the JAX layers
and the NumPy loop, built from a fastseq module's weights, give its outputs, stream states
and (JAX) gradients. A peer that computed something else would make ``fastseq bench --compare``'s
ratios meaningless."""

import numpy as np
import pytest

from fastseq.bench.harness import BenchCase, Inputs, build_fastseq
from fastseq.bench.peers import PEERS
from tests.tolerances import assert_close

CELLS = ["rnn", "lstm", "gru"]
#: (mode, layers, bidirectional, lengths)
SHAPES = {
    "one layer": ("forward", 1, False, "full"),
    "2x2 random lengths": ("forward", 2, True, "random"),
    "stream": ("stream", 1, False, "full"),
    "training 2x2 random lengths": ("train", 2, True, "random"),
    "2x2": ("forward", 2, True, "full"),
}
GRAD_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _case(cell, shape, dtype="float32"):
    mode, layers, bidirectional, lengths = SHAPES[shape]
    return BenchCase(cell, mode, 5, 7, 6, 4, layers, bidirectional, dtype, lengths)


def _fastseq_result(case, inputs, module):
    """What the peer's runner should return: the output, the stream's last h, or the
    training step's (parameter gradients by name, dx)."""
    if case.mode == "stream":
        steps = module.stream(batch=case.batch)
        for t in range(case.steps):
            state = steps.step(inputs.x[t])
        return state[0] if isinstance(state, tuple) else state
    if case.mode == "forward":
        return module(inputs.x, lengths=inputs.lengths)[0]
    module.zero_grad()
    module(inputs.x, lengths=inputs.lengths)
    dx = module.backward(inputs.grad_out)[0]
    return dict(module.grads), dx


def _run(peer, case):
    inputs = Inputs(case)
    module = build_fastseq(case, inputs)[1]
    expected = _fastseq_result(case, inputs, module)
    runner = PEERS[peer](case, module, inputs).runner()
    assert runner is not None
    return runner(), expected


@pytest.mark.parametrize(
    ("peer", "shape"),
    [*(("onnxruntime", shape) for shape in ("one layer", "2x2 random lengths", "stream")),
     *(("numpy", shape) for shape in ("one layer", "2x2", "stream"))],
)  # fmt: skip
@pytest.mark.parametrize("cell", CELLS)
def test_inference_peer_matches_fastseq(peer, cell, shape):
    # the inference peers' outputs (and stream states): ONNX Runtime's graph, the NumPy loop
    case = _case(cell, shape)
    got, expected = _run(peer, case)
    assert_close(got, expected, case.dtype, f"{peer} {cell} {shape}")


def test_onnxruntime_peer_declines_what_it_cannot_run():
    for case, note in ((_case("lstm", "training 2x2 random lengths"), "onnxruntime runs inference only"),
                       (_case("gru", "one layer", "float64"), "onnxruntime's CPU RNN kernels are float32 only")):  # fmt: skip
        inputs = Inputs(case)
        peer = PEERS["onnxruntime"](case, build_fastseq(case, inputs)[1], inputs)
        assert peer.runner() is None and peer.note == note


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [*((shape, "float32") for shape in SHAPES), ("training 2x2 random lengths", "float64")],
)
@pytest.mark.parametrize("cell", CELLS)
def test_jax_peer_matches_fastseq(cell, shape, dtype):
    case = _case(cell, shape, dtype)
    got, expected = _run("jax", case)
    if case.mode != "train":
        assert np.asarray(got).dtype == case.dtype
        assert_close(np.asarray(got), expected, case.dtype, f"jax {cell} {shape}")
        return
    (weight_grads, dx), (fastseq_grads, fastseq_dx) = got, expected
    assert_close(np.asarray(dx), fastseq_dx, dtype, f"jax {cell} dx")
    for layer in range(case.layers):
        for direction in range(case.directions):
            for name, grad in zip(GRAD_NAMES, weight_grads[layer][direction], strict=True):
                key = f"{name}_l{layer}" + ("_reverse" if direction else "")
                assert_close(np.asarray(grad), fastseq_grads[key], dtype, f"jax {cell} d{key}")
