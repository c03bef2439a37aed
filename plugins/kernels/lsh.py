"""The three kernels of LSH attention (contract v1, ``reformer_rt.models.lsh``): hash, chunked attend, combine.

Data flow for ``L > chunk`` (the launchers sort in between; no sorted copy of qk or v is ever materialised)::

    _lsh_hash_kernel     qk [B,H,L,D], rotations [H,D,n_hashes,rot/2], mask [B,L] -> buckets [B,H,n_hashes,L]
    (torch.sort, stable) buckets -> order [B,H,n_hashes*L]: original position of each sorted row
    _lsh_attend_kernel   one program per (b, h, sorted chunk, block of its query rows): gathers its query rows
                         and its look-around key/value rows through ``order``, online softmax (running max and
                         sum in fp32, Milakov & Gimelshein 2018; Dao et al., "FlashAttention", 2022), writes
                         each row's output and logsumexp back at its ORIGINAL position of its round
    _lsh_combine_kernel  rounds [B,H,n_hashes,L,D] + lse -> out [B,H,L,D], weights softmax over rounds of lse

``L <= chunk`` runs ``_lsh_attend_kernel`` with ``SORTED=False``: the sequence is one chunk in original order
with no look-around, i.e. full attention with the same masks.

Specialization. Tile sizes, dtypes and ``SORTED`` (which changes the loads the software pipeliner overlaps) are
constexprs; flags that only select a comparison or a final store (``CAUSAL``, ``WRITE_LSE``) and the number of
bucket factors are runtime integers excluded from the JIT's value specialization (``do_not_specialize``), so they
do not multiply the compiled variants each GPU builds and ``reformer_rt.plugins.compile_check`` verifies.

Numerics. Scores are ``(q . k) * inv_rms(k) / sqrt(D)`` rather than ``q . (k * inv_rms(k) / sqrt(D))``: the same
value up to fp32 rounding, and with fp16 inputs the dot then runs on exact fp16 operands (tensor cores, fp32
accumulation) instead of on keys rounded to fp16 after normalisation. fp32 dots request ``ieee`` precision (no
TF32). With fp16 inputs the softmax weights are rounded to fp16 for the ``p @ v`` dot (relative error <= 2^-11 per
weight), as in every fp16 flash-attention kernel. Rows are normalised by ``exp(m - lse)`` and rounds combined by
``exp(lse_r - logsumexp_r(lse))``, the reference's (and HF's) formulas rather than ``1 / l`` and a plain softmax:
a row that sees only masked keys and itself has |lse| ~ 1e5 (fp32 self-mask value), where those weights sum to 1
only up to the rounding of lse (0.998, contract step 6). Rounding the same way keeps the kernels within fp32
noise of the reference on such rows; the exact forms would differ from it by ~1e-3.

Known limits:
* Bucket ids come from fp32 dot products accumulated in a different order than the reference's einsum, so a
  rotated value may differ from the reference's in its last bits. An argmax can then flip only where two
  candidates (``x_i`` vs ``x_j`` or ``x_i`` vs ``-x_j``) are equal to within a few ulps; no such flip shows on
  random inputs (the tests check bucket ids for exact equality), but it cannot be excluded for crafted inputs.
* The attend kernel holds the head dimension in one tile: ``BLOCK_D`` = next power of two >= D (>= 16), so the
  launcher caps D at 128; D need not be a power of two (masked loads).
* fp32 inputs run their dots in IEEE fp32 (no tensor cores): correct, several times slower than fp16.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N_FACTORS"])
def _lsh_hash_kernel(
    QK, ROTATIONS, MASK, FACTORS, BUCKETS,
    stride_qk_b, stride_qk_h, stride_qk_l, stride_qk_d,
    stride_rot_h, stride_rot_d, stride_rot_r, stride_rot_c,
    stride_mask_b, stride_mask_l,
    stride_buckets_b, stride_buckets_h, stride_buckets_r, stride_buckets_l,
    H, L, D, ROT_HALF, PAD_BUCKET, N_FACTORS,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Bucket ids of BLOCK_L positions of one (b, h, round): argmax over [xR, -xR] per factor, mixed radix."""
    tl.static_assert(BLOCK_K >= 16, "tl.dot needs K >= 16")
    tl.static_assert(BLOCK_C >= 16, "tl.dot needs N >= 16; pad the rotation tile")
    pid_l = tl.program_id(0)
    rnd = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    l_ok = offs_l < L
    qk_base = QK + b * stride_qk_b + h * stride_qk_h + offs_l[:, None] * stride_qk_l
    rot_base = ROTATIONS + h * stride_rot_h + rnd * stride_rot_r + offs_c[None, :] * stride_rot_c
    # Slices of BLOCK_K along D keep the staged rotation tile small (512 buckets: 256 fp32 columns).
    rotated = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(qk_base + offs_k[None, :] * stride_qk_d, mask=l_ok[:, None] & k_ok[None, :], other=0.0)
        rot = tl.load(rot_base + offs_k[:, None] * stride_rot_d, mask=k_ok[:, None] & (offs_c[None, :] < ROT_HALF),
                      other=0.0)
        rotated = tl.dot(x.to(tl.float32), rot, acc=rotated, input_precision="ieee")  # [BLOCK_L, BLOCK_C]

    bucket = tl.zeros([BLOCK_L], dtype=tl.int32)
    start = tl.zeros([], dtype=tl.int32)
    radix = tl.full([], 1, dtype=tl.int32)
    for i in range(N_FACTORS):
        factor = tl.load(FACTORS + i)
        half = factor // 2
        in_factor = ((offs_c >= start) & (offs_c < start + half))[None, :]
        pos = tl.where(in_factor, rotated, float("-inf"))
        neg = tl.where(in_factor, -rotated, float("-inf"))
        best = tl.maximum(tl.max(pos, axis=1), tl.max(neg, axis=1))
        # First maximum of the concatenation [x, -x] wins, as torch.argmax: smallest candidate index among ties.
        col = offs_c[None, :] - start
        first_pos = tl.min(tl.where(pos == best[:, None], col, BLOCK_C * 2), axis=1)
        first_neg = tl.min(tl.where(neg == best[:, None], col + half, BLOCK_C * 2), axis=1)
        bucket += radix * tl.minimum(first_pos, first_neg)
        start += half
        radix *= factor

    valid = tl.load(MASK + b * stride_mask_b + offs_l * stride_mask_l, mask=l_ok, other=0) != 0
    bucket = tl.where(valid, bucket, PAD_BUCKET)
    tl.store(BUCKETS + b * stride_buckets_b + h * stride_buckets_h + rnd * stride_buckets_r
             + offs_l * stride_buckets_l, bucket, mask=l_ok)


@triton.jit(do_not_specialize=["CAUSAL", "WRITE_LSE"])
def _lsh_attend_kernel(
    QK, V, ORDER, MASK, OUT, LSE,
    stride_qk_b, stride_qk_h, stride_qk_l, stride_qk_d,
    stride_v_b, stride_v_h, stride_v_l, stride_v_d,
    stride_order_b, stride_order_h, stride_order_s,
    stride_mask_b, stride_mask_l,
    stride_out_b, stride_out_h, stride_out_s, stride_out_d,
    stride_lse_b, stride_lse_h, stride_lse_s,
    H, L, D, CHUNK, N_CHUNKS, BEFORE, WINDOW, SM_SCALE, EPS, CAUSAL, WRITE_LSE,
    MASK_VALUE: tl.constexpr, SELF_MASK_VALUE: tl.constexpr, SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_M query rows of one sorted chunk attend to the WINDOW chunks starting BEFORE chunks earlier.

    Sorted row ``s`` (of ``N_CHUNKS * CHUNK`` = n_hashes * L) belongs to round ``s // L`` and holds original
    position ``order[s]``; its result goes to row ``(s // L) * L + order[s]`` of OUT (and LSE).
    """
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs K >= 16; pad the head-dim tile")
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs M >= 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs N >= 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m_blocks = tl.cdiv(CHUNK, BLOCK_M)
    chunk_id = pid_m // m_blocks

    qk_base = QK + b * stride_qk_b + h * stride_qk_h
    v_base = V + b * stride_v_b + h * stride_v_h
    order_base = ORDER + b * stride_order_b + h * stride_order_h
    mask_base = MASK + b * stride_mask_b

    offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < CHUNK
    d_ok = offs_d < D
    s_q = chunk_id * CHUNK + offs_m
    if SORTED:
        q_pos = tl.load(order_base + s_q * stride_order_s, mask=m_ok, other=0).to(tl.int64)
    else:
        q_pos = s_q.to(tl.int64)
    q = tl.load(qk_base + q_pos[:, None] * stride_qk_l + offs_d[None, :] * stride_qk_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Window chunk w is sorted chunk (chunk_id - BEFORE + w) mod N_CHUNKS, the wrap-around of look_around;
    # adding BEFORE * N_CHUNKS keeps the operand of % non-negative.
    first_chunk = chunk_id - BEFORE + BEFORE * N_CHUNKS
    window_rows = WINDOW * CHUNK
    for start_n in range(0, window_rows, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # row within the window; a block may straddle two chunks
        n_ok = offs_n < window_rows
        s_k = ((first_chunk + offs_n // CHUNK) % N_CHUNKS) * CHUNK + offs_n % CHUNK
        if SORTED:
            k_pos = tl.load(order_base + s_k * stride_order_s, mask=n_ok, other=0).to(tl.int64)
        else:
            k_pos = s_k.to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(qk_base + k_pos[:, None] * stride_qk_l + offs_d[None, :] * stride_qk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_pos[:, None] * stride_v_l + offs_d[None, :] * stride_v_d, mask=kv_mask, other=0.0)

        k32 = k.to(tl.float32)
        key_scale = SM_SCALE / tl.sqrt(tl.sum(k32 * k32, axis=1) / D + EPS)  # 1 / (rms(k) * sqrt(D))
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * key_scale[None, :]

        allowed = tl.load(mask_base + k_pos * stride_mask_l, mask=n_ok, other=0)[None, :] != 0
        # CAUSAL is a runtime flag (see the module docstring): a select, no branch, in the pipelined loop.
        allowed = allowed & ((q_pos[:, None] >= k_pos[None, :]) | (CAUSAL == 0))
        scores = tl.where(allowed, scores, MASK_VALUE)
        scores = tl.where(q_pos[:, None] == k_pos[None, :], SELF_MASK_VALUE, scores)
        scores = tl.where(n_ok[None, :], scores, float("-inf"))

        # Every block holds at least one in-window key with a finite score, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # exp(m - lse), not 1 / l: the reference's exp(score - lse) rounding (see the module docstring).
    lse = m_i + tl.log(l_i)
    out = acc * tl.exp(m_i - lse)[:, None]
    row = (s_q // L).to(tl.int64) * L + q_pos
    tl.store(OUT + b * stride_out_b + h * stride_out_h + row[:, None] * stride_out_s + offs_d[None, :] * stride_out_d,
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if WRITE_LSE != 0:
        tl.store(LSE + b * stride_lse_b + h * stride_lse_h + row * stride_lse_s, lse, mask=m_ok)


@triton.jit
def _lsh_combine_kernel(
    ROUNDS, LSE, OUT,
    stride_rounds_b, stride_rounds_h, stride_rounds_r, stride_rounds_l, stride_rounds_d,
    stride_lse_b, stride_lse_h, stride_lse_r, stride_lse_l,
    stride_out_b, stride_out_h, stride_out_l, stride_out_d,
    H, L, D, N_HASHES,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[l] = sum_r softmax_r(lse[r, l]) * rounds[r, l] for BLOCK_L positions of one (b, h)."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    tile_ok = l_ok[:, None] & (offs_d < D)[None, :]
    lse_base = LSE + b * stride_lse_b + h * stride_lse_h + offs_l * stride_lse_l
    rounds_base = (ROUNDS + b * stride_rounds_b + h * stride_rounds_h + offs_l[:, None] * stride_rounds_l
                   + offs_d[None, :] * stride_rounds_d)

    # logsumexp over rounds as torch computes it (max, then log of the sum of shifted exponentials), and weights
    # exp(lse_r - logsumexp) as the reference forms them (see the module docstring).
    lse_max = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    for r in range(N_HASHES):
        lse_max = tl.maximum(lse_max, tl.load(lse_base + r * stride_lse_r, mask=l_ok, other=0.0))
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    for r in range(N_HASHES):
        total += tl.exp(tl.load(lse_base + r * stride_lse_r, mask=l_ok, other=0.0) - lse_max)
    lse_all = lse_max + tl.log(total)

    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for r in range(N_HASHES):
        weight = tl.exp(tl.load(lse_base + r * stride_lse_r, mask=l_ok, other=0.0) - lse_all)
        acc += weight[:, None] * tl.load(rounds_base + r * stride_rounds_r, mask=tile_ok, other=0.0).to(tl.float32)
    out_ptrs = OUT + b * stride_out_b + h * stride_out_h + offs_l[:, None] * stride_out_l
    tl.store(out_ptrs + offs_d[None, :] * stride_out_d, acc.to(OUT.dtype.element_ty), mask=tile_ok)
