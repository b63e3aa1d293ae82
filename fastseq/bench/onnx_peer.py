"""ONNX Runtime as a peer of ``fastseq bench`` (inference only): the usual engine for
deploying RNN inference.

The layer is the graph ``torch.onnx.export`` gives for ``torch.nn.LSTM`` / ``GRU`` / ``RNN``:
one ONNX ``LSTM`` / ``GRU`` (``linear_before_reset=1``, torch's GRU) / ``RNN`` node per layer,
both directions in one node, followed by a ``Squeeze`` (one direction) or a ``Transpose``
and ``Reshape`` (two) to the (T, N, D*H) layout the next layer reads. Random lengths go in
the nodes' ``sequence_lens`` input (ONNX's own variable lengths, no packing). A stream is a
one-step graph run once per step, the state fed back as ``initial_h`` (and ``initial_c``).
"""

from __future__ import annotations

import numba
import numpy as np

from fastseq.bench.peers import direction_weights, require
from fastseq.registry import CELLS

#: ONNX operator per cell.
OPS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
#: ONNX's gate blocks as torch's block indices: LSTM (i, o, f, c) from torch's (i, f, g, o),
#: GRU (z, r, h) from torch's (r, z, n).
GATE_ORDER = {"rnn": (0,), "lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}
OPSET = 17
#: A stream's state inputs and outputs of the one-step graph (h; the LSTM's h and c).
STATE_INPUTS = ("initial_h", "initial_c")
STATE_OUTPUTS = ("Y_h", "Y_c")


def onnx_gates(cell, w):
    """A torch-ordered weight (G*H, K) or bias (G*H,) in ONNX's gate order."""
    blocks = np.split(w, CELLS[cell].gates)
    return np.concatenate([blocks[k] for k in GATE_ORDER[cell]])


class OnnxRuntimePeer:
    """The same model as an ONNX graph in an ONNX Runtime CPU session (weights copied from
    fastseq; ``threads`` intra-op threads, default numba's thread count)."""

    name = "onnxruntime"

    def __init__(self, case, module, inputs, threads=None):
        require("onnxruntime")
        import onnx
        import onnxruntime

        self.onnx, self.case, self.inputs = onnx, case, inputs
        self.note = ""
        self.session = None
        if case.mode == "train":
            self.note = "onnxruntime runs inference only"
            return
        if case.dtype != "float32":  # RNN: no kernel; LSTM: "does not support double yet"
            self.note = "onnxruntime's CPU RNN kernels are float32 only"
            return
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or numba.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # ORT's threads spin for work during a run (its default) but stop when the run
        # returns: left spinning, they took one of the 2 cores from the next fastseq call
        # (LSTM N=64, T=100, H=256 forward: 32-35 ms right after an ORT run against 16-18 ms
        # alone; ORT's own time 21.7-22.7 ms alone either way; Zen 5, 2 cores).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        params = module.state_dict()
        model = self._stream_model(params) if case.mode == "stream" else self._layer_model(params)
        self.session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def _tensor(self, name, array):
        return self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)

    def _elem_type(self):
        return self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.case.dtype))

    def _node_weights(self, ws, suffix):
        """Initializers W (D, G*H, K), R (D, G*H, H), B (D, 2*G*H) of one node from its
        directions' (w_ih, w_hh, b_ih, b_hh) (``peers.direction_weights``)."""
        cell = self.case.cell
        w = np.stack([onnx_gates(cell, w_ih) for w_ih, _, _, _ in ws])
        r = np.stack([onnx_gates(cell, w_hh) for _, w_hh, _, _ in ws])
        b = np.stack(
            [np.concatenate([onnx_gates(cell, b_ih), onnx_gates(cell, b_hh)]) for _, _, b_ih, b_hh in ws]
        )
        return [self._tensor(f"W{suffix}", w), self._tensor(f"R{suffix}", r), self._tensor(f"B{suffix}", b)]

    def _node(self, inputs, outputs, bidirectional=False):
        attrs = {"hidden_size": self.case.hidden_size}
        if bidirectional:
            attrs["direction"] = "bidirectional"
        if self.case.cell == "gru":
            attrs["linear_before_reset"] = 1
        return self.onnx.helper.make_node(OPS[self.case.cell], inputs, outputs, **attrs)

    def _model(self, nodes, inputs, outputs, initializers):
        helper = self.onnx.helper
        graph = helper.make_graph(nodes, "fastseq_peer", inputs, outputs, initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])

    def _layer_model(self, params):
        """X (T, N, C) [, sequence_lens (N,) int32] -> Y (T, N, D*H)."""
        helper, case = self.onnx.helper, self.case
        elem, dirs = self._elem_type(), case.directions
        inputs = [helper.make_tensor_value_info("X", elem, [case.steps, case.batch, case.input_size])]
        lengths = ""
        if self.inputs.lengths is not None:
            lengths = "sequence_lens"
            inputs.append(helper.make_tensor_value_info(lengths, self.onnx.TensorProto.INT32, [case.batch]))
        nodes, inits = [], [self._tensor("squeeze_axes", np.array([1], np.int64)),
                            self._tensor("merged_shape", np.array([0, 0, -1], np.int64))]  # fmt: skip
        layer_in = "X"
        for k in range(case.layers):
            inits += self._node_weights([direction_weights(params, k, d) for d in range(dirs)], k)
            y, out = f"Y{k}", f"out{k}"
            nodes.append(self._node([layer_in, f"W{k}", f"R{k}", f"B{k}", lengths], [y], dirs == 2))
            if dirs == 1:  # (T, 1, N, H) -> (T, N, H)
                nodes.append(helper.make_node("Squeeze", [y, "squeeze_axes"], [out]))
            else:  # (T, 2, N, H) -> (T, N, 2, H) -> (T, N, 2H)
                nodes.append(helper.make_node("Transpose", [y], [f"t{k}"], perm=[0, 2, 1, 3]))
                nodes.append(helper.make_node("Reshape", [f"t{k}", "merged_shape"], [out]))
            layer_in = out
        outputs = [helper.make_tensor_value_info(layer_in, elem, None)]
        return self._model(nodes, inputs, outputs, inits)

    def _stream_model(self, params):
        """One step of a cell: X (1, N, C), initial_h (1, N, H) [, initial_c] -> Y_h [, Y_c]."""
        helper, case = self.onnx.helper, self.case
        elem, n, hd = self._elem_type(), case.batch, case.hidden_size
        states = STATE_INPUTS[: CELLS[case.cell].n_states]
        inputs = [helper.make_tensor_value_info("X", elem, [1, n, case.input_size])]
        inputs += [helper.make_tensor_value_info(s, elem, [1, n, hd]) for s in states]
        finals = STATE_OUTPUTS[: len(states)]
        node_inputs = ["X", "W", "R", "B", "", *states]
        nodes = [self._node(node_inputs, ["", *finals])]  # "": no Y (the same as Y_h for one step)
        outputs = [helper.make_tensor_value_info(f, elem, None) for f in finals]
        return self._model(nodes, inputs, outputs, self._node_weights([direction_weights(params)], ""))

    def runner(self):
        if self.session is None:
            return None
        session, case, x = self.session, self.case, self.inputs.x
        if case.mode == "stream":
            zeros = np.zeros((1, case.batch, case.hidden_size), x.dtype)
            names = list(STATE_OUTPUTS[: CELLS[case.cell].n_states])
            state_names = STATE_INPUTS[: len(names)]

            def stream():
                states = [zeros] * len(names)
                for t in range(x.shape[0]):
                    feeds = {"X": x[t : t + 1], **dict(zip(state_names, states, strict=True))}
                    states = session.run(names, feeds)
                return states[0][0]

            return stream
        feeds = {"X": x}
        if self.inputs.lengths is not None:
            feeds["sequence_lens"] = self.inputs.lengths.astype(np.int32)
        return lambda: session.run(None, feeds)[0]
