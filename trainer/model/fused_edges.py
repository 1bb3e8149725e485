"""Fused edge MLPs of the dense EGNN block (model.kernel = 'fused'): Triton kernels that keep [B, N, N, H] on chip.

Both edge MLPs of an EGNN block (trainer/model/egnn.py) have the same shape. For every pair (i, j) of a molecule:

    s_ij = silu(A_i + C_j + W_e e_ij)          A = W_i h + b, C = W_j h: node-sized, computed outside
    u_ij = silu(W_2 s_ij + b_2)                  the H x H product, the edge work that matters
    message MLP:    agg_i = sum_j sigmoid(w . u_ij + b) * mask_ij * u_ij      -> [B, N, H]
    coordinate MLP: phi_ij = w . u_ij                                           -> [B, N, N], one scalar per pair

The forward kernel tiles over (molecule, block of rows i) and loops over blocks of columns j; s and u live in
registers and only the node-sized result (agg) or the per-pair scalar (phi) is written. The coordinate update
(tanh, unit vectors, the sum over j) stays in PyTorch on per-pair scalars and 3-vectors, 1/H of an edge tensor.

The backward recomputes s and u (nothing H-wide is saved by the forward). The gradients of A, C, e_ij, W_e, w
and b are reduced in the kernel into per-program partial sums that are added up afterwards in a fixed order, so
two runs give bit-identical gradients (no atomics). W_2's gradient dz^T s sums over all pairs, and a full H x H
accumulator per program does not fit in a GPU's registers, so it is reduced one of two ways
(MOLSCALE_FUSED_WGRAD): 'matmul' (default) writes s and dz, two edge tensors, for one matrix product; 'onchip'
writes two scalars per pair and a third kernel (_edge_mlp_weight_grad) recomputes the product for a block of
W_2's rows per program and keeps that block's sum in registers.

The arithmetic is float32 (float64 when the inputs are float64, as in the tests); the matrix products take
W_2's dtype (bf16 under autocast, as the eager Linear would). Correctness is tested on the CPU under Triton's
interpreter (TRITON_INTERPRET=1) against the eager block (tests/trainer/model/test_fused_edges.py).
"""

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("trainer")

try:  # an optional dependency: `pip install molscale[gpu]`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

MESSAGE, COORDINATE = 0, 1  # the two kinds of edge MLP (the kernels' MODE)


@dataclass
class LaunchCounts:
    """What the fused kernels cost, for trainer.bench, whose operator counters cannot see inside a Triton kernel:
    launches, bytes they write in edge-shaped tensors [B, N, N, ...] and the FLOPs of their H x H products.
    While `inside` is positive the torch operators around a launch (its buffers, the interpreter's copies) are
    accounted for here and not by the benchmark's counters."""

    kernels: int = 0
    edge_bytes: int = 0
    flops: int = 0
    inside: int = 0


COUNTS = LaunchCounts()


@contextlib.contextmanager
def _launch(edge_bytes: int, flops: int):
    COUNTS.kernels += 1
    COUNTS.edge_bytes += edge_bytes
    COUNTS.flops += flops
    COUNTS.inside += 1
    try:
        yield
    finally:
        COUNTS.inside -= 1


# Triton decides when a kernel is defined (this module's import) whether it runs compiled or in its CPU
# interpreter: TRITON_INTERPRET=1 must be set before molscale is imported (tests/conftest.py does).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device` here, or None when they can."""
    if triton is None:
        return "triton is not installed (pip install 'molscale[gpu]')"
    if device.type == "cuda" or INTERPRETED:
        return None
    return f"Triton kernels need a CUDA device ({device.type} tensors; TRITON_INTERPRET=1 runs them on the CPU, slowly)"


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning("model.kernel=fused: %s; EGNN blocks run eagerly", reason)


@functools.cache
def _announce(device_type: str) -> None:
    how = "Triton's CPU interpreter (slow; for tests)" if device_type != "cuda" else "CUDA"
    log.info("model.kernel=fused: the EGNN edge MLPs run as Triton kernels on %s", how)


def runs_on(device: torch.device) -> bool:
    """Whether blocks on `device` take the fused kernels; one log line says so, or why not (once per reason)."""
    reason = unavailable_reason(device)
    if reason is not None:
        _warn_fallback(reason)
    else:
        _announce(device.type)
    return reason is None


# (rows i, columns j, feature chunk, warps) per program on a GPU, chosen by GPU kernel time on an H200 (torch's
# profiler; BENCHMARKS.md "One GPU: H200"). A forward that will be differentiated keeps its tiles for the
# recomputing backward, where small tiles win (1.87 ms per block for 4 x 4 pairs with 4 warps against 2.64 ms for
# 4 x 8 with 8, batch 64, bf16); a forward alone (sampling, validation, prediction) is fastest with 8 x 16 pairs
# (31 ms per block at 10,000 molecules against 61 ms for 4 x 8 and 45 ms eager). python -m trainer.kernel_check
# shows the registers and shared memory of each.
TRAINING_TILES = (4, 4, 32, 4)
FORWARD_TILES = (8, 16, 32, 8)
TILES_ENV = {True: "MOLSCALE_FUSED_TILES", False: "MOLSCALE_FUSED_FORWARD_TILES"}  # by "differentiated"


@functools.cache
def _gpu_tiles_from_env(differentiated: bool = True) -> tuple[int, int, int, int]:
    name = TILES_ENV[differentiated]
    default = TRAINING_TILES if differentiated else FORWARD_TILES
    text = os.environ.get(name, ",".join(map(str, default)))
    try:
        tiles = tuple(int(part) for part in text.split(","))
    except ValueError:
        tiles = ()
    if len(tiles) != 4 or any(t < 1 or t & (t - 1) for t in tiles) or tiles[0] * tiles[1] < 16 or tiles[2] < 16:
        raise ValueError(f"{name}={text!r}: give rows,columns,features,warps as powers of two, rows x columns "
                         f"and features at least 16 (default {','.join(map(str, default))})")
    return tiles


# set by `make gpu-check`'s sweep: these tiles for every call, ahead of the environment and the defaults
GPU_TILES: tuple[int, int, int, int] | None = None


def tile_sizes(n: int, hidden_padded: int, device: torch.device, differentiated: bool = True):
    """(rows i, columns j, feature chunk, warps) per program; ``differentiated``: a backward will follow (training)
    or not (sampling). The interpreter's cost is per operation rather than per element: there one tile covers a
    molecule."""
    if device.type == "cuda":
        bi, bj, bk, warps = GPU_TILES or _gpu_tiles_from_env(differentiated)
        return bi, bj, min(bk, hidden_padded), warps
    side = max(4, min(32, triton.next_power_of_2(n)))
    return side, side, hidden_padded, 1


if triton is not None:
    # The interpreter's tl.dot gives wrong results for bf16 operands: there, operands are rounded to the
    # product's dtype and multiplied in the accumulator's (the same values: bf16 x bf16 is exact in float32)
    _UPCAST_DOT = tl.constexpr(INTERPRETED)

    @triton.jit
    def _dot(x, w, ACC: tl.constexpr, TF32: tl.constexpr):
        x = x.to(w.dtype)  # the product's dtype: W_2's (bf16 under autocast)
        if _UPCAST_DOT:
            return tl.dot(x.to(ACC), w.to(ACC), out_dtype=ACC)
        if w.dtype == tl.float32 and not TF32:  # float32 products as the eager ones: TF32 only where torch allows it
            return tl.dot(x, w, out_dtype=ACC, input_precision="ieee")
        return tl.dot(x, w, out_dtype=ACC)

    @triton.jit
    def _silu_grad(x):
        sig = tl.sigmoid(x)
        return sig * (1.0 + x * (1.0 - sig))

    @triton.jit
    def _pair_index(pid_i, j0, N, BI: tl.constexpr, BJ: tl.constexpr):
        # the BI x BJ pairs of a tile as one flat row index r -> (i, j)
        r = tl.arange(0, BI * BJ)
        ii = pid_i * BI + r // BJ
        jj = j0 + r % BJ
        return ii, jj, (ii < N) & (jj < N)

    @triton.jit
    def _edge_preact(A, C, E, WE, b, ii, jj, valid, kk, N, H: tl.constexpr, ACC: tl.constexpr):
        # A_i + C_j + W_e e_ij on features kk, for the pairs (ii, jj): [BI * BJ, BK]
        kmask = kk < H
        m2 = valid[:, None] & kmask[None, :]
        a = tl.load(A + (b * N + ii)[:, None] * H + kk[None, :], mask=m2, other=0.0).to(ACC)
        c = tl.load(C + (b * N + jj)[:, None] * H + kk[None, :], mask=m2, other=0.0).to(ACC)
        pair = (b * N + ii) * N + jj
        e0 = tl.load(E + pair * 2, mask=valid, other=0.0).to(ACC)
        e1 = tl.load(E + pair * 2 + 1, mask=valid, other=0.0).to(ACC)
        we0 = tl.load(WE + kk * 2, mask=kmask, other=0.0).to(ACC)
        we1 = tl.load(WE + kk * 2 + 1, mask=kmask, other=0.0).to(ACC)
        return a + c + e0[:, None] * we0[None, :] + e1[:, None] * we1[None, :]

    @triton.jit
    def _second_layer(A, C, E, WE, W2, B2, b, ii, jj, valid, N, H: tl.constexpr, HP: tl.constexpr,
                      BK: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr, S_OUT, STORE_S: tl.constexpr):
        # z = W_2 silu(pre) + b_2 for the tile's pairs: [BI * BJ, HP]; optionally writes s (the backward's)
        cols = tl.arange(0, HP)
        z = tl.zeros((ii.shape[0], HP), dtype=ACC)
        for k0 in range(0, HP, BK):  # a loop, not unrolled: one shared-memory buffer for W_2
            kk = k0 + tl.arange(0, BK)
            pre = _edge_preact(A, C, E, WE, b, ii, jj, valid, kk, N, H, ACC)
            s = pre * tl.sigmoid(pre)
            if STORE_S:
                pair = (b * N + ii) * N + jj
                tl.store(S_OUT + pair[:, None] * H + kk[None, :], s.to(S_OUT.dtype.element_ty),
                         mask=valid[:, None] & (kk < H)[None, :])
            # W_2 is [H_out, H_in]: this chunk of its transpose is [BK (in), HP (out)]
            w2t = tl.load(W2 + cols[None, :] * H + kk[:, None], mask=(kk < H)[:, None] & (cols < H)[None, :],
                          other=0.0)
            z += _dot(s, w2t, ACC, TF32)
        b2 = tl.load(B2 + cols, mask=cols < H, other=0.0).to(ACC)
        return z + b2[None, :]

    @triton.jit
    def _edge_mlp_forward(A, C, E, WE, W2, B2, WV, BV, MASK, OUT, N, H: tl.constexpr, HP: tl.constexpr,
                          BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
                          ACC: tl.constexpr, TF32: tl.constexpr):
        b = tl.program_id(0)
        pid_i = tl.program_id(1)
        cols = tl.arange(0, HP)
        wv = tl.load(WV + cols, mask=cols < H, other=0.0).to(ACC)
        agg = tl.zeros((BI, HP), dtype=ACC)
        for j0 in range(0, N, BJ):
            ii, jj, valid = _pair_index(pid_i, j0, N, BI, BJ)
            z = _second_layer(A, C, E, WE, W2, B2, b, ii, jj, valid, N, H, HP, BK, ACC, TF32, OUT, False)
            u = z * tl.sigmoid(z)
            logit = tl.sum(u * wv[None, :], axis=1)
            pair = (b * N + ii) * N + jj
            if MODE == 0:  # gated messages summed over j
                gate = tl.sigmoid(logit + tl.load(BV).to(ACC)) * tl.load(MASK + pair, mask=valid, other=0.0).to(ACC)
                agg += tl.sum(tl.reshape(u * gate[:, None], (BI, BJ, HP)), axis=1)
            else:  # the coordinate MLP's scalar per pair
                tl.store(OUT + pair, logit.to(OUT.dtype.element_ty), mask=valid)
        if MODE == 0:
            rows = pid_i * BI + tl.arange(0, BI)
            tl.store(OUT + (b * N + rows)[:, None] * H + cols[None, :], agg.to(OUT.dtype.element_ty),
                     mask=(rows < N)[:, None] & (cols < H)[None, :])

    @triton.jit
    def _edge_mlp_backward(A, C, E, WE, W2, B2, WV, BV, MASK, DOUT,
                           S_OUT, DZ_OUT, DA, DC_PART, DE, DWE_PART, DWV_PART, DBV_PART, PAIR_OUT,
                           N, NBI, H: tl.constexpr, HP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                           BK: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr,
                           ONCHIP: tl.constexpr):
        # ONCHIP: W_2's gradient is left to _edge_mlp_weight_grad, which needs only the per-pair gate and logit
        # gradient (PAIR_OUT [pairs, 2]); otherwise s and dz are written for one matrix product
        b = tl.program_id(0)
        pid_i = tl.program_id(1)
        program = b * NBI + pid_i
        cols = tl.arange(0, HP)
        cmask = cols < H
        wv = tl.load(WV + cols, mask=cmask, other=0.0).to(ACC)
        dwv = tl.zeros((HP,), dtype=ACC)
        dbv = tl.zeros((1,), dtype=ACC)
        for j0 in range(0, N, BJ):
            ii, jj, valid = _pair_index(pid_i, j0, N, BI, BJ)
            pair = (b * N + ii) * N + jj
            z = _second_layer(A, C, E, WE, W2, B2, b, ii, jj, valid, N, H, HP, BK, ACC, TF32, S_OUT, not ONCHIP)
            sig_z = tl.sigmoid(z)
            u = z * sig_z
            if MODE == 0:
                logit = tl.sum(u * wv[None, :], axis=1) + tl.load(BV).to(ACC)
                sig = tl.sigmoid(logit)
                mask = tl.load(MASK + pair, mask=valid, other=0.0).to(ACC)
                dagg = tl.load(DOUT + (b * N + ii)[:, None] * H + cols[None, :],
                               mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
                dlogit = tl.sum(dagg * u, axis=1) * mask * sig * (1.0 - sig)
                du = dagg * (sig * mask)[:, None] + dlogit[:, None] * wv[None, :]
                dbv += tl.sum(dlogit, axis=0)
                if ONCHIP:
                    tl.store(PAIR_OUT + pair * 2, sig * mask, mask=valid)
                    tl.store(PAIR_OUT + pair * 2 + 1, dlogit, mask=valid)
            else:
                dlogit = tl.load(DOUT + pair, mask=valid, other=0.0).to(ACC)
                du = dlogit[:, None] * wv[None, :]
            dwv += tl.sum(dlogit[:, None] * u, axis=0)
            dz = du * sig_z * (1.0 + z * (1.0 - sig_z))
            if not ONCHIP:
                tl.store(DZ_OUT + pair[:, None] * H + cols[None, :], dz.to(DZ_OUT.dtype.element_ty),
                         mask=valid[:, None] & cmask[None, :])
            de0 = tl.zeros((BI * BJ,), dtype=ACC)
            de1 = tl.zeros((BI * BJ,), dtype=ACC)
            for k0 in range(0, HP, BK):  # a loop, not unrolled: one shared-memory buffer for W_2
                kk = k0 + tl.arange(0, BK)
                kmask = kk < H
                # ds = dz W_2 on features kk: W_2[:, kk] is [HP (out), BK (in)]
                w2 = tl.load(W2 + cols[:, None] * H + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
                ds = _dot(dz, w2, ACC, TF32)
                pre = _edge_preact(A, C, E, WE, b, ii, jj, valid, kk, N, H, ACC)
                dpre = ds * _silu_grad(pre)
                dpre = tl.where(valid[:, None], dpre, 0.0)
                # dA_i: rows owned by this program, accumulated over the j blocks in memory
                rows = pid_i * BI + tl.arange(0, BI)
                row_ptr = DA + (b * N + rows)[:, None] * H + kk[None, :]
                row_mask = (rows < N)[:, None] & kmask[None, :]
                da_rows = tl.sum(tl.reshape(dpre, (BI, BJ, BK)), axis=1)
                tl.store(row_ptr, tl.load(row_ptr, mask=row_mask, other=0.0) + da_rows.to(DA.dtype.element_ty),
                         mask=row_mask)
                # dC_j: this program's partial sum over its rows i (added up across programs afterwards)
                jcols = j0 + tl.arange(0, BJ)
                dc_cols = tl.sum(tl.reshape(dpre, (BI, BJ, BK)), axis=0)
                tl.store(DC_PART + ((program * N) + jcols)[:, None] * H + kk[None, :],
                         dc_cols.to(DC_PART.dtype.element_ty), mask=(jcols < N)[:, None] & kmask[None, :])
                # W_e and e_ij
                pair2 = pair * 2
                e0 = tl.load(E + pair2, mask=valid, other=0.0).to(ACC)
                e1 = tl.load(E + pair2 + 1, mask=valid, other=0.0).to(ACC)
                we0 = tl.load(WE + kk * 2, mask=kmask, other=0.0).to(ACC)
                we1 = tl.load(WE + kk * 2 + 1, mask=kmask, other=0.0).to(ACC)
                de0 += tl.sum(dpre * we0[None, :], axis=1)
                de1 += tl.sum(dpre * we1[None, :], axis=1)
                dwe_ptr = DWE_PART + (program * H + kk) * 2
                tl.store(dwe_ptr, tl.load(dwe_ptr, mask=kmask, other=0.0) + tl.sum(dpre * e0[:, None], axis=0),
                         mask=kmask)
                tl.store(dwe_ptr + 1, tl.load(dwe_ptr + 1, mask=kmask, other=0.0)
                         + tl.sum(dpre * e1[:, None], axis=0), mask=kmask)
            tl.store(DE + pair * 2, de0.to(DE.dtype.element_ty), mask=valid)
            tl.store(DE + pair * 2 + 1, de1.to(DE.dtype.element_ty), mask=valid)
        tl.store(DWV_PART + program * H + cols, dwv, mask=cmask)
        tl.store(DBV_PART + program + tl.arange(0, 1), dbv)

    @triton.jit
    def _edge_mlp_weight_grad(A, C, E, WE, W2, B2, WV, PAIR, DOUT, DW2_PART, DB2_PART, B, N, MOLECULES,
                              H: tl.constexpr, HP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                              BN: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr):
        """W_2's and b_2's gradients kept on chip: a program owns BN rows of W_2 (outputs n) and a group of
        MOLECULES molecules; it recomputes s (all H inputs) and z for its rows, rebuilds dz from the per-pair
        gate and logit gradient the backward kernel wrote, and accumulates dz^T s in registers ([BN, H])."""
        pid_n = tl.program_id(0)
        group = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < H
        cols = tl.arange(0, HP)
        cmask = cols < H
        # this program's rows of W_2, transposed: [HP (in), BN (out)]
        w2t = tl.load(W2 + rows[None, :] * H + cols[:, None], mask=cmask[:, None] & rmask[None, :], other=0.0)
        b2 = tl.load(B2 + rows, mask=rmask, other=0.0).to(ACC)
        wv = tl.load(WV + rows, mask=rmask, other=0.0).to(ACC)
        dw2 = tl.zeros((BN, HP), dtype=ACC)
        db2 = tl.zeros((BN,), dtype=ACC)
        for m in range(0, MOLECULES):
            b = group * MOLECULES + m
            n_here = N * (b < B)  # the last group may hold fewer molecules: no pair is valid past the batch
            for i0 in range(0, N, BI):
                for j0 in range(0, N, BJ):
                    ii, jj, valid = _pair_index(i0 // BI, j0, n_here, BI, BJ)
                    pair = (b * N + ii) * N + jj
                    pre = _edge_preact(A, C, E, WE, b, ii, jj, valid, cols, N, H, ACC)
                    s = pre * tl.sigmoid(pre)
                    z = _dot(s, w2t, ACC, TF32) + b2[None, :]
                    sig_z = tl.sigmoid(z)
                    if MODE == 0:
                        gate = tl.load(PAIR + pair * 2, mask=valid, other=0.0)
                        dlogit = tl.load(PAIR + pair * 2 + 1, mask=valid, other=0.0)
                        dagg = tl.load(DOUT + (b * N + ii)[:, None] * H + rows[None, :],
                                       mask=valid[:, None] & rmask[None, :], other=0.0).to(ACC)
                        du = dagg * gate[:, None] + dlogit[:, None] * wv[None, :]
                    else:
                        dlogit = tl.load(DOUT + pair, mask=valid, other=0.0).to(ACC)
                        du = dlogit[:, None] * wv[None, :]
                    dz = du * sig_z * (1.0 + z * (1.0 - sig_z))
                    dz = tl.where(valid[:, None], dz, 0.0)
                    dw2 += _dot(tl.trans(dz), s, ACC, TF32)
                    db2 += tl.sum(dz, axis=0)
        tl.store(DW2_PART + (group * H + rows)[:, None] * H + cols[None, :], dw2,
                 mask=rmask[:, None] & cmask[None, :])
        tl.store(DB2_PART + group * H + rows, db2, mask=rmask)


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tf32() -> bool:
    """float32 products in TF32 where torch's own would be (trainer/train/loop.py sets allow_tf32)."""
    return torch.backends.cuda.matmul.allow_tf32


def _triton_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache
def _warn_forward_tiles(reason: str, tiles) -> None:
    log.warning("fused kernels: the forward-alone tiles do not fit this GPU (%s); using %s (set "
                "MOLSCALE_FUSED_FORWARD_TILES to choose)", reason, ",".join(map(str, tiles)))


class FusedEdgeMLP(torch.autograd.Function):
    """agg [B, N, H] (MESSAGE) or phi [B, N, N] (COORDINATE) of one edge MLP, with a recomputing backward."""

    @staticmethod
    def forward(ctx, mode, differentiated, a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask):
        batch, n, hidden = a.shape
        acc = _acc_dtype(a, edge_attr, w_2)
        hp = max(16, triton.next_power_of_2(hidden))
        bi, bj, bk, warps = tile_sizes(n, hp, a.device, differentiated)
        pairs = batch * n * n
        item = torch.empty((), dtype=acc).element_size()
        out_bytes = pairs * item if mode == COORDINATE else 0  # phi is edge-shaped; agg is node-sized
        with _launch(out_bytes, 2 * pairs * hidden * hidden):
            a, c, edge_attr = a.contiguous(), c.contiguous(), edge_attr.contiguous()
            w_e, w_2, b_2, w_v = w_e.contiguous(), w_2.contiguous(), b_2.contiguous(), w_v.contiguous()
            if mode == MESSAGE:
                out = torch.empty(batch, n, hidden, dtype=acc, device=a.device)
            else:
                out = torch.empty(batch, n, n, dtype=acc, device=a.device)
                b_v = mask = w_v  # not read in this mode
            b_v, mask = b_v.contiguous(), mask.contiguous()
            try:
                _edge_mlp_forward[(batch, triton.cdiv(n, bi))](
                    a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask, out, n, hidden, hp, bi, bj, bk, mode,
                    _triton_dtype(acc), _tf32(), num_warps=warps)
            except triton.runtime.errors.OutOfResources as err:
                if differentiated:
                    raise
                # the forward-alone tiles need more shared memory than some GPUs give a program (in fp32: 128.5 KiB
                # at 8 x 16 pairs; an RTX 4090's or an L4's limit is 99 KiB): the training tiles fit everywhere
                bi, bj, bk, warps = tile_sizes(n, hp, a.device, differentiated=True)
                _warn_forward_tiles(str(err), (bi, bj, bk, warps))
                _edge_mlp_forward[(batch, triton.cdiv(n, bi))](
                    a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask, out, n, hidden, hp, bi, bj, bk, mode,
                    _triton_dtype(acc), _tf32(), num_warps=warps)
        ctx.mode, ctx.tiles, ctx.hp, ctx.acc = mode, (bi, bj, bk, warps), hp, acc
        ctx.save_for_backward(a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask = ctx.saved_tensors
        batch, n, hidden = a.shape
        bi, bj, bk, warps = ctx.tiles
        acc, dev = ctx.acc, a.device
        nbi = triton.cdiv(n, bi)
        programs = batch * nbi
        pairs = batch * n * n
        onchip = weight_grad_mode() == "onchip"
        item = torch.empty((), dtype=acc).element_size()
        # written by the kernel: de [B, N, N, 2], and either s and dz [pairs, H] in W_2's dtype (matmul) or the
        # per-pair gate and logit gradient [pairs, 2] (onchip)
        wide = 2 * pairs * 2 * item if onchip else 2 * pairs * hidden * w_2.element_size()
        with _launch(wide + 2 * pairs * item, 2 * 2 * pairs * hidden * hidden):  # recomputed product, dz W_2
            # every row of s, dz, de and dc_part is written by the kernel; da and the W_e partials accumulate
            wide_shape = (1, 1, 1, hidden) if onchip else (batch, n, n, hidden)
            s = torch.empty(wide_shape, dtype=w_2.dtype, device=dev)
            dz = torch.empty(wide_shape, dtype=w_2.dtype, device=dev)
            pair_out = torch.empty(batch, n, n, 2 if onchip else 1, dtype=acc, device=dev)
            da = torch.zeros(batch, n, hidden, dtype=acc, device=dev)
            dc_part = torch.empty(programs, n, hidden, dtype=acc, device=dev)
            de = torch.empty(batch, n, n, 2, dtype=acc, device=dev)
            dwe_part = torch.zeros(programs, hidden, 2, dtype=acc, device=dev)
            dwv_part = torch.empty(programs, hidden, dtype=acc, device=dev)
            dbv_part = torch.empty(programs, dtype=acc, device=dev)
            _edge_mlp_backward[(batch, nbi)](
                a, c, edge_attr, w_e, w_2, b_2, w_v, b_v, mask, grad_out.contiguous(),
                s, dz, da, dc_part, de, dwe_part, dwv_part, dbv_part, pair_out,
                n, nbi, hidden, ctx.hp, bi, bj, bk, ctx.mode, _triton_dtype(acc), _tf32(), onchip,
                num_warps=warps)
        if onchip:
            dw_2, db_2 = _weight_grad_onchip(ctx, a, c, edge_attr, w_e, w_2, b_2, w_v, pair_out, grad_out)
        else:
            dz, s = dz.view(pairs, hidden), s.view(pairs, hidden)
            dw_2 = dz.t() @ s
            db_2 = dz.sum(0, dtype=acc)
        # fixed-order reductions of the per-program partial sums: deterministic
        dc = dc_part.view(batch, nbi, n, hidden).sum(1)
        dw_2, db_2 = dw_2.to(w_2.dtype), db_2.to(b_2.dtype)
        grads = [None, None, da.to(a.dtype), dc.to(c.dtype), de.to(edge_attr.dtype), dwe_part.sum(0).to(w_e.dtype),
                 dw_2, db_2, dwv_part.sum(0).to(w_v.dtype)]
        grads.append(dbv_part.sum().reshape(b_v.shape).to(b_v.dtype) if ctx.mode == MESSAGE else None)
        return (*grads, None)


def _weight_grad_onchip(ctx, a, c, edge_attr, w_e, w_2, b_2, w_v, pair_out, grad_out):
    """W_2's and b_2's gradients by _edge_mlp_weight_grad: per-group partial sums, added in a fixed order."""
    batch, n, hidden = a.shape
    bi, bj, rows_per_program, warps = ctx.tiles  # the feature chunk is also the number of W_2 rows per program
    groups = min(batch, WEIGHT_GRAD_GROUPS)
    molecules = triton.cdiv(batch, groups)
    groups = triton.cdiv(batch, molecules)
    pairs = batch * n * n
    with _launch(0, 2 * 2 * pairs * hidden * hidden):  # the recomputed product (for these rows) and dz^T s
        dw_part = torch.empty(groups, hidden, hidden, dtype=ctx.acc, device=a.device)
        db_part = torch.empty(groups, hidden, dtype=ctx.acc, device=a.device)
        _edge_mlp_weight_grad[(triton.cdiv(ctx.hp, rows_per_program), groups)](
            a, c, edge_attr, w_e, w_2, b_2, w_v, pair_out, grad_out.contiguous(), dw_part, db_part, batch, n,
            molecules, hidden, ctx.hp, bi, bj, rows_per_program, ctx.mode, _triton_dtype(ctx.acc), _tf32(),
            num_warps=warps)
    return dw_part.sum(0), db_part.sum(0)


WEIGHT_GRAD_GROUPS = 64  # molecule groups of _edge_mlp_weight_grad: partial sums of [H, H] each, added afterwards


def weight_grad_mode() -> str:
    """How the backward reduces W_2's gradient (MOLSCALE_FUSED_WGRAD): 'matmul' (default) writes two H-wide
    edge tensors and multiplies them; 'onchip' recomputes the product in a second kernel and writes no H-wide
    edge tensor (more arithmetic, less memory traffic: which is faster is for a GPU to say)."""
    mode = os.environ.get("MOLSCALE_FUSED_WGRAD", "matmul")
    if mode not in ("matmul", "onchip"):
        raise ValueError(f"MOLSCALE_FUSED_WGRAD={mode!r}: choose matmul or onchip")
    return mode


def fused_edge_mlp(mode, a, c, edge_attr, lin_e, lin_2, lin_v, mask=None):
    """The edge MLP of `mode` from its layers: lin_e (W_e, 2 -> H), lin_2 (H -> H), lin_v (H -> 1)."""
    w_2 = lin_2.weight
    if torch.is_autocast_enabled(a.device.type):
        w_2 = w_2.to(torch.get_autocast_dtype(a.device.type))  # the product in bf16, as the eager Linear's
    bias_v = lin_v.bias if mode == MESSAGE else None
    # a backward will follow (training): the forward takes the tiles the recomputing backward is fastest with
    differentiated = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, c, edge_attr, lin_e.weight, w_2, lin_2.bias, lin_v.weight))
    return FusedEdgeMLP.apply(mode, differentiated, a, c, edge_attr, lin_e.weight, w_2, lin_2.bias,
                              lin_v.weight.reshape(-1), bias_v, mask)
