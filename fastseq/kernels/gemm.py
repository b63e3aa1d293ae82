"""A packed-panel GEMM for the per-step recurrent products, with a register-blocked micro-kernel.

Every time step multiplies the few state rows of a batch chunk (``n`` <= N/K rows) by the
same recurrent weights. BLAS re-packs the weights on every such call; here they are packed
once per kernel call into column panels, and each step runs a register-blocked
micro-kernel over them:

    panels (P, K, NR)   B (K, M) split into P = ceil(M / NR) panels of NR columns,
                        zero-padded; panel p holds B[:, p*NR:(p+1)*NR], row k contiguous.

The micro-kernel (:func:`_tile`) keeps an MR x NR block of the product in MR * VECTORS
vector registers (NR = VECTORS vectors) and, per k, loads VECTORS vectors of the panel and
broadcasts MR values of ``a``. Vector width, VECTORS and MR follow the CPU numba compiles
for, so that the block fits the register file: 64-byte vectors (zmm), 8 x 2 with AVX-512;
32-byte vectors (ymm), 4 x 3 with AVX2. It is written in LLVM IR (a numba intrinsic)
because numba's loops leave such a block in memory; explicit vector values and
``llvm.fma`` give one FMA instruction per vector and term. A block's last rows, when
fewer than a tile, run MR/2 at a time on shorter tiles over 2 or 4 panels
(:func:`few_rows`), each group of panels right after its full tiles; with AVX-512, 1-3
rows left over join the last full tile instead (:func:`tall_tile`). A transposed ``a``
(dG^T of the weight gradients) is copied into MR-row tiles first when the product is wide
(:data:`PACK_A_COLUMNS`, per kind of CPU) or its stride aliases in L1
(:data:`ALIAS_STRIDE_BYTES`). Passes of :data:`PREFETCH_MIN_K` or more rows prefetch the
panel ahead (:func:`far_tiles`).
Measured rates against BLAS on both kinds of CPU: docs/performance.md.

The sums run over k in order, one FMA per term: results differ from BLAS in the last bits,
and do not depend on the number of threads (each call is serial).
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastseq._jit import jit
from fastseq.kernels.refs import any_layout


def _target_features():
    """The CPU features numba compiles for (its config's, else the host's): {"avx2", ...}."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    flags = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return {flag[1:] for flag in flags.split(",") if flag.startswith("+")}


def _target_cpu():
    """The CPU numba compiles for (its config's, else the host's), as LLVM names it:
    "znver5", "sapphirerapids", ..."""
    from llvmlite import binding
    from numba.core import config

    return config.CPU_NAME or binding.get_host_cpu_name()


#: Whether numba compiles for AMD's Zen (LLVM's "znver*"): constants measured apart there
#: (FEW_ROWS_ALONE_TILE_K, PACK_A_COLUMNS, ``_threads.L2_SPLIT_SHARES``) take its values.
ON_ZEN = _target_cpu().startswith("znver")


#: ``accumulate`` for the products' callers (:func:`gemm_packed`, :func:`gemm_large`, ...): a
#: ``False`` or ``True`` written in a jitted call reaches the callee as a literal, and numba
#: compiles the callee once more for it; these numpy bools are plain booleans to numba. An
#: LSTM's first training step compiled gemm_packed 4 times, copied_tiles_products 4 times,
#: gemm_large 3 times before (float32, one dtype, results bitwise the same).
OVERWRITE, ACCUMULATE = np.False_, np.True_

#: Bytes per vector register the micro-kernel computes in: 64 (zmm) with AVX-512, 32 (ymm)
#: with AVX, 16 (xmm) otherwise. Numba compiles for this machine's CPU, and its cache is
#: keyed by that CPU, so a cached kernel always matches these constants.
VECTOR_BYTES = 64 if "avx512f" in _target_features() else 32 if "avx" in _target_features() else 16
#: Vectors per block row (NR = VECTORS * VECTOR_BYTES / itemsize columns) and rows of the
#: block (MR): MR * VECTORS accumulators, VECTORS panel vectors and a broadcast must fit the
#: register file (32 zmm with AVX-512, else 16). Measured (float32, one thread, 32 x 256 x
#: 1024 and 32 x 1024 x 4096): 8 x 2 best of MR 6, 8, 12, 14 with AVX-512 (Zen 5); with
#: AVX2 (Zen 3) 4 x 3 (12 accumulators; 32-row chunks split into whole tiles) at 0.85-1.4x
#: OpenBLAS's single-thread rate, 6 x 2 at 0.73-1.3x, 3 x 4 at 0.4-0.7x.
VECTORS, MR = (2, 8) if VECTOR_BYTES == 64 else (3, 4)


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _tile_intrinsic(rows_max, panels, prefetch=0):
    """The micro-kernel for tiles of up to ``rows_max`` rows and ``panels`` panels,
    prefetching B ``prefetch`` rows of the panel ahead (0: none; see :func:`_tile_typing`)."""

    @intrinsic
    def tile(typingctx, k, a, a_row, a_col, b, b_off, b_step, c, c_row, mr, nr, accumulate):
        return _tile_typing(rows_max, panels, prefetch, a, b, c)

    return tile


def _tile_typing(MR, PANELS, PREFETCH, a, b, c):
    """c[i*c_row + q*NR + j] (+)= sum_k a[i*a_row + k*a_col] * b[b_off + q*b_step + k*NR + j],
    i < mr, q*NR + j < nr, q < PANELS, j < NR.

    The signature and code of a tile of up to MR rows by PANELS panels: a, b, c: arrays of
    one float dtype, addressed from their data pointers in elements (strides in elements); b
    holds panels (rows of NR values, zero-padded) b_step apart. 1 <= mr <= MR, 1 <= nr <=
    PANELS*NR, and all PANELS panels exist; rows i >= mr are computed from row 0 and not
    stored; columns >= nr of c are neither loaded nor stored. PREFETCH > 0: at each k, the
    panel's row k + PREFETCH is prefetched into L1 (a hint: past the panel's end it reads
    nothing).
    """
    if not (isinstance(a.dtype, types.Float) and a.dtype == b.dtype == c.dtype):
        return None
    intp = types.intp
    sig = types.void(intp, a, intp, intp, b, intp, intp, c, intp, intp, intp, types.boolean)
    VECS = VECTORS * PANELS  # accumulators per row

    def codegen(context, builder, signature, args):
        k, av, a_row, a_col, bv, b_off, b_step, cv, c_row, mr, nr, acc_flag = args
        dtype = signature.args[1].dtype
        fty = context.get_value_type(dtype)
        width = VECTOR_BYTES // (dtype.bitwidth // 8)
        vty = ir.VectorType(fty, width)
        pty = ir.PointerType(vty)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        suffix = f"v{width}f{dtype.bitwidth}"
        mty = ir.VectorType(ir.IntType(1), width)
        module = builder.module
        fma = _declare(module, f"llvm.fma.{suffix}", vty, [vty, vty, vty])
        masked_load = _declare(module, f"llvm.masked.load.{suffix}.p0", vty, [pty, i32, mty, vty])
        masked_store = _declare(module, f"llvm.masked.store.{suffix}.p0", ir.VoidType(), [vty, pty, i32, mty])

        def data(index, value):
            return cgutils.create_struct_proxy(signature.args[index])(context, builder, value=value).data

        a_ptr, b_ptr, c_ptr = data(1, av), data(4, bv), data(7, cv)

        def const(v):
            return ir.Constant(i64, v)

        def splat(value, vector_type):
            one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(
                one,
                ir.Constant(vector_type, ir.Undefined),
                ir.Constant(ir.VectorType(i32, width), [0] * width),
            )

        zero = ir.Constant(vty, None)
        nr_vec = splat(nr, ir.VectorType(i64, width))
        masks = [
            builder.icmp_signed(
                "<", ir.Constant(ir.VectorType(i64, width), [v * width + j for j in range(width)]), nr_vec
            )
            for v in range(VECS)
        ]
        align = ir.Constant(i32, dtype.bitwidth // 8)
        row_start, c_start = [], []  # rows i >= mr read and prefetch row 0
        for i in range(MR):
            used = builder.select(builder.icmp_signed("<", const(i), mr), const(i), const(0))
            row_start.append(builder.mul(used, a_row))
            c_start.append(builder.mul(used, c_row))
        # Prefetch the tile's output lines for writing before the k loop, so that they are in
        # cache when the tile stores: an output far larger than the caches (the projection of
        # every row of a chunk in training, dx) otherwise stalls each tile on its stores.
        # Measured (float32, one thread, Zen 5, x (R, H) @ W^T in blocks of 512 rows into an
        # (R, 4H) output, GFLOP/s, without / with): R = 3200, H = 256: 161-165 / 202-214;
        # R = 6400 in one call: 161-167 / 222; R = 3200, H = 512: 169 / 181; an output
        # that stays in cache (512 rows, or a step's 8-32 rows): the same.
        i8_ptr = ir.PointerType(ir.IntType(8))
        prefetch = _declare(module, "llvm.prefetch.p0", ir.VoidType(), [i8_ptr, i32, i32, i32])
        read, write = ir.Constant(i32, 0), ir.Constant(i32, 1)
        keep, data = ir.Constant(i32, 3), ir.Constant(i32, 1)
        for i in range(MR):
            for v in range(VECS):
                ptr = builder.bitcast(builder.gep(c_ptr, [builder.add(c_start[i], const(v * width))]), i8_ptr)
                builder.call(prefetch, [ptr, write, keep, data])
        entry = builder.basic_block
        loop = builder.function.append_basic_block("tile.loop")
        done = builder.function.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", k, const(0)), loop, done)

        builder.position_at_end(loop)
        kk = builder.phi(i64)
        acc = [[builder.phi(vty) for _ in range(VECS)] for _ in range(MR)]
        b_k = builder.add(b_off, builder.mul(kk, const(VECTORS * width)))
        b_q = [builder.add(b_k, builder.mul(b_step, const(q))) for q in range(PANELS)]
        panel = [  # zero-padded panels: full vectors are always in bounds
            builder.load(
                builder.bitcast(builder.gep(b_ptr, [builder.add(b_q[q], const(v * width))]), pty),
                align=dtype.bitwidth // 8,
            )
            for q in range(PANELS)
            for v in range(VECTORS)
        ]
        line = 64 // (dtype.bitwidth // 8)  # values per cache line
        for q in range(PANELS if PREFETCH else 0):
            for v in range(0, VECTORS * width, line):
                ahead = builder.gep(b_ptr, [builder.add(b_q[q], const(PREFETCH * VECTORS * width + v))])
                builder.call(prefetch, [builder.bitcast(ahead, i8_ptr), read, keep, data])
        k_col = builder.mul(kk, a_col)
        new = []
        for i in range(MR):
            a_ik = splat(builder.load(builder.gep(a_ptr, [builder.add(row_start[i], k_col)])), vty)
            new.append([builder.call(fma, [a_ik, panel[v], acc[i][v]]) for v in range(VECS)])
        k_next = builder.add(kk, const(1))
        body_end = builder.basic_block
        kk.add_incoming(const(0), entry)
        kk.add_incoming(k_next, body_end)
        for i in range(MR):
            for v in range(VECS):
                acc[i][v].add_incoming(zero, entry)
                acc[i][v].add_incoming(new[i][v], body_end)
        builder.cbranch(builder.icmp_signed("<", k_next, k), loop, done)

        builder.position_at_end(done)
        total = []
        for i in range(MR):
            row = []
            for v in range(VECS):
                phi = builder.phi(vty)
                phi.add_incoming(zero, entry)
                phi.add_incoming(new[i][v], body_end)
                row.append(phi)
            total.append(row)
        for i in range(MR):
            with cgutils.if_likely(builder, builder.icmp_signed("<", const(i), mr)):
                for v in range(VECS):
                    ptr = builder.bitcast(
                        builder.gep(c_ptr, [builder.add(c_start[i], const(v * width))]), pty
                    )
                    old = builder.call(masked_load, [ptr, align, masks[v], zero])
                    value = builder.select(acc_flag, builder.fadd(total[i][v], old), total[i][v])
                    builder.call(masked_store, [value, ptr, align, masks[v]])
        return context.get_dummy_value()

    return sig, codegen


#: The micro-kernel: tiles of up to MR rows (see :func:`_tile_typing`).
_tile = _tile_intrinsic(MR, 1)
#: Depth of a pass (kc) from which the full tiles prefetch their panel PREFETCH_K rows ahead
#: into L1 (PREFETCH_K * VECTORS * VECTOR_BYTES = 4 KB with AVX-512; :func:`far_tiles`). A
#: pass of K_BLOCK_ROWS (1024) panel rows is 128 KB, past L1: each tile streams its panel
#: from L2 (or L3: W_hh at H=1024 is 16 MB), and the hardware prefetchers left the tile
#: waiting on those loads (a profile put the hottest samples on the loop's panel loads).
#: Measured (float32, Intel Xeon, both threads, a chunk's products, GFLOP/s, none /
#: prefetched 32 rows ahead): H=1024 per-step products (32 x 1024 x 4096, 32 x 4096 x
#: 1024) 220-240 / 261-286, projection and dx (1600 rows) 237-248 / 262-274, weight
#: gradients (tiles copied, 1600 deep) 221-227 / 233-243; 16 rows ahead 261-275, 24-64 as
#: 32, into L2 only 248-261; H=256 dx and dG @ W_hh (K = 1024) 273-279 / 293-306. At K = 64
#: and 256 the panel stays in cache and prefetching gained nothing or lost up to 10%.
#: Layers (targets, two processes each way): H=1024 0.80-0.91 of the time, H=256 0.89-0.96.
#: On Zen 5 neutral (twenty-sixth session, target layers, none / prefetched, five processes
#: each way: 0.97-1.02).
PREFETCH_K = 32
PREFETCH_MIN_K = 512
_tile_far = _tile_intrinsic(MR, 1, PREFETCH_K)
#: Rows up to which the last tile of a block runs as a half-height tile: a full tile computes
#: MR rows whatever ``mr`` is, so a step of a few rows (variable lengths, chunks whose rows
#: are not a multiple of MR, a batch of one) would pay for MR. The short tiles span 2 or 4
#: panels, so that they keep MR * VECTORS accumulators: fewer would leave the FMA units
#: waiting on each other's latency (see :func:`few_rows`).
HALF_MR = MR // 2
QUARTER_MR = max(1, MR // 4)
#: Panels of the half-height tile: 2 with AVX-512 (16 accumulators, 4 panel vectors and a
#: broadcast in 32 registers); 1 with AVX2, whose 16 registers do not hold 2 rows x 2
#: panels x 3 vectors and their operands: compiled for Haswell on Zen 5, one thread,
#: (H, 4H) packed, 2 rows: H=128 2.83 us on one panel, 4.26 on two; H=256 11.3 / 16.7.
#: (One row over 4 panels still won there: 2.95 -> 2.08 and 11.1 -> 7.4 us.)
HALF_PANELS = 2 if VECTOR_BYTES == 64 else 1
_tile_half = _tile_intrinsic(HALF_MR, 1)
_tile_half_wide = _tile_intrinsic(HALF_MR, HALF_PANELS) if HALF_PANELS > 1 else _tile_half
_tile_quarter_wide = _tile_intrinsic(QUARTER_MR, 4)
#: One or two rows over the 2-3 panels left after groups of 4 (:func:`few_rows`).
_tile_quarter_pair = _tile_intrinsic(QUARTER_MR, HALF_PANELS) if HALF_PANELS > 1 else _tile_half
#: Panels per group in :func:`gemm_packed` when a block of rows ends in rows too few for a
#: full tile: the group passes over the full tiles, then over those rows (:func:`few_rows`,
#: whose tiles span up to 4 panels) while in cache, instead of all panels streaming from
#: memory a second time for them. Measured (float32, Zen 5, layers in process, paired A/B
#: medians of 31 rounds): N=20 (two chunks of 8 + 2 rows), T=100, LSTM H=512 forward 0.94,
#: training 0.93; RNN H=1024 forward 0.92; GRU H=512 forward 0.92; LSTM N=12, T=50, H=512
#: training 0.97 (with FEW_ROWS_SPLIT_K); random lengths at N=64, T=50, H=1024 0.98-1.00;
#: shapes without such rows unchanged. Results are bitwise the same.
FEW_ROWS_PANELS = 4
#: Depth of a pass from which a block's last MR/2 + 1 to MR - 2 rows run as MR/2 rows plus
#: the rest on :func:`few_rows`' tiles (the same FMAs per vector as a full tile) instead of
#: one more full tile computing MR rows. Measured (float32, one thread, Zen 5, a step
#: product of n rows by W_hh^T's panels, time per row against n = 32): H = 1024, n = 13 /
#: 14: 1.23 / 1.14 as a full tile, 1.11 / 1.04 split; LSTM H = 256 (K = 256): 1.30 / 1.25,
#: 1.11 / 1.04; but H = 64 (K = 64): 1.30 / 1.23, 1.49 / 1.37. MR - 1 rows lost either
#: way (n = 7 at H = 1024: 1.16 full, 1.25 split).
FEW_ROWS_SPLIT_K = 256
#: ... except for a block of only those rows (no full tile before them: a step of 5-7 rows)
#: from this depth on, which runs as one full tile: split, its two passes read each panel
#: twice, and at K = 1024 a panel (128 KB) is not in L1 for the second. Measured (float32,
#: Intel Xeon, layers in eval forward, both threads, chunks of 5-6 rows, time full tile /
#: split, best of five, two processes each way): H=1024, T=50: RNN N=10 0.83-0.88, N=12
#: 0.84-0.86; GRU N=10 0.86-0.87, N=12 0.84; LSTM N=12 0.83-0.87; training steps (the
#: backward's dG @ W_hh as well) RNN N=12 0.82-0.85, GRU N=10 0.85-0.86, LSTM N=12 (T=30)
#: 0.86-0.87; outputs and gradients bitwise the same. With every such split
#: off (not kept): K=512 (RNN N=12, T=100) 1.03-1.04 and K=256 (GRU N=12, T=100)
#: 1.04-1.06, and 13-14 rows (a full tile, then 5-6) at H=1024 0.97-1.05. Not on AMD's
#: Zen, where the split ran faster (float32, Zen 5, layers at T=50, H=1024, chunks of 5-6
#: rows, split / full tile, seven processes each way, twenty-sixth session): forward GRU
#: N=10 0.959, N=12 0.959, RNN N=10 0.946, LSTM N=10 0.961; RNN training N=12 0.980.
FEW_ROWS_ALONE_TILE_K = 1 << 62 if ON_ZEN else 1024
#: Rows up to which a block's last full tile grows (a tall tile of MR + 1 to MR + TALL_EXTRA
#: rows, its own micro-kernel each) to take rows left over after the full tiles and any
#: HALF_MR-row tile, instead of a pass over the panels for 1-3 rows on few_rows' tiles (4
#: loads per 4 FMAs, from L2). With AVX-512 only: MR + 3 rows of 2 vectors fit the 32
#: registers; AVX2's 16 do not hold one more row. Measured (float32, both threads, each a
#: step product of n rows by (K, M) panels, us, tall tile / MR + few_rows): K = 1024, M =
#: 4096, n = 9: 365 / 450, 10: 404 / 447, 11: 440 / 487; K = 256, M = 1024: 20.7 / 26.5,
#: 22.4 / 27.0, 24.4 / 29.7; per row as fast as a full tile or faster. Tiles of 13-14 rows
#: lost at K = 1024 (674 / 591 us at 14), and so did two 11-row tiles in a row (1171 us for
#: 22 rows against 817), so only a block's last tile grows. Layers (A/B medians, new / MR +
#: few_rows): forward, full length, chunks of 9-13 rows: LSTM N=20, T=50, H=1024 0.932, GRU
#: N=26, T=100, H=256 0.964, RNN N=18, H=512 0.954; training LSTM N=20, H=512 0.971, GRU
#: N=26 0.972; random lengths 0.99-1.00; chunks of 32 rows unchanged. Compiling
#: ``gemm_packed`` takes 0.3-0.4 s longer (2.9-3.0 s against 2.5-2.7, one signature).
TALL_EXTRA = 3 if VECTOR_BYTES == 64 else 0


def _tall_tiles(prefetch):
    """The tiles of MR + 1, MR + 2 and MR + 3 rows (each MR + 1 where TALL_EXTRA is 0: never
    called then), prefetching ``prefetch`` panel rows ahead (:func:`_tile_intrinsic`)."""
    tiles = [_tile_intrinsic(MR + extra, 1, prefetch) for extra in range(1, max(TALL_EXTRA, 1) + 1)]
    return tiles[0], tiles[min(1, len(tiles) - 1)], tiles[min(2, len(tiles) - 1)]


_tile_tall1, _tile_tall2, _tile_tall3 = _tall_tiles(0)
#: The tall tiles that prefetch their panel (:func:`far_tiles`).
_tile_tall_far1, _tile_tall_far2, _tile_tall_far3 = _tall_tiles(PREFETCH_K)


def panel_columns(dtype):
    """NR: columns per panel for ``dtype`` (VECTORS vectors of VECTOR_BYTES), in Python
    (workspace sizes); :func:`panel_width` in kernels."""
    return VECTORS * VECTOR_BYTES // np.dtype(dtype).itemsize


@jit
def panel_width(w):
    """NR: columns per panel for w's dtype (:func:`panel_columns`) in a kernel."""
    return VECTORS * VECTOR_BYTES // w.itemsize


@jit
def pack_transposed(w):
    """Panels (P, K, NR) of B = w.T, for w (M, K): products ``a @ w.T``."""
    panels = _empty_panels(w)
    if reads_b_rows(w):
        pack_b_rows(w.T, 0, w.shape[1], panels)
        return panels
    for p in range(panels.shape[0]):
        pack_panel(w, p, panels)
    return panels


@jit(inline=True)
def reads_b_rows(w):
    """Whether B = w.T has contiguous rows (w a transposed view of a row-major b: x and h_prev
    in the weight gradients, W_hh and W_ih as the backward's B): then :func:`pack_b_rows`
    fills every panel from each row of B in one pass, instead of a pass over B per panel."""
    return w.strides[0] == w.itemsize and w.strides[1] != w.itemsize


@jit
def pack_b_rows(b, k0, k1, panels):
    """Rows k0..k1-1 of every panel (P, K, NR) of b (K, M), each row of b read whole once
    (columns past M zero in the last panel). A panel at a time, each pass read NR values of
    every row of b, rows a whole row apart. Measured (float32, Intel Xeon, one thread, b
    out of cache, us, a panel at a time / by rows): 3200 x 256 419 / 286; 6400 x 256 875 /
    498; 1600 x 1024 647 / 506; 1600 x 512 358 / 254; 3200 x 64 85 / 78. Training steps
    (both threads, medians of processes alternating new / old): RNN N=64, T=100, H=256
    0.973 (ten each way); GRU and LSTM there 1.01 (noise: 0.97-1.07 between processes);
    H=1024 0.99-1.00; RNN N=32, T=100, H=64 0.99. Results bitwise the same."""
    m = b.shape[1]
    nr = panels.shape[2]
    full = m // nr
    rest = m - full * nr
    for kk in range(k0, k1):
        src = b[kk]
        for p in range(full):
            dst = panels[p, kk]
            for jj in range(nr):
                dst[jj] = src[p * nr + jj]
        if rest:
            dst = panels[full, kk]
            for jj in range(nr):
                dst[jj] = src[full * nr + jj] if jj < rest else src.dtype.type(0)


#: Bytes of w up to which :func:`pack_transposed_parallel` packs on the calling thread: a
#: parallel region costs more than it saves on small weights. Measured (float32, Zen 5, us
#: per call from Python, serial / across both threads): 64 x 64 (16 KB) 1.88 / 2.67; 128 x
#: 64 3.06 / 3.26; 192 x 64 (48 KB) 4.31 / 3.92; 128 x 128 5.21 / 4.56; 512 x 128 19.1 / 11.3.
SERIAL_PACK_BYTES = 1 << 15


@jit(parallel=True)
def pack_transposed_parallel(w):
    """:func:`pack_transposed`, its panels shared among numba's threads (up to
    SERIAL_PACK_BYTES of w, packed on the calling thread): for the weights packed once per
    kernel call, outside any ``prange`` (a numba region inside another region would run
    serially at best)."""
    if w.nbytes <= SERIAL_PACK_BYTES:
        return pack_transposed(w)
    panels = _empty_panels(w)
    if reads_b_rows(w):  # blocks of B's rows across the threads
        k = w.shape[1]
        blocks = (k + PACK_BLOCK_ROWS - 1) // PACK_BLOCK_ROWS
        for blk in prange(blocks):
            k0 = np.int64(blk) * PACK_BLOCK_ROWS
            pack_b_rows(w.T, k0, min(k, k0 + PACK_BLOCK_ROWS), panels)
        return panels
    for p in prange(panels.shape[0]):
        pack_panel(w, np.int64(p), panels)  # prange's index is unsigned: one signature, not two
    return panels


#: Rows of B per block when :func:`pack_transposed_parallel` spreads :func:`pack_b_rows`
#: over the threads.
PACK_BLOCK_ROWS = 128


#: Bytes to which :func:`aligned_empty` aligns panels: the micro-kernel loads whole vectors
#: of B from each panel row, and numba's ``np.empty`` gives 32-byte alignment (arrays under
#: about 800 KB started 32 bytes into a cache line in most of 200 allocations), where every
#: zmm load spans two lines. Measured (float32, one thread, Intel Xeon, ``gemm_packed``,
#: GFLOP/s, panels and a at 0 / 32 bytes into a line, best of three runs each): 64 x 256 x
#: 1024 165-171 / 148-162; 32 x 128 x 512 166 / 154; 256 x 256 x 1024 162-166 / 149-151;
#: 32 x 1024 x 4096 118-129 / 104-110; 8 x 512 x 2048 109-111 / 107-108.
ALIGN_BYTES = 64


@jit
def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array of ``shape`` (a tuple) starting ALIGN_BYTES
    aligned, a view of a slightly larger one."""
    size = 1
    for extent in shape:
        size *= extent
    flat = np.empty(size + ALIGN_BYTES, dtype)
    start = (-flat.ctypes.data) % ALIGN_BYTES // flat.itemsize
    return flat[start : start + size].reshape(shape)


@jit
def _empty_panels(w):
    """Uninitialised panels (P, K, NR) for B = w.T, w (M, K), ALIGN_BYTES aligned."""
    m, k = w.shape
    nr = panel_width(w)
    return aligned_empty(((m + nr - 1) // nr, k, nr), w.dtype)


@jit
def pack_panel(w, p, panels):
    """Fill panel p of B = w.T (zero-padded past w's last row)."""
    m, k = w.shape
    nr = panels.shape[2]
    # Read w along its contiguous axis: rows of a row-major w (W_hh for h @ W_hh^T; 2048 x 512
    # float32 packed in 0.73 ms this way, 1.22 ms column-wise), columns of w = b.T, a panel
    # row at a time (np.empty and whole rows: 0.084 ms for a 3200 x 256 b against 0.350
    # with np.zeros and a loop over the columns present, Zen 5).
    rows_contiguous = w.strides[1] == w.itemsize
    b = w.T
    cols = min(nr, m - p * nr)
    if cols < nr:
        panels[p].fill(0)
    if rows_contiguous:
        # 8 x 8 blocks with constant trip counts (LLVM unrolls them): float32, one thread,
        # Zen 5, ns per element, whole rows of w / these blocks: K = 256 0.27 / 0.28-0.30,
        # K = 512 0.52 / 0.28, K = 1024 0.82 / 0.33 (a panel of K rows left L1 column by
        # column); blocks with loop bounds in variables ran 0.47-0.62.
        for j0 in range(0, cols, 8):
            for k0 in range(0, k, 8):
                if j0 + 8 <= cols and k0 + 8 <= k:
                    for jj in range(8):
                        row = w[p * nr + j0 + jj, k0 : k0 + 8]
                        for kk in range(8):
                            panels[p, k0 + kk, j0 + jj] = row[kk]
                else:
                    for jj in range(j0, min(cols, j0 + 8)):
                        for kk in range(k0, min(k, k0 + 8)):
                            panels[p, kk, jj] = w[p * nr + jj, kk]
    elif cols == nr:
        for kk in range(k):
            src = b[kk, p * nr : p * nr + nr]
            dst = panels[p, kk]
            for jj in range(nr):
                dst[jj] = src[jj]
    else:
        for kk in range(k):
            for jj in range(cols):
                panels[p, kk, jj] = b[kk, p * nr + jj]


#: Rows of ``a`` per block in :func:`gemm_packed`, for K < 512 and K >= 512: every panel
#: passes over a block of rows. Measured (float32, one thread, 3200 rows, Zen 5): 96 rows best at
#: K = 64 (245 vs 149 GFLOP/s with 256), 256 rows best at K = 1024 (216 vs 178 with 96).
ROW_BLOCK_SHORT_K = 96
ROW_BLOCK_LONG_K = 256
#: Depth of one pass over K, for ``a`` with contiguous rows and for a transposed ``a`` (the
#: weight gradients' dG^T, whose column walk strides over pages: a short pass keeps them in
#: the TLB). Measured (float32, one thread, Zen 3, best of 15 interleaved): 32 x 1024 x
#: 4096 ran 79 / 74 / 71 GFLOP/s with 1024 / 512 / 256, dG^T (1024 x 1600) x 1024 ran 58 /
#: 63 / 72.
K_BLOCK_ROWS = 1024
K_BLOCK_TRANSPOSED = 256
#: A transposed ``a`` (a column stride, not 1: dG^T in the weight gradients) is copied into
#: MR-row tiles (:func:`pack_rows`) when the product has at least PACK_A_COLUMNS columns (so
#: that each copied block serves at least 16 panels), and K is then passed over up to
#: K_BLOCK_PACKED deep. Measured (float32, one thread, Zen 5, dG^T @ x, 1600-3200 rows of
#: dG, interleaved, GFLOP/s, in place / copied with K in one pass): G*H x H = 4096 x 1024:
#: 197 / 210; 3072 x 1024: 207 / 228; 1024 x 1024: 184 / 220; 2048 x 512: 195 / 206;
#: 1024 x 256: 211 / 200; 256-768 x 256: 246-251 / 218-223; 256 x 64: 261 / 157. Passes
#: 1024 deep instead of whole ran 193-216 where whole ran 210-228; 128-512 deep, worse still.
#: That was before :func:`pack_rows` copied row by row (twice as fast, twentieth session).
#: Since, on the Intel Xeon (both threads, a chunk's weight-gradient products as the layers
#: call them, G*H x H over 1600-6400 rows of dG, time copied / in place): H=64 1.14-1.22
#: (LSTM 0.95-1.04); H=128 RNN 0.94-1.06, GRU 0.98-1.04, LSTM 0.78-0.94; H=192 RNN 0.99,
#: GRU 0.64, LSTM 0.72; H=256 RNN 1.01, GRU 0.87 (the LSTM copies already, ALIAS_STRIDE_BYTES);
#: H=320-384 0.70-0.94. So 192 columns on CPUs other than AMD's. On Zen 5, with the faster
#: copy (twenty-sixth session; training steps, five processes each way, 192 / 512 columns):
#: N=64, T=100, GRU H=192 1.13, LSTM H=192 1.12, GRU H=256 1.13, RNN H=256 1.10; T=50, GRU
#: H=320 1.07, LSTM H=384 1.04: copying loses there, and Zen keeps 512.
PACK_A_COLUMNS = 512 if ON_ZEN else 192
K_BLOCK_PACKED = 4096
#: A transposed ``a`` whose column stride is a multiple of ALIAS_STRIDE_BYTES is copied into
#: tiles at any width: each k of a tile then reads a line 4 KB past the last, all in one set
#: of the L1 cache (and of the TLB's pages), so the tile runs on misses. That is the LSTM's
#: dG^T at H=256 (rows of 4H = 1024 floats) in its weight gradients, whose outputs (C or H
#: = 256 columns) are under PACK_A_COLUMNS. Measured (float32, Intel Xeon, both threads,
#: an LSTM's two weight-gradient products per chunk of 3200 rows, H=256, GFLOP/s, in place /
#: copied): 121-161 / 200; LSTM training step at N=64, T=100 (A/B, six processes each way):
#: 0.944 of the time; 2 layers x 2 directions 0.921-0.950. Not for other strides: rows of
#: 2 KB (LSTM H=128) and 2.3 KB (GRU H=192) ran 1.07-1.10x slower copied (before the faster
#: copy; the GRU at H=192 now copies, from PACK_A_COLUMNS). On Zen 5 neutral (LSTM training
#: at H=256, N=32-64, T=50-100, in place / copied: 1.005-1.031; twenty-sixth session).
ALIAS_STRIDE_BYTES = 4096


@jit(inline=True)
def copies_a_tiles(a, m):
    """Whether a product of ``a`` (n, K) into m columns copies a's tiles first
    (:func:`copied_tiles_products`): a transposed ``a`` (a column stride, not 1), m >=
    PACK_A_COLUMNS or that stride a multiple of ALIAS_STRIDE_BYTES. The one rule for
    :func:`gemm_packed` and :func:`gemm_pair` (whose one copy must give what two
    ``gemm_packed`` calls give)."""
    stride = a.strides[1]
    return stride != a.itemsize and (m >= PACK_A_COLUMNS or stride % ALIAS_STRIDE_BYTES == 0)


@jit
def gemm_packed(a, panels, out, accumulate):
    """out (n, M) = a (n, K) @ B, or += when ``accumulate``; B (K, M) given as its panels
    (:func:`pack_transposed`, :func:`pack`).

    ``a`` may be any 2-D view (a transposed one included); ``out``'s rows must be
    contiguous (any row stride).
    """
    n, k = a.shape
    m = out.shape[1]
    nr = panels.shape[2]
    isz = a.itemsize
    a_row, a_col, c_row = a.strides[0] // isz, a.strides[1] // isz, out.strides[0] // isz
    if copies_a_tiles(a, m):
        copied_tiles_products(a, panels, out, panels[:0], out[:0], accumulate)
        return
    rows = ROW_BLOCK_LONG_K if k >= 512 else ROW_BLOCK_SHORT_K
    k_block = K_BLOCK_ROWS if a_col == 1 else K_BLOCK_TRANSPOSED
    if 0 < n <= HALF_MR and k <= k_block:
        # A step of 1-4 rows: the tiles the loops below would run (bitwise the same), in one
        # call without the block bookkeeping. Measured (float32, Zen 5, both threads, a step
        # product by W_hh^T's panels, ns, one call / the loops): K = M = 64: 1-2 rows 129-131
        # / 181-187, 3-4 rows 190-199 / 266-273; K = 64, M = 256: 504-697 / 618-834; K = 128,
        # M = 512: 2700-2960 / 2770-3280. Layers (A/B medians): forward RNN N=2, T=100, H=128
        # 0.976, GRU N=8, T=200, H=192 random lengths 0.983; training LSTM N=2, H=128 0.967.
        # (operands sliced, and k0 and accumulate not literals, as in the loop's call: the
        # types of that call, so that numba compiles few_rows once, not twice)
        few_rows(k, a[0:, 0:], a_row, a_col, panels, k, k * 0, out[0:, 0:], c_row, accumulate or k < 0)
        return
    for k0 in range(0, max(k, 1), k_block):
        kc = min(k_block, k - k0)
        add = accumulate or k0 > 0
        for b0 in range(0, n, rows):
            b1 = min(n, b0 + rows)
            last = (b1 - b0) % MR
            # the last full tile takes ``extra`` rows (a tall tile), HALF_MR rows after it
            # may run on few_rows' half-height tiles; MR - 1 rows left over at a short depth
            # run on one more full tile (K = 64: n = 15, 23, 31 ran 1.03-1.05x slower tall)
            tall_fits = b1 - b0 > MR and last % HALF_MR <= TALL_EXTRA
            extra = last % HALF_MR if tall_fits and (last < MR - 1 or kc >= FEW_ROWS_SPLIT_K) else 0
            if extra:
                body = b1 - last + extra if last > HALF_MR else b1
            else:
                alone = b1 - b0 < MR and kc >= FEW_ROWS_ALONE_TILE_K  # one full tile, masked
                body = (
                    b1
                    if last == MR - 1 or (last > HALF_MR and (kc < FEW_ROWS_SPLIT_K or alone))
                    else b1 - last
                )
            tall = body - MR - extra if extra else body  # full tiles b0..tall, the tall one tall..body
            # rows left after the full tiles (body..b1) run on few_rows, HALF_MR at a time,
            # each group of panels serving the full tiles and then those rows while in cache
            group = FEW_ROWS_PANELS if body < b1 else max(panels.shape[0], 1)  # 1: no columns
            for g0 in range(0, panels.shape[0], group):
                g1 = min(panels.shape[0], g0 + group)
                for p in range(g0, g1):
                    j0 = p * nr
                    if kc >= PREFETCH_MIN_K:
                        far_tiles(kc, a[b0:, k0:], 1, a_row, a_col, panels, (p * k + k0) * nr, out[b0:, j0:],
                                  c_row, tall - b0, b1 - b0, extra, min(nr, m - j0), add)  # fmt: skip
                        continue
                    for i0 in range(b0, tall, MR):
                        _tile(kc, a[i0:, k0:], a_row, a_col, panels, (p * k + k0) * nr, 0,
                              out[i0:, j0:], c_row, min(MR, b1 - i0), min(nr, m - j0), add)  # fmt: skip
                    if extra:
                        tall_tile(extra, kc, a[tall:, k0:], a_row, a_col, panels, (p * k + k0) * nr,
                                  out[tall:, j0:], c_row, min(nr, m - j0), add)  # fmt: skip
                for f0 in range(body, b1, HALF_MR):
                    few_rows(kc, a[f0:, k0:], a_row, a_col, panels[g0:g1], k, k0,
                             out[f0 : min(b1, f0 + HALF_MR), g0 * nr :], c_row, add)  # fmt: skip


@jit
def far_tiles(kc, a, row_step, a_row, a_col, panels, b_off, c, c_row, rows, n, extra, nr, accumulate):
    """The full tiles over rows 0..``rows`` of a block of n rows (MR at a time, the last
    min(MR, n - i) rows), then, when ``extra``, a tall tile of MR + extra rows (see
    :func:`tall_tile`) from row ``rows``, by one panel, on tiles that prefetch their panel
    ahead (see PREFETCH_MIN_K): the :func:`_tile` arguments, with a and c from the block's
    first row; row i of ``a`` starts at a[i * row_step] (1 for a 2-D a; kc for the copied
    tiles of :func:`pack_rows`, which have no tall tile). Its own function, not a second
    loop beside the tile loops of :func:`gemm_packed` (or inside :func:`tall_tile`): there
    the shallow products, which never prefetch, ran 1.02-1.035x slower (GRU N=32, T=100,
    H=64 and LSTM N=20, T=100, H=64 inference, three to five processes each way)."""
    for i0 in range(0, rows, MR):
        _tile_far(kc, a[i0 * row_step :], a_row, a_col, panels, b_off, 0, c[i0:], c_row, min(MR, n - i0), nr,
                  accumulate)  # fmt: skip
    a_tall, c_tall = a[rows * row_step :], c[rows:]
    if extra == 1:
        _tile_tall_far1(kc, a_tall, a_row, a_col, panels, b_off, 0, c_tall, c_row, MR + 1, nr, accumulate)
    elif extra == 2:
        _tile_tall_far2(kc, a_tall, a_row, a_col, panels, b_off, 0, c_tall, c_row, MR + 2, nr, accumulate)
    elif extra == 3:
        _tile_tall_far3(kc, a_tall, a_row, a_col, panels, b_off, 0, c_tall, c_row, MR + 3, nr, accumulate)


@jit
def tall_tile(extra, kc, a, a_row, a_col, panels, b_off, c, c_row, nr, accumulate):
    """A tile of MR + ``extra`` rows (1 <= extra <= TALL_EXTRA) by one panel: the
    :func:`_tile` arguments, all of its rows computed."""
    if extra == 1:
        _tile_tall1(kc, a, a_row, a_col, panels, b_off, 0, c, c_row, MR + 1, nr, accumulate)
    elif extra == 2:
        _tile_tall2(kc, a, a_row, a_col, panels, b_off, 0, c, c_row, MR + 2, nr, accumulate)
    else:
        _tile_tall3(kc, a, a_row, a_col, panels, b_off, 0, c, c_row, MR + 3, nr, accumulate)


@jit
def tiles_product(packed, k0, kc, panels, out, accumulate):
    """out (n, M) (+)= A @ B[k0:k0+kc] for A (n, kc) copied into MR-row tiles by
    :func:`pack_rows` (``packed``), B (K, M) given as its panels. Its own function, not a
    branch inside :func:`gemm_packed`'s tile loop: with both tiles in one loop body the
    products ran 5-24% slower (float32, one thread, Zen 5, GFLOP/s, branch inside / apart:
    512 x 256 x 1024 193 / 222; 64 x 256 x 1024 209 / 231; 512 x 64 x 256 173 / 215;
    512 x 512 x 2048 168 / 178)."""
    n, m = out.shape
    nr, k = panels.shape[2], panels.shape[1]
    c_row = out.strides[0] // out.itemsize
    last = n % MR
    body = n - last if 0 < last <= HALF_MR else n  # full tiles end here
    for p in range(panels.shape[0]):
        j0 = p * nr
        if kc >= PREFETCH_MIN_K:
            far_tiles(kc, packed, kc, 1, MR, panels, (p * k + k0) * nr, out[:, j0:], c_row, body, n, 0,
                      min(nr, m - j0), accumulate)  # fmt: skip
        else:
            for i0 in range(0, body, MR):
                _tile(kc, packed[i0 * kc :], 1, MR, panels, (p * k + k0) * nr, 0,
                      out[i0:, j0:], c_row, min(MR, n - i0), min(nr, m - j0), accumulate)  # fmt: skip
    if body < n:
        few_rows(kc, packed[body * kc :], 1, MR, panels, k, k0, out[body:], c_row, accumulate)


@jit
def copied_tiles_products(a, panels, out, panels2, out2, accumulate):
    """out (n, M) (+)= a (n, K) @ B and, when ``out2`` has rows, out2 (n, M2) (+)= a @ B2
    (B, B2 given as their panels), with a's rows copied into MR-row tiles (:func:`pack_rows`)
    a block at a time, K_BLOCK_PACKED deep, once for both products: the copied-tile path of
    :func:`gemm_packed` (a transposed ``a``, see PACK_A_COLUMNS), of :func:`gemm_pair` and
    of ``common.add_weight_grads``. ``accumulate``: add to out (and out2) from the first K
    pass on; later passes always add."""
    n, k = a.shape
    rows = ROW_BLOCK_LONG_K if k >= 512 else ROW_BLOCK_SHORT_K
    packed = np.empty((min(rows, n) + MR - 1) // MR * MR * min(K_BLOCK_PACKED, k), a.dtype)  # whole tiles
    for k0 in range(0, max(k, 1), K_BLOCK_PACKED):
        kc = min(K_BLOCK_PACKED, k - k0)
        add = accumulate or k0 > 0
        for b0 in range(0, n, rows):
            b1 = min(n, b0 + rows)
            pack_rows(a, b0, b1, k0, kc, packed)
            tiles_product(packed, k0, kc, panels, out[b0:b1], add)
            if out2.shape[0]:
                tiles_product(packed, k0, kc, panels2, out2[b0:b1], add)


@jit
def few_rows(kc, a, a_row, a_col, panels, k, k0, c, c_row, accumulate):
    """``mr`` <= HALF_MR rows left after the full tiles of a block of :func:`gemm_packed`, over
    the ``panels`` given (a group of FEW_ROWS_PANELS), on tiles of HALF_MR rows by
    HALF_PANELS panels or, up to QUARTER_MR rows, on :func:`quarter_rows`' tiles. a: the
    rows' first element, strides as in :func:`_tile_typing`; panels (P, K, NR) with K =
    ``k``, read from depth ``k0`` for ``kc``; c (mr, M): the rows' output.

    A tile of one panel with few rows keeps few accumulators: at one row and 2 vectors,
    each FMA waits for the previous one. Rows are summed as in a full tile (bitwise the
    same results). Measured (float32, one thread, Zen 5, B = W_hh^T (H, 4H) packed, us per
    product, a tile of one panel / these): H = 256, 2 rows 10.3 / 7.0-7.4, 3 rows 10.3 /
    9.0, 4 rows 10.1 / 8.5-8.9; H = 128, 1 row 2.58 / 2.12. At one to four rows these run
    at about 32 bytes of panel per cycle from L2, the limit here.
    """
    mr, m = c.shape
    if mr <= QUARTER_MR:
        quarter_rows(kc, a, a_row, a_col, panels, k, k0, c, c_row, accumulate)
        return
    nr = panels.shape[2]
    step = k * nr
    n_panels = panels.shape[0]
    grouped = n_panels - n_panels % HALF_PANELS
    for p in range(0, grouped, HALF_PANELS):
        off = (p * k + k0) * nr
        width = min(HALF_PANELS * nr, m - p * nr)
        _tile_half_wide(kc, a, a_row, a_col, panels, off, step, c[:, p * nr :], c_row, mr, width, accumulate)
    for p in range(grouped, n_panels):
        _tile_half(kc, a, a_row, a_col, panels, (p * k + k0) * nr, 0, c[:, p * nr :], c_row, mr,
                   min(nr, m - p * nr), accumulate)  # fmt: skip


@jit(inline=True)
def quarter_rows(kc, a, a_row, a_col, panels, k, k0, c, c_row, accumulate):
    """:func:`few_rows` for up to QUARTER_MR rows: tiles of QUARTER_MR rows by 4 panels (of
    the 1-3 panels left over then, a pair runs at once, the rest one at a time). Inlined,
    also into the time loops' per-step products of one or two rows (:func:`few_rows_step`)."""
    mr, m = c.shape
    nr = panels.shape[2]
    step = k * nr
    n_panels = panels.shape[0]
    grouped = n_panels - n_panels % 4
    for p in range(0, grouped, 4):
        off = (p * k + k0) * nr
        width = min(4 * nr, m - p * nr)
        _tile_quarter_wide(
            kc, a, a_row, a_col, panels, off, step, c[:, p * nr :], c_row, mr, width, accumulate
        )
    if HALF_PANELS > 1 and n_panels - grouped >= HALF_PANELS:
        # 2-3 panels left (M = 64 or 96, say): a pair of them at once keeps twice the
        # accumulators of one panel at a time. Measured (float32, one thread, Zen 5, K = 64,
        # ns per product, one panel at a time / a pair): M = 64, 1-2 rows 245 / 172, 9-10
        # rows 580-587 / 503-512; M = 96, 1-2 rows 326 / 263. Bitwise the same.
        width = min(HALF_PANELS * nr, m - grouped * nr)
        _tile_quarter_pair(kc, a, a_row, a_col, panels, (grouped * k + k0) * nr, step, c[:, grouped * nr :],
                           c_row, mr, width, accumulate)  # fmt: skip
        grouped += HALF_PANELS
    for p in range(grouped, n_panels):
        _tile_half(kc, a, a_row, a_col, panels, (p * k + k0) * nr, 0, c[:, p * nr :], c_row, mr,
                   min(nr, m - p * nr), accumulate)  # fmt: skip


#: Rows of dG that :func:`pack_rows` copies together into each tile: a tile then receives
#: PACK_ROWS_K * MR contiguous values (whole cache lines) at a time rather than MR.
PACK_ROWS_K = 8


@jit
def pack_rows(a, b0, b1, k0, kc, packed):
    """Copy a[b0:b1, k0:k0+kc] into ``packed`` as MR-row tiles, each (kc, MR) row-major:
    the ``a`` operand of :func:`_tile` with a_row = 1, a_col = MR. For a transposed ``a``
    (dG^T in the weight gradients) the copy reads rows of dG, and the tiles then read
    contiguous memory instead of one value per dG row (see PACK_A_COLUMNS).

    Each block of PACK_ROWS_K dG rows is read once, in order, and every full tile receives
    its PACK_ROWS_K * MR values of the block as one contiguous run. Measured (float32,
    Intel Xeon, one thread, all of a dG^T in blocks of ROW_BLOCK_LONG_K columns, ms): tile
    by tile (each tile's 32 bytes of a row, a dG row apart) 11.7-13.7 against 6.0-6.3 row
    by row for dG 1600 x 4096 on both threads (LSTM training at N=64, T=100, H=256 0.94-0.97
    of the time); then row by row / in blocks of 4, 8, 16, 32 rows: dG 3200 x 768 1.35-1.66
    / 1.03, 0.99, 0.97, 1.05; 3200 x 256 0.42-0.54 / 0.33, 0.26, 0.29, 0.28; 1600 x 4096
    3.6-4.1 / 2.75, 2.76, 3.61, 2.99; 3200 x 1024 1.88-2.32 / 1.39, 1.44, 1.30, 1.54."""
    src = a.T
    full = b0 + (b1 - b0) // MR * MR  # the full tiles end here
    blocked = kc // PACK_ROWS_K * PACK_ROWS_K
    for kb in range(0, blocked, PACK_ROWS_K):
        for i0 in range(b0, full, MR):
            base = (i0 - b0) * kc + kb * MR
            for kq in range(PACK_ROWS_K):
                values = src[k0 + kb + kq, i0 : i0 + MR]  # MR long: copied as one vector
                for ii in range(MR):
                    packed[base + kq * MR + ii] = values[ii]
    for kk in range(blocked, kc):  # apart: one loop, its block cut short, ran 1.06-1.54x slower
        for i0 in range(b0, full, MR):
            values = src[k0 + kk, i0 : i0 + MR]
            base = (i0 - b0) * kc + kk * MR
            for ii in range(MR):
                packed[base + ii] = values[ii]
    for kk in range(kc):  # the last, partial tile
        row = src[k0 + kk, full:b1]
        base = (full - b0) * kc + kk * MR
        for ii in range(b1 - full):
            packed[base + ii] = row[ii]


@jit
def gemm_step(a, b, b_panels, out):
    """out (n, M) = a (n, K) @ b (K, M) for a per-step recurrent product, with
    ``b_panels = pack(b)``, or empty to call BLAS (``common.step_panels`` decides; forward
    passes call :func:`gemm_step_forward`).

    Rows of a, out contiguous. The panels serve any row count: a few rows run on tiles
    over 2 or 4 panels (:func:`few_rows`). Measured (float32, one thread, Zen 5, b (H, 4H),
    us per product, panels / BLAS on b given as W_hh^T / BLAS on a C-contiguous b): one
    row, H = 128: 2.12 / 2.55 / 2.18; H = 256: 6.6 / 10.7 / 9.8; H = 512 (b beyond L2):
    42 / 23 / 25 (BLAS on two threads). BLAS still takes a batch of one with big weights
    (on every core) and short sequences of one row per chunk (packing would not pay).
    """
    if b_panels.shape[0] == 0:
        np.dot(a, b, out=out)
    else:
        gemm_packed(a, b_panels, out, OVERWRITE)


@jit
def gemm_step_forward(a, b, b_panels, out):
    """:func:`gemm_step` for a forward's per-step product by b = W_hh^T, or with panels of
    shape (1, 0, NR) reading W_hh = b.T in place (:func:`few_rows_nt`). Its own function so
    that backward's products by W_hh (whose transpose is no C-contiguous array) do not
    compile ``few_rows_nt`` for a layout they never run."""
    if b_panels.shape[0] == 1 and b_panels.shape[1] == 0:
        few_rows_nt(a, b.T, out[:, 0:])  # out's type as in the other calls: compiled once
    else:
        gemm_step(a, b, b_panels, out)


@jit(inline=True)
def few_rows_step(a, b_panels, out):
    """Run a per-step product out (n, M) = a (n, K) @ B here, inlined into the time loop,
    when it has at most QUARTER_MR rows and B's panels (:func:`gemm_step`): the tiles
    :func:`gemm_packed` runs there (:func:`quarter_rows`, bitwise the same) without its
    calls. Returns whether it did. Measured (float32, one thread, Zen 5, a loop of LSTM
    steps of one row with the gate math inlined, ns a step, the product through
    :func:`gemm_packed` / here): H = 16 109 / 68, 32 174 / 89, 64 452 / 376."""
    n, k = a.shape
    if n == 0 or n > QUARTER_MR or b_panels.shape[0] == 0 or b_panels.shape[1] != k or k > K_BLOCK_ROWS:
        return False
    if a.strides[1] != a.itemsize:
        return False
    isz = a.itemsize
    # the arguments of gemm_packed's call to few_rows (k0 and accumulate typed as run-time
    # values, not literals): the same tiles with the same types
    quarter_rows(
        k, a[0:, 0:], a.strides[0] // isz, 1, b_panels, k, k * 0, out[0:, 0:], out.strides[0] // isz, k < 0
    )
    return True


@jit(inline=True)
def gemm_step_rows(a, b, b_panels, out):
    """:func:`gemm_step_forward` for the forwards' time loops: steps of few rows on panels
    inlined (:func:`few_rows_step`)."""
    if not few_rows_step(a, b_panels, out):
        gemm_step_forward(a, b, b_panels, out)


@jit(inline=True)
def gemm_step_rows_back(a, b, b_panels, out):
    """:func:`gemm_step` for the backwards' time loops: steps of few rows on panels inlined
    (:func:`few_rows_step`)."""
    if not few_rows_step(a, b_panels, out):
        gemm_step(a, b, b_panels, out)


@jit
def pack(w):
    """Panels (P, K, NR) of B = w, for w (K, M): products ``a @ w``."""
    return pack_transposed(w.T)


#: Whether the chunk-level products (:func:`gemm_large`: input projection, dx and the weight
#: gradients, hundreds to thousands of rows) call BLAS instead of the micro-kernel: where
#: the micro-kernel has no AVX-512. Measured (float32, one thread, best of 15 interleaved):
#: on Zen 3 (AVX2) OpenBLAS ran 86-94 GFLOP/s there against the micro-kernel's 71-81 (it
#: wins only the few-row per-step products: 79-87 vs 72-73); on Zen 5 (AVX-512, OpenBLAS
#: held to its AVX2 kernels by OPENBLAS_CORETYPE=Haswell) the micro-kernel won both.
BLAS_FOR_LARGE = VECTOR_BYTES < 64


@jit(inline=True)
def _as_given(b):
    return b


#: How the kernels pass B (a weight matrix or its transpose) to :func:`gemm_large` and
#: ``common.gemm_split_rows``: typed with layout 'A' (``refs.any_layout``) where they read
#: only its panels, so that each compiles once for W and W^T rather than once per layout;
#: as given where BLAS reads it (numba's ``np.dot`` copies an operand of layout 'A'). The
#: kernels pass W and W^T to ``common.step_panels`` and :func:`pack_weights` the same way.
#: Measured (Zen 5, first training steps of an RNN then an LSTM from an empty cache, two
#: runs each, alternating): 84.9 and 89.4 s against 97.5 and 94.3 s; run times in one
#: process (``benchmarks/ab_builds.py``, six forward and training shapes): 0.955-1.010.
large_b = _as_given if BLAS_FOR_LARGE else any_layout


@jit(inline=True)
def pack_for_large(b):
    """Operand of :func:`gemm_large` for b (K, M): its panels (:func:`pack`), or none
    (empty) when BLAS_FOR_LARGE (BLAS reads b itself)."""
    return pack(b[:0] if BLAS_FOR_LARGE else b)


@jit
def pack_weights(b):
    """:func:`pack_for_large` for a b packed once per kernel call at the kernel's top level
    (a weight matrix, or the x / h_prev of the weight gradients over all rows): the panels
    are packed across numba's threads (:func:`pack_transposed_parallel`) and shared by
    them."""
    return pack_transposed_parallel((b[:0] if BLAS_FOR_LARGE else b).T)


@jit
def gemm_large(a, b, b_panels, out, accumulate):
    """out (n, M) = a (n, K) @ b (K, M), or += when ``accumulate``, for a chunk-level
    product: BLAS when BLAS_FOR_LARGE, else the panels ``b_panels = pack_for_large(b)``.

    a, b: C- or F-contiguous (BLAS); out: C-contiguous. Packing b and running the panels
    beats reading b in place at every size measured, as b's rows lie a row stride apart and
    one panel's K rows alias in L1 (float32, one thread, Zen 3: 60-71 vs 39-55 GFLOP/s at
    3200 x 256 x 1024 and 1600 x 3072 x 1024, packing included).
    """
    if BLAS_FOR_LARGE:
        if accumulate:
            out += np.dot(a, b)
        else:
            np.dot(a, b, out=out)
    else:
        gemm_packed(a, b_panels, out, accumulate)


@jit
def gemm(a, b, out, accumulate):
    """:func:`gemm_large` for a b used once (packed here when not BLAS_FOR_LARGE)."""
    gemm_large(a, b, pack_for_large(b), out, accumulate)


#: Rows from which :func:`gemm_pair` sends outputs of at most half a panel's columns to
#: BLAS, whose tiles are not padded to NR columns and which reads both operands in place
#: (packing copies them: past the caches, twice the memory traffic). Measured (float32, Zen
#: 5, one thread, both products and the bias sums over R rows, panels / BLAS, ms): M = 16
#: columns, 16 rows of output: R = 512-1024 0.014-0.027 / 0.017-0.031; 2048 0.052 / 0.045;
#: 4096 0.111 / 0.088; 8192 0.286 / 0.175; 51200 3.19 / 1.17. 64 rows of output: R =
#: 1024-8192 0.90-0.98 the time; 51200 5.12 / 3.14. At 32 columns BLAS lost (R = 10240: 0.35
#: / 0.56; 1.05-1.6x at 64-256 columns). Holding BLAS at one thread costs a training step
#: 7-10 us per switch (``fastseq._threads.kernels_call_blas``).
NARROW_BLAS_ROWS = 8192


@jit(inline=True)
def gemm_pair(a, b, b2, out, out2):
    """out (n, M) = a @ b (K, M) and out2 (n, M2) = a @ b2 (K, M2) for one ``a`` (n, K), a
    transposed view (dG^T in the chunks' weight gradients). Where :func:`gemm_packed` would
    copy a's tiles for both products (:func:`copies_a_tiles` for both widths, no
    BLAS_FOR_LARGE), it copies them once for both, in the same blocks and order, so the
    results are bitwise those of two :func:`gemm` calls. Measured (float32, Zen 5, two
    chunks on both threads, dG^T @ x and dG^T @ h_prev per chunk, two calls / one copy):
    RNN, 3200 rows, H = 512: 20.6 / 19.0 ms; LSTM, 1600 rows, H = 1024: 159.5 / 151.1 ms.
    Outputs at most half a panel wide (C and H <= NR / 2: 16 in float32 here) over at
    least NARROW_BLAS_ROWS rows go to BLAS (``fastseq._threads.weight_grads_call_blas``
    holds it at one thread then). Otherwise two :func:`gemm` calls."""
    if a.shape[1] >= NARROW_BLAS_ROWS and max(out.shape[1], out2.shape[1]) <= panel_width(out) // 2:
        np.dot(a, b, out=out)
        np.dot(a, b2, out=out2)
        return
    if BLAS_FOR_LARGE or not copies_a_tiles(a, min(out.shape[1], out2.shape[1])):
        gemm(a, b, out, OVERWRITE)
        gemm(a, b2, out2, OVERWRITE)
        return
    copied_tiles_products(a, pack(b), out, pack(b2), out2, OVERWRITE)


#: Rows of ``a`` up to which :func:`step_product` computes the product itself
#: (:func:`few_rows_nt`) instead of calling BLAS. Measured (float32, Zen 3, a (n, 128) @
#: w.T with w (512, 128), BLAS at 2 threads as a stream runs it): n = 1: 5-7 vs 5.4 us;
#: n = 2-16: 10-36 vs 42-50 us; n = 32: 67 vs 80 us.
FEW_ROWS = 32


@jit
def few_rows_nt(a, w, out):
    """out (n, M) = a (n, K) @ w.T for w (M, K) with contiguous rows, and few rows of a.

    The product of a streaming step: w is read once, four rows at a time, and each block of
    four w rows meets two rows of a (8 dot products of length K, each vectorised over k).
    No packing, so w may change between calls. Sums are reassociated: results differ from
    BLAS in the last bits.
    """
    n, kd = a.shape
    m = w.shape[0]
    zero = w.dtype.type(0)
    j = 0
    while j < m:
        if j + 4 <= m:
            i = 0
            while i + 2 <= n:
                s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
                for k in range(kd):
                    a0, a1 = a[i, k], a[i + 1, k]
                    w0, w1, w2, w3 = w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k]
                    s0 += w0 * a0
                    s1 += w1 * a0
                    s2 += w2 * a0
                    s3 += w3 * a0
                    t0 += w0 * a1
                    t1 += w1 * a1
                    t2 += w2 * a1
                    t3 += w3 * a1
                out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s0, s1, s2, s3
                out[i + 1, j], out[i + 1, j + 1], out[i + 1, j + 2], out[i + 1, j + 3] = t0, t1, t2, t3
                i += 2
            if i < n:
                s0 = s1 = s2 = s3 = zero
                for k in range(kd):
                    a0 = a[i, k]
                    s0 += w[j, k] * a0
                    s1 += w[j + 1, k] * a0
                    s2 += w[j + 2, k] * a0
                    s3 += w[j + 3, k] * a0
                out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s0, s1, s2, s3
            j += 4
        else:
            for i in range(n):
                s0 = zero
                for k in range(kd):
                    s0 += w[j, k] * a[i, k]
                out[i, j] = s0
            j += 1


@jit
def step_product(a, w, out, blocks):
    """out (n, M) = a (n, K) @ w.T for one streaming step, w (M, K): :func:`few_rows_nt` up
    to FEW_ROWS rows, BLAS above. ``blocks``: 1, or G to call :func:`few_rows_nt` once per
    gate block of w (M = G*H), so that each output is summed exactly as in the unit-split
    step, whose parts start at multiples of 4 units (at one row, H=128: 1.00-1.06x the time
    of one call, so only streams that can split use it)."""
    if a.shape[0] <= FEW_ROWS:
        hd = w.shape[0] // blocks
        for q in range(blocks):
            few_rows_nt(a, w[q * hd : (q + 1) * hd], out[:, q * hd : (q + 1) * hd])
    else:
        np.dot(a, w.T, out=out)
