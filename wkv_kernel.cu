// Bi-WKV4 forward and backward kernels, loaded by hpcm.py with cupy.RawModule.
//
// Per channel, with w and u already divided by T (hpcm.py does that, as Vision-RWKV's call site does):
//   y_t = (sum_{i!=t} e^{-(|t-i|-1)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i!=t} e^{-(|t-i|-1)w + k_i} + e^{u+k_t})
// Every sum lives in a state (r, n, a, b) that means e^{r - n w} (a, b): r is the key of the largest term and n
// its distance in tokens, so the running maximum is never decayed step by step (no rounding error piles up over
// long T), and exponent differences are taken as (r1 - r2) - (n1 - n2) w. Adding a term rescales by
// e^{x - max} <= 1, so nothing overflows for any k or w, and no sum is ever subtracted from another
// (Vision-RWKV's kernel subtracts running sums, which is why it loses all precision once w*T is large).
// Keys are taken relative to k[b, 0, c] (y does not change when a channel's keys shift together), which keeps
// every exponent small when k carries a large offset.
//
// Backward, with Z_t the denominator, q_t = gy_t / Z_t = gy_t e^{kappa_t} (kappa_t = -log Z_t):
//   gv_i = e^{k_i} (G_i + e^u q_i),  gk_i = e^{k_i} (v_i (G_i + e^u q_i) - (H_i + e^u q_i y_i)),
//   gu   = sum_t e^{u+k_t} q_t (v_t - y_t),
//   gw   = -e^{-w} sum_j (A_j G>_j - B_j H>_j + C_j G<_j - D_j H<_j),
// where A, B (C, D) are the forward (reverse) numerator / denominator sums of the forward pass and G, H are the
// same decayed sums taken over the keys kappa_t and the values gy_t, gy_t y_t (G = G< + G>). The gradient is
// therefore two more Bi-WKV scans; the states stay bounded because e^{k_i + s_ti} <= Z_t.
//
// Layout: k, v, y, gy, gk, gv are (B, T, C) contiguous. T is cut into chunks of BL = LT * NS tokens; a block owns
// one chunk of CW channels; thread (x, s) owns the LT tokens s*LT.. of channel x. Forward and backward pass
// take three launches each (both scan directions in every launch):
//   wkv_forward<F, false> / wkv_backward<F, false>: each chunk's two summaries (what it hands right and left),
//   wkv_carry<F>:  a serial pass over the chunks of each (b, c), turning summaries into incoming states,
//   wkv_forward<F, true> / wkv_backward<F, true>: recompute each chunk from its incoming states, write outputs.
// Inside a block the sub-chunk summaries are combined by a Hillis-Steele scan in shared memory.

#ifndef LT
#define LT 8
#endif
#ifndef NS
#define NS 16
#endif
#define CW 32
#define BL (LT * NS)

template <typename F> struct St { F r, n, a, b; };

__device__ __forceinline__ float ex(float x) { return __expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

// "minus infinity" that stays finite under the few additions a state sees, so no inf - inf appears
template <typename F> __device__ __forceinline__ St<F> empty() {
    return {F(sizeof(F) == 4 ? -1e37 : -1e300), F(0), F(0), F(0)};
}

template <typename F> __device__ __forceinline__ F expo(St<F> s, F w) { return s.r - s.n * w; }

// x decayed by dx more tokens, plus y; one of the two scale factors is exactly 1
template <typename F> __device__ __forceinline__ St<F> merge(St<F> x, F dx, St<F> y, F w) {
    F nx = x.n + dx;
    F diff = (x.r - y.r) - (nx - y.n) * w;
    F e = ex(-fabs(diff));
    bool keep = diff >= F(0);
    F e1 = keep ? F(1) : e, e2 = keep ? e : F(1);
    return {keep ? x.r : y.r, keep ? nx : y.n, x.a * e1 + y.a * e2, x.b * e1 + y.b * e2};
}

template <typename F> __device__ __forceinline__ void push(St<F> &s, F w, F key, F va, F vb) {
    s = merge(s, F(1), St<F>{key, F(0), va, vb}, w);
}

struct Tile {
    int b, j, c, s, cs, t0, len, nchunk;
    bool live;
    long long off;  // element offset of token t0 of channel c in a (B, T, C) tensor
    long long row;  // b * nchunk + j: the chunk's row in the (B, nchunk, 8, C) state buffers
};

__device__ __forceinline__ Tile tile(int B, int T, int C) {
    Tile q;
    int ctiles = (C + CW - 1) / CW;
    q.nchunk = (T + BL - 1) / BL;
    long long bid = blockIdx.x;
    int ct = bid % ctiles;
    bid /= ctiles;
    q.j = bid % q.nchunk;
    q.b = bid / q.nchunk;
    q.c = ct * CW + threadIdx.x;
    q.s = threadIdx.y;
    q.cs = q.j * BL;
    q.t0 = q.cs + q.s * LT;
    q.len = max(0, min(LT, T - q.t0));
    q.live = q.c < C;
    q.off = ((long long)q.b * T + q.t0) * C + q.c;
    q.row = (long long)q.b * q.nchunk + q.j;
    return q;
}

// states of chunk j of (b, c): slot 0 forward (r, n, a, b), slot 1 reverse; (B, nchunk, 8, C)
template <typename F> __device__ __forceinline__ St<F> load_state(const F *S, long long row, int slot, int C, int c) {
    const F *p = S + (row * 8 + slot * 4) * C + c;
    return {p[0], p[C], p[2 * C], p[3 * C]};
}
template <typename F> __device__ __forceinline__ void store_state(F *S, long long row, int slot, int C, int c, St<F> v) {
    F *p = S + (row * 8 + slot * 4) * C + c;
    p[0] = v.r;
    p[C] = v.n;
    p[2 * C] = v.a;
    p[3 * C] = v.b;
}

// tokens held by sub-chunks lo..hi of the chunk starting at cs
__device__ __forceinline__ int tokens(int lo, int hi, int cs, int T) {
    return max(0, min((hi - lo + 1) * LT, T - (cs + lo * LT)));
}

// fw, rv: this sub-chunk's own summaries (forward: e^{-(len-1-p)w}-weighted, reverse: e^{-p w}-weighted).
// cf, cr: states entering the chunk from the left / right. On return fw, rv are the states entering this
// sub-chunk from the left / right, and tf, tr the whole chunk's summaries.
template <typename F>
__device__ void block_scan(St<F> &fw, St<F> &rv, St<F> cf, St<F> cr, F w, int cs, int T, St<F> &tf, St<F> &tr) {
    __shared__ F sh[8][NS][CW];
    const int s = threadIdx.y, x = threadIdx.x;
    auto put = [&](St<F> f, St<F> r) {
        sh[0][s][x] = f.r; sh[1][s][x] = f.n; sh[2][s][x] = f.a; sh[3][s][x] = f.b;
        sh[4][s][x] = r.r; sh[5][s][x] = r.n; sh[6][s][x] = r.a; sh[7][s][x] = r.b;
    };
    auto getf = [&](int i) { return St<F>{sh[0][i][x], sh[1][i][x], sh[2][i][x], sh[3][i][x]}; };
    auto getr = [&](int i) { return St<F>{sh[4][i][x], sh[5][i][x], sh[6][i][x], sh[7][i][x]}; };
    put(fw, rv);
    __syncthreads();
    for (int d = 1; d < NS; d <<= 1) {
        St<F> lf = empty<F>(), rr = empty<F>();
        if (s >= d) lf = getf(s - d);
        if (s + d < NS) rr = getr(s + d);
        __syncthreads();
        if (s >= d) fw = merge(lf, F(tokens(max(s - d + 1, 0), s, cs, T)), fw, w);
        if (s + d < NS) rv = merge(rr, F(tokens(s, s + d - 1, cs, T)), rv, w);
        put(fw, rv);
        __syncthreads();
    }
    tf = getf(NS - 1);
    tr = getr(0);
    fw = s == 0 ? cf : merge(cf, F(tokens(0, s - 1, cs, T)), getf(s - 1), w);
    rv = s == NS - 1 ? cr : merge(cr, F(tokens(s + 1, NS - 1, cs, T)), getr(s + 1), w);
    __syncthreads();
}

// the sub-chunk's own forward and reverse summaries of keys `key` and values (va, vb)
template <typename F>
__device__ __forceinline__ void summaries(const F *key, const F *va, const F *vb, int len, F w, St<F> &fw, St<F> &rv) {
    fw = empty<F>();
    rv = empty<F>();
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < len) push(fw, w, key[p], va[p], vb[p]);
#pragma unroll
    for (int p = LT - 1; p >= 0; --p)
        if (p < len) push(rv, w, key[p], va[p], vb[p]);
}

// Summarise this thread's tokens and scan the summaries across the block. With `carries` (the chunk's incoming
// states) fw, rv come back as the states entering this sub-chunk; with `totals` the chunk's summaries are stored.
template <typename F>
__device__ __forceinline__ void chunk_scan(const F *key, const F *va, const F *vb, const Tile &q, F w, int T, int C,
                                           const F *carries, F *totals, St<F> &fw, St<F> &rv) {
    summaries(key, va, vb, q.len, w, fw, rv);
    St<F> cf = empty<F>(), cr = empty<F>(), tf, tr;
    if (carries && q.live) {
        cf = load_state(carries, q.row, 0, C, q.c);
        cr = load_state(carries, q.row, 1, C, q.c);
    }
    block_scan(fw, rv, cf, cr, w, q.cs, T, tf, tr);
    if (totals && q.s == 0 && q.live) {
        store_state(totals, q.row, 0, C, q.c, tf);
        store_state(totals, q.row, 1, C, q.c, tr);
    }
}

// y, v - y and log Z at one token from the exclusive forward state A (exponent ma), reverse state C (exponent mc)
// and the bonus term; v - y is formed without the bonus token, so it does not cancel when that token dominates
template <typename F>
__device__ __forceinline__ void output(F ma, F aa, F ab, F mc, F ca, F cb, F uk, F v, F &y, F &vy, F &logz) {
    F M = fmax(fmax(ma, mc), uk);
    F eA = ex(ma - M), eC = ex(mc - M), eU = ex(uk - M);
    F others = ab * eA + cb * eC, den = others + eU, num = aa * eA + ca * eC;
    y = (num + v * eU) / den;
    vy = (v * others - num) / den;
    logz = M + lg(den);
}

template <typename F, bool APPLY>
__global__ void __launch_bounds__(CW * NS)
wkv_forward(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
            const F *__restrict__ v_, F *__restrict__ S, F *__restrict__ y_) {
    Tile q = tile(B, T, C);
    const F w = q.live ? w_[q.c] : F(0), u = q.live ? u_[q.c] : F(0);
    const F k0 = q.live ? k_[(long long)q.b * T * C + q.c] : F(0);
    F kk[LT], vv[LT], one[LT];
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        bool ok = q.live && p < q.len;
        kk[p] = ok ? k_[q.off + (long long)p * C] - k0 : F(0);
        vv[p] = ok ? v_[q.off + (long long)p * C] : F(0);
        one[p] = F(1);
    }
    St<F> fw, rv;
    chunk_scan(kk, vv, one, q, w, T, C, APPLY ? S : nullptr, APPLY ? nullptr : S, fw, rv);
    if (!APPLY) return;
    F cm[LT], ca[LT], cb[LT];
    St<F> st = rv;
#pragma unroll
    for (int p = LT - 1; p >= 0; --p)
        if (p < q.len) {
            cm[p] = expo(st, w); ca[p] = st.a; cb[p] = st.b;
            push(st, w, kk[p], vv[p], F(1));
        }
    st = fw;
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < q.len) {
            F y, vy, logz;
            output(expo(st, w), st.a, st.b, cm[p], ca[p], cb[p], u + kk[p], vv[p], y, vy, logz);
            if (q.live) y_[q.off + (long long)p * C] = y;
            push(st, w, kk[p], vv[p], F(1));
        }
}

template <typename F>
__global__ void wkv_carry(int B, int T, int C, const F *__restrict__ w_, F *__restrict__ S) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * C) return;
    const int b = idx / C, c = idx % C;
    const int nchunk = (T + BL - 1) / BL;
    const F w = w_[c];
    St<F> run = empty<F>();
    for (int j = 0; j < nchunk; ++j) {
        long long row = (long long)b * nchunk + j;
        St<F> sf = load_state(S, row, 0, C, c);
        store_state(S, row, 0, C, c, run);
        run = merge(run, F(min(BL, T - j * BL)), sf, w);
    }
    run = empty<F>();
    for (int j = nchunk - 1; j >= 0; --j) {
        long long row = (long long)b * nchunk + j;
        St<F> sr = load_state(S, row, 1, C, c);
        store_state(S, row, 1, C, c, run);
        run = merge(run, F(min(BL, T - j * BL)), sr, w);
    }
}

// APPLY = false: write each chunk's gradient summaries into G. APPLY = true: G holds the gradient carries;
// write gk, gv and per-chunk partial sums of gw, gu into gw_, gu_ ((B, nchunk, C), summed by the caller).
template <typename F, bool APPLY>
__global__ void __launch_bounds__(CW * NS)
wkv_backward(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
             const F *__restrict__ v_, const F *__restrict__ gy_, const F *__restrict__ S, F *__restrict__ G,
             F *__restrict__ gk_, F *__restrict__ gv_, F *__restrict__ gw_, F *__restrict__ gu_) {
    Tile q = tile(B, T, C);
    const F w = q.live ? w_[q.c] : F(0), u = q.live ? u_[q.c] : F(0);
    const F k0 = q.live ? k_[(long long)q.b * T * C + q.c] : F(0);
    F kk[LT], vv[LT], gg[LT], one[LT];
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        bool ok = q.live && p < q.len;
        kk[p] = ok ? k_[q.off + (long long)p * C] - k0 : F(0);
        vv[p] = ok ? v_[q.off + (long long)p * C] : F(0);
        gg[p] = ok ? gy_[q.off + (long long)p * C] : F(0);
        one[p] = F(1);
    }
    St<F> fw, rv;
    chunk_scan(kk, vv, one, q, w, T, C, S, (F *)nullptr, fw, rv);
    // the forward pass again: A from the left per token, then C from the right with kappa = -log Z, gy y, v - y
    F am[LT], aa[LT], ab[LT], cm[LT], ca[LT], cb[LT], ka[LT], gyy[LT], vy[LT];
    St<F> st = fw;
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < q.len) {
            am[p] = expo(st, w); aa[p] = st.a; ab[p] = st.b;
            push(st, w, kk[p], vv[p], F(1));
        }
    st = rv;
#pragma unroll
    for (int p = LT - 1; p >= 0; --p) {
        ka[p] = F(0); gyy[p] = F(0); vy[p] = F(0);
        if (p < q.len) {
            cm[p] = expo(st, w); ca[p] = st.a; cb[p] = st.b;
            F y, logz;
            output(am[p], aa[p], ab[p], cm[p], ca[p], cb[p], u + kk[p], vv[p], y, vy[p], logz);
            ka[p] = -logz;
            gyy[p] = gg[p] * y;
            push(st, w, kk[p], vv[p], F(1));
        }
    }
    chunk_scan(ka, gg, gyy, q, w, T, C, APPLY ? (const F *)G : nullptr, APPLY ? nullptr : G, fw, rv);
    if (!APPLY) return;
    // reverse gradient scan G>: the A/B half of gw, the right-hand part of gk, gv (kept in aa, ab) and gu
    F gw = 0, gu = 0;
    st = rv;
#pragma unroll
    for (int p = LT - 1; p >= 0; --p)
        if (p < q.len) {
            F mg = expo(st, w);
            gw += ex(am[p] + mg - w) * (aa[p] * st.a - ab[p] * st.b);
            F ek = ex(kk[p] + mg), eb = ex(u + kk[p] + ka[p]) * gg[p];
            gu += eb * vy[p];
            aa[p] = ek * (vv[p] * st.a - st.b) + eb * vy[p];
            ab[p] = ek * st.a + eb;
            push(st, w, ka[p], gg[p], gyy[p]);
        }
    // forward gradient scan G<: the C/D half of gw, and the outputs
    st = fw;
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < q.len) {
            F mg = expo(st, w);
            gw += ex(cm[p] + mg - w) * (ca[p] * st.a - cb[p] * st.b);
            F ek = ex(kk[p] + mg);
            if (q.live) {
                gk_[q.off + (long long)p * C] = aa[p] + ek * (vv[p] * st.a - st.b);
                gv_[q.off + (long long)p * C] = ab[p] + ek * st.a;
            }
            push(st, w, ka[p], gg[p], gyy[p]);
        }
    __shared__ F red[2][NS][CW];
    red[0][q.s][threadIdx.x] = gw;
    red[1][q.s][threadIdx.x] = gu;
    __syncthreads();
    if (q.s == 0 && q.live) {
        F sw = 0, su = 0;
        for (int i = 0; i < NS; ++i) {
            sw += red[0][i][threadIdx.x];
            su += red[1][i][threadIdx.x];
        }
        gw_[q.row * C + q.c] = -sw;
        gu_[q.row * C + q.c] = su;
    }
}
