// Bi-WKV4 forward and backward on the GPU, loaded by hpcm.py with cupy.RawModule. Read it in this order:
//   0. the running-maximum state every kernel here uses (St, merge, push),
//   1. the naive kernels: one thread per (b, c) walks its row right to left, then left to right, forward and
//      backward; one launch a pass,
//   2. split rows: the same walks with each row cut into P pieces, one thread a piece, the pieces joined by a scan
//      in shared memory; still one launch a pass, the faster kernels for short rows (hpcm.bi_wkv's choice),
//   3. the chunked kernels: the walks cut into chunks of BL tokens, T / LT threads a row (LT tokens a thread);
//      three launches a pass (summaries, carries, apply); fwd+bwd 11x faster than Vision-RWKV's kernel at
//      (64, 640, 4096) (GPU time, H100 and H200),
//   4. the lean frames: an optimisation of kernel 3's per-thread work (one ex2 and two fma per token instead of a
//      rescaled merge), taken where its checks pass and kernel 3's exact path otherwise.
// hpcm.py's bi_wkv_dense is the formula and bi_wkv_scan the same walks in torch; every path is tested against the
// dense float64 one (test_all.py).
//
// Per channel, with w and u the raw decay and bonus (the kernels divide them by T, as Vision-RWKV's call site does):
//   y_t = (sum_{i!=t} e^{-(|t-i|-1)w/T + k_i} v_i + e^{u/T + k_t} v_t)
//         / (sum_{i!=t} e^{-(|t-i|-1)w/T + k_i} + e^{u/T + k_t})
// The gradients are written once, in hpcm.py above _BiWKVScan.backward: the backward is one more Bi-WKV walk, over
// keys kappa_t = -log Z_t and values gy_t, gy_t y_t, with distance-weighted sums (a2, b2) for gw. The forward writes
// log Z (unless no gradient is wanted, chunked kernels only) so that the backward never recomputes the forward.
//
// Every sum lives in a state (r, n, a, b) that means e^{r - n w} (a, b): r is the key of the largest term and n
// its distance in tokens, so the running maximum is never decayed step by step (no rounding error piles up over
// long T), and exponent differences are taken as (r1 - r2) - (n1 - n2) w. Adding a term rescales by
// e^{x - max} <= 1, so nothing overflows for any k or w of either sign, and no sum is ever subtracted from another
// (Vision-RWKV's kernel subtracts running sums, which is why it loses all precision once w is large). Keys are taken
// relative to k[b, 0, c] (y does not change when a channel's keys shift together), which keeps every exponent small
// when k carries a large offset. All exponents are in base 2: keys, w and u are scaled by log2 e on load, and log Z
// is written as log2 Z relative to k[b, 0, c] log2 e and, where w < 0 lets far tokens dominate, relative to the
// decay of the farthest term (section 0's nstar), so that it stays near 0 and keeps float32's precision at any |w|.
//
// Layout: k, v, y, log Z, gy, gk, gv are (B, T, C) contiguous; w, u are (C,).

#ifndef LT
#define LT 8
#endif
#ifndef NS
#define NS 16
#endif
#ifndef MIN_BLOCKS  // blocks per SM the register budget must allow: 2 caps the apply kernels at 64 registers (the
#define MIN_BLOCKS 2   // float ones fit; the double ones, used by tests only, spill)
#endif
#ifndef SUM_BLOCKS  // the summary kernels fit in 40 registers: 3 blocks per SM (ncu, H100: fwd summaries
#define SUM_BLOCKS 3   // 0.60 -> 0.48 ms, bwd 0.84 -> 0.70 ms at (64, 640, 4096))
#endif
#ifndef CW  // channels per block: one warp's lanes (hpcm.py passes its _WKV_CW, so the two cannot disagree)
#define CW 32
#endif
#define BL (LT * NS)
static_assert(CW == 32, "a block row of channels is one warp, one lane per channel");
static_assert(12 * NS * CW * sizeof(double) <= 48 * 1024, "wkv_backward<double>'s shared memory exceeds 48 KiB");

// ================================================================================================================
// 0. The running-maximum state

// Exponents are in base 2 (keys, w and u are scaled by log2 e on load), so every exponential is one ex2 instruction.
// y = num / den and log den with den in [1, T]: the fast instructions (ex2 2 ulp, __fdividef 2 ulp there, lg2
// 2^-22 absolute on [0.5, 2] and a few ulp beyond) keep the kernels' measured error under 1e-6.
#define L2E 1.4426950408889634
__device__ __forceinline__ float ex(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ double ex(double x) { return exp2(x); }
__device__ __forceinline__ float lg(float x) { float y; asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ double lg(double x) { return log2(x); }
__device__ __forceinline__ float dv(float x, float y) { return __fdividef(x, y); }
__device__ __forceinline__ double dv(double x, double y) { return x / y; }

// w or u of channel c divided by T, in log2 units (__drcp_rn: 1 / T without a division's slow-path call)
template <typename F> __device__ __forceinline__ F per_token(const F *x, int c, int T) {
    return F(double(x[c]) * L2E * __drcp_rn(double(T)));
}

// a2, b2: the same sums weighted by each term's distance, carried only when D (the backward's states, for gw)
template <typename F> struct St { F r, n, a, b, a2, b2; };

// "minus infinity" that stays finite under the few additions a state sees, so no inf - inf appears
template <typename F> __device__ __forceinline__ St<F> empty() {
    return {F(sizeof(F) == 4 ? -1e37 : -1e300), F(0), F(0), F(0), F(0), F(0)};
}

// the state's exponent, relative to `ref` tokens of decay (its largest term's key and distance, less ref)
template <typename F> __device__ __forceinline__ F expo(St<F> s, F w, F ref = F(0)) { return s.r - (s.n - ref) * w; }

// x decayed by dx more tokens, plus y; one of the two scale factors is exactly 1. Decaying x moves each of its
// terms dx tokens further away, hence the dx * x.a in the distance-weighted sums.
template <typename F, bool D> __device__ __forceinline__ St<F> merge(St<F> x, F dx, St<F> y, F w) {
    F nx = x.n + dx;
    F diff = (x.r - y.r) - (nx - y.n) * w;
    F e = ex(-fabs(diff));
    bool keep = diff >= F(0);
    F e1 = keep ? F(1) : e, e2 = keep ? e : F(1);
    St<F> m{keep ? x.r : y.r, keep ? nx : y.n, x.a * e1 + y.a * e2, x.b * e1 + y.b * e2, F(0), F(0)};
    if (D) {
        m.a2 = (x.a2 + dx * x.a) * e1 + y.a2 * e2;
        m.b2 = (x.b2 + dx * x.b) * e1 + y.b2 * e2;
    }
    return m;
}

// the state one token further on, after token (key, va, vb) whose key comes with n0 tokens of decay counted already
template <typename F, bool D> __device__ __forceinline__ void push(St<F> &s, F w, F key, F va, F vb, F n0 = F(0)) {
    s = merge<F, D>(s, F(1), St<F>{key, n0, va, vb, F(0), F(0)}, w);
}

// With w < 0 far tokens weigh more, and log2 Z_t reaches about (max(t, T-1-t) - 1) |w|: written as it is, float32
// would keep it to ~|w| 1e-7 and the gradients, which take it as token t's key kappa_t = -log2 Z_t, would lose their
// precision with it. So where the decay lets far tokens outweigh near ones by more than 2^32 (w (T - 1) < -32), the
// kernels write log2 Z_t + nstar_t w, a number near 0 (nstar_t = max(t, T-1-t) - 1, the decay of the farthest term),
// exponents near token t are taken relative to nstar_t tokens of decay (expo's ref), and the backward pushes token t's
// key with -nstar_t tokens of decay counted (push's n0): every exponent stays a difference of keys and an integer
// times w, as in the states. Elsewhere nstar_t = 0 and log2 Z_t is written as it is.
template <typename F> __device__ __forceinline__ bool far_ref(F w, int T) { return w * F(T - 1) < F(-32); }
template <typename F> __device__ __forceinline__ F nstar(bool far, int t, int T) {
    return far ? F(max(0, max(t, T - 1 - t) - 1)) : F(0);
}

// ================================================================================================================
// 1. The naive kernels: one thread per (b, c), grid ceil(B C / 32) blocks of 32 threads (adjacent threads take
// adjacent channels, so every load of a warp is one 128-byte line). Each walks its row twice, O(T) per thread.
// The walks are written for a piece t0..t1-1 of a row that enters with the sums of the rest of the row (section 2
// splits rows into pieces); here the piece is the whole row and the sums entering it are empty.

// Calls step(t, load(t)) for t = t0..t1-1 (t1-1..t0 when REVERSE), loading TB tokens before stepping through
// them: a naive thread walks its row alone, and NAIVE_TB = 8 keeps 8 of its loads in flight instead of one (the split
// kernels, with many threads a row, take 2: section 2).
#define NAIVE_TB 8
template <bool REVERSE, int TB, typename Load, typename Step>
__device__ __forceinline__ void walk(int t0, int t1, Load load, Step step) {
    for (int i0 = 0; i0 < t1 - t0; i0 += TB) {
        decltype(load(0)) x[TB];
#pragma unroll
        for (int j = 0; j < TB; ++j)
            if (i0 + j < t1 - t0) x[j] = load(REVERSE ? t1 - 1 - (i0 + j) : t0 + i0 + j);
#pragma unroll
        for (int j = 0; j < TB; ++j)
            if (i0 + j < t1 - t0) step(REVERSE ? t1 - 1 - (i0 + j) : t0 + i0 + j, x[j]);
    }
}

// a side's sums as (log2 of its denominator relative to ref tokens of decay, the mean of its values); an empty side
// weighs nothing
template <typename F> __device__ __forceinline__ void log_mean(St<F> s, F w, F ref, F &l, F &mean) {
    const bool any = s.b > F(0);
    l = any ? expo(s, w, ref) + lg(s.b) : empty<F>().r;
    mean = any ? dv(s.a, s.b) : F(0);
}

// The forward over tokens t0..t1-1 of a row of T (k, v, y, logz point at the row's token 0; tokens are C apart),
// entering with the sums of the tokens left of t0 (fw) and right of t1 - 1 (rv). Right to left, the sums entering
// each token from the right are parked in y and log Z as (mean, log2 den); left to right, y_t is the mean of the
// left side's mean, the right side's and v_t, weighted by their denominators and the bonus e^{u + k_t};
// log2 Z_t = log2 of the sum of those three weights (written relative to nstar_t, as every exponent at token t).
template <typename F, int TB = NAIVE_TB>
__device__ __forceinline__ void forward_walks(int t0, int t1, int T, int C, F w, F u, F k0, const F *k, const F *v,
                                              F *y, F *logz, St<F> fw, St<F> rv) {
    const bool far = far_ref(w, T);
    struct Token { F key, v, mean, logden; };  // key and value; the right side's sums, parked
    walk<true, TB>(t0, t1, [&](int t) { return Token{(k[(long long)t * C] - k0) * F(L2E), v[(long long)t * C]}; },
               [&](int t, Token x) {
                   log_mean(rv, w, nstar<F>(far, t, T), logz[(long long)t * C], y[(long long)t * C]);
                   push<F, false>(rv, w, x.key, x.v, F(1));
               });
    walk<false, TB>(t0, t1, [&](int t) {
        const long long o = (long long)t * C;
        return Token{(k[o] - k0) * F(L2E), v[o], y[o], logz[o]};
    }, [&](int t, Token x) {
        const F ns = nstar<F>(far, t, T);
        F left, left_mean;
        log_mean(fw, w, ns, left, left_mean);
        const F uk = fma(ns, w, u + x.key), top = fmax(fmax(left, x.logden), uk);
        const F eL = ex(left - top), eR = ex(x.logden - top), eU = ex(uk - top), den = eL + eR + eU;
        y[(long long)t * C] = dv(fma(eL, left_mean, fma(eR, x.mean, eU * x.v)), den);
        logz[(long long)t * C] = top + lg(den);
        push<F, false>(fw, w, x.key, x.v, F(1));
    });
}

template <typename F>
__global__ void wkv_forward_naive(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_,
                                  const F *__restrict__ k_, const F *__restrict__ v_, F *__restrict__ y_,
                                  F *__restrict__ logz_) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * C) return;
    const int c = i % C;
    const long long o = (i - c) * T + c;  // token 0 of row i = b C + c: b T C + c
    forward_walks(0, T, T, C, per_token(w_, c, T), per_token(u_, c, T), k_[o], k_ + o, v_ + o, y_ + o, logz_ + o,
                  empty<F>(), empty<F>());
}

// The gradient walk (hpcm.py's formulas) over tokens t0..t1-1 of a row of T, entering with the gradient sums of the
// tokens left of t0 (fw) and right of t1 - 1 (rv): right to left, each token's share of gk, gv from the sums entering
// it from the right is parked in gk, gv; left to right, the left side's share and the bonus term's are added. e is
// e^{k_t} times the state's scale; the row's sums for gw, gu (before the division by T) are added to gw, gu.
template <typename F, int TB = NAIVE_TB>
__device__ __forceinline__ void backward_walks(int t0, int t1, int T, int C, F w, F u, F k0, const F *k, const F *v,
                                               const F *y, const F *logz, const F *gy, F *gk, F *gv, St<F> fw,
                                               St<F> rv, F &gw, F &gu) {
    const bool far = far_ref(w, T);
    // kappa = -(log2 Z + nstar w): token t's key with -nstar_t tokens of decay; gk, gv: the right side's share, parked
    struct Token { F key, v, y, kappa, gy, gk, gv; };
    auto load = [&](int t, bool parked) {
        const long long o = (long long)t * C;
        return Token{(k[o] - k0) * F(L2E), v[o], y[o], -logz[o], gy[o], parked ? gk[o] : F(0), parked ? gv[o] : F(0)};
    };
    walk<true, TB>(t0, t1, [&](int t) { return load(t, false); }, [&](int t, Token x) {
        const F e = ex(x.key + expo(rv, w));
        gk[(long long)t * C] = e * fma(x.v, rv.a, -rv.b);
        gv[(long long)t * C] = e * rv.a;
        gw = fma(e, fma(x.v, rv.a2, -rv.b2), gw);
        push<F, true>(rv, w, x.kappa, x.gy, x.gy * x.y, -nstar<F>(far, t, T));
    });
    walk<false, TB>(t0, t1, [&](int t) { return load(t, true); }, [&](int t, Token x) {
        const F ns = nstar<F>(far, t, T), e = ex(x.key + expo(fw, w));
        const F eb = ex(fma(ns, w, u + x.key + x.kappa)) * x.gy, vy = eb * (x.v - x.y);  // the bonus: e^{u+k_t} q_t
        gk[(long long)t * C] = x.gk + fma(e, fma(x.v, fw.a, -fw.b), vy);
        gv[(long long)t * C] = x.gv + fma(e, fw.a, eb);
        gw = fma(e, fma(x.v, fw.a2, -fw.b2), gw);
        gu += vy;
        push<F, true>(fw, w, x.kappa, x.gy, x.gy * x.y, -ns);
    });
}

// gw, gu go to (B, C) partial sums (for the raw w, u: divided by T) that the caller adds up over b
template <typename F>
__global__ void wkv_backward_naive(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_,
                                   const F *__restrict__ k_, const F *__restrict__ v_, const F *__restrict__ y_,
                                   const F *__restrict__ logz_, const F *__restrict__ gy_, F *__restrict__ gk_,
                                   F *__restrict__ gv_, F *__restrict__ gw_, F *__restrict__ gu_) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * C) return;
    const int c = i % C;
    const long long o = (i - c) * T + c;
    F gw = 0, gu = 0;
    backward_walks(0, T, T, C, per_token(w_, c, T), per_token(u_, c, T), k_[o], k_ + o, v_ + o, y_ + o, logz_ + o,
                   gy_ + o, gk_ + o, gv_ + o, empty<F>(), empty<F>(), gw, gu);
    gw_[i] = dv(-gw, F(T));
    gu_[i] = dv(gu, F(T));
}

// ================================================================================================================
// 2. Split rows: section 1's walks with each row cut into P pieces of ceil(T / P) tokens, one thread a piece, and
// a block of (W channels, P pieces) a row tile: grid ceil(C / W) B blocks of W P = 512 threads. A thread sums its
// piece both ways (the piece's two summaries); block_scan turns the block's summaries into the sums entering every
// piece from the left and from the right; then the thread walks its piece as section 1's thread walks its row.
// One launch a pass, like section 1, with P times its threads: the faster kernels for short rows (hpcm.bi_wkv's
// choice); for long rows a thread's piece gets long and section 3's chunks win. hpcm.py picks P from T (16, 32 or 64:
// pieces of about 8 tokens) and W = 512 / P: more pieces a row and fewer channels a block spread a few long rows
// over more SMs. Two blocks an SM (64 registers a thread) with a prefetch of 2 tokens a walk (no spills): at
// (B, C, T) = (8, 256, 1024) 96 us GPU time fwd+bwd where 32 channels x 16 pieces, one block an SM, took 154 us
// (H200, torch.profiler's kernel times).
#define SPLIT_TB 2
#define SPLIT_BLOCKS 2

// a state's NV = 4 (or 6 with D) values, `stride` elements apart
template <typename F, bool D> __device__ __forceinline__ St<F> get_state(const F *p, int stride) {
    St<F> s{p[0], p[stride], p[2 * stride], p[3 * stride], F(0), F(0)};
    if (D) {
        s.a2 = p[4 * stride];
        s.b2 = p[5 * stride];
    }
    return s;
}
template <typename F, bool D> __device__ __forceinline__ void put_state(F *p, int stride, St<F> s) {
    p[0] = s.r;
    p[stride] = s.n;
    p[2 * stride] = s.a;
    p[3 * stride] = s.b;
    if (D) {
        p[4 * stride] = s.a2;
        p[5 * stride] = s.b2;
    }
}

// The block scan, for a block of (W channels, P pieces) whose piece i holds len(i) tokens: every piece's two
// summaries go to shared memory; the threads of piece 0 walk them left to right and those of piece 1 right to left
// (one thread a channel), replacing each by the state entering that piece, starting from the states entering the
// block's tokens (cf, cr). A serial walk, P merges per direction (a parallel scan was not tried). On return fw, rv
// are the states entering this thread's piece; the threads of piece 0 hold the block's forward summary in tf, those
// of piece 1 the reverse in tr. sh: [2][NV][P][W] scratch, NV = 6 (D) or 4.
template <typename F, bool D, int W, int P, typename Len>
__device__ void block_scan(St<F> &fw, St<F> &rv, St<F> cf, St<F> cr, F w, Len len, F *sh, St<F> &tf, St<F> &tr) {
    static_assert(P >= 2, "block_scan walks the two directions with pieces 0 and 1");
    constexpr int NV = D ? 6 : 4;
    const int s = threadIdx.y, c = threadIdx.x;
    auto put = [&](int dir, int i, St<F> q) { put_state<F, D>(sh + ((dir * NV) * P + i) * W + c, P * W, q); };
    auto get = [&](int dir, int i) { return get_state<F, D>(sh + ((dir * NV) * P + i) * W + c, P * W); };
    put(0, s, fw);
    put(1, s, rv);
    __syncthreads();
    if (s < 2) {
        const int dir = s;
        St<F> run = dir ? cr : cf;
        for (int j = 0; j < P; ++j) {
            const int i = dir ? P - 1 - j : j;
            St<F> own = get(dir, i);
            put(dir, i, run);
            run = merge<F, D>(run, F(len(i)), own, w);
        }
        (dir ? tr : tf) = run;
    }
    __syncthreads();
    fw = get(0, s);
    rv = get(1, s);
    __syncthreads();
}

// The block's per-thread sums of gw, gu added per channel (sh: [2][P][W], free), written for the raw w, u
// (divided by T) at gw_[at], gu_[at] by the threads of piece 0.
template <typename F, int W, int P>
__device__ __forceinline__ void block_sums(F *sh, F gw, F gu, bool live, int T, F *gw_, F *gu_, long long at) {
    sh[threadIdx.y * W + threadIdx.x] = gw;
    sh[(P + threadIdx.y) * W + threadIdx.x] = gu;
    __syncthreads();
    if (threadIdx.y == 0 && live) {
        F sw = 0, su = 0;
        for (int i = 0; i < P; ++i) {
            sw += sh[i * W + threadIdx.x];
            su += sh[(P + i) * W + threadIdx.x];
        }
        gw_[at] = dv(-sw, F(T));
        gu_[at] = dv(su, F(T));
    }
}

// thread (x, s) of block b ceil(C / W) + channel tile: channel c, tokens t0..t1-1 (piece s); o is the offset of
// the row's token 0 in a (B, T, C) tensor
struct Piece {
    int b, c, T, L, t0, t1;
    bool live;
    long long o;
    __device__ int len(int i) const { return max(0, min(L, T - i * L)); }  // tokens of piece i
};

template <int W, int P> __device__ __forceinline__ Piece piece(int T, int C) {
    Piece q;
    const int ctiles = (C + W - 1) / W;
    q.b = blockIdx.x / ctiles;
    q.c = (blockIdx.x - q.b * ctiles) * W + threadIdx.x;
    q.T = T;
    q.L = (T + P - 1) / P;
    q.t0 = min(T, int(threadIdx.y) * q.L);
    q.t1 = min(T, q.t0 + q.L);
    q.live = q.c < C;
    q.o = (long long)q.b * T * C + q.c;
    return q;
}

// A piece's two summaries: the sums of its tokens (load(t): key, values a and b, decay counted n0) as seen from the
// token after it (fw) and from the token before it (rv), in one walk left to right: fw takes each token as push does,
// rv takes it as a term d = t - t0 tokens further away than the piece's first token (as pushing right to left would).
template <typename F> struct Term { F key, a, b, n0; };
template <typename F, bool D, int TB, typename Load>
__device__ __forceinline__ void summaries(const Piece &q, F w, Load load, St<F> &fw, St<F> &rv) {
    fw = rv = empty<F>();
    if (!q.live) return;
    walk<false, TB>(q.t0, q.t1, load, [&](int t, Term<F> x) {
        push<F, D>(fw, w, x.key, x.a, x.b, x.n0);
        const F d = F(t - q.t0);
        rv = merge<F, D>(rv, F(0), St<F>{x.key, x.n0 + d, x.a, x.b, d * x.a, d * x.b}, w);
    });
}

template <typename F, int W, int P>
__global__ void __launch_bounds__(W * P, SPLIT_BLOCKS)
wkv_forward_split(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
                  const F *__restrict__ v_, F *__restrict__ y_, F *__restrict__ logz_) {
    __shared__ F sh[8 * P * W];
    const Piece q = piece<W, P>(T, C);
    const F w = q.live ? per_token(w_, q.c, T) : F(0), u = q.live ? per_token(u_, q.c, T) : F(0);
    const F *k = k_ + q.o, *v = v_ + q.o, k0 = q.live ? k[0] : F(0);
    St<F> fw, rv, tf, tr;
    summaries<F, false, SPLIT_TB>(q, w, [&](int t) {
        return Term<F>{(k[(long long)t * C] - k0) * F(L2E), v[(long long)t * C], F(1), F(0)};
    }, fw, rv);
    block_scan<F, false, W, P>(fw, rv, empty<F>(), empty<F>(), w, [&](int i) { return q.len(i); }, sh, tf, tr);
    if (q.live) forward_walks<F, SPLIT_TB>(q.t0, q.t1, T, C, w, u, k0, k, v, y_ + q.o, logz_ + q.o, fw, rv);
}

// gw, gu go to (B, C) partial sums, as from the naive kernel
template <typename F, int W, int P>
__global__ void __launch_bounds__(W * P, SPLIT_BLOCKS)
wkv_backward_split(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
                   const F *__restrict__ v_, const F *__restrict__ y_, const F *__restrict__ logz_,
                   const F *__restrict__ gy_, F *__restrict__ gk_, F *__restrict__ gv_, F *__restrict__ gw_,
                   F *__restrict__ gu_) {
    static_assert(12 * P * W * sizeof(F) <= 48 * 1024, "wkv_backward_split's shared memory exceeds 48 KiB");
    __shared__ F sh[12 * P * W];
    const Piece q = piece<W, P>(T, C);
    const F w = q.live ? per_token(w_, q.c, T) : F(0), u = q.live ? per_token(u_, q.c, T) : F(0);
    const F *k = k_ + q.o, *y = y_ + q.o, *logz = logz_ + q.o, *gy = gy_ + q.o, k0 = q.live ? k[0] : F(0);
    const bool far = far_ref(w, T);
    St<F> fw, rv, tf, tr;
    summaries<F, true, SPLIT_TB>(q, w, [&](int t) {
        const long long o = (long long)t * C;
        return Term<F>{-logz[o], gy[o], gy[o] * y[o], -nstar<F>(far, t, T)};
    }, fw, rv);
    block_scan<F, true, W, P>(fw, rv, empty<F>(), empty<F>(), w, [&](int i) { return q.len(i); }, sh, tf, tr);
    F gw = 0, gu = 0;
    if (q.live)
        backward_walks<F, SPLIT_TB>(q.t0, q.t1, T, C, w, u, k0, k, v_ + q.o, y, logz, gy, gk_ + q.o, gv_ + q.o, fw, rv,
                                    gw, gu);
    block_sums<F, W, P>(sh, gw, gu, q.live, T, gw_, gu_, (long long)q.b * C + q.c);
}

// ================================================================================================================
// 3. The chunked kernels. T is cut into chunks of BL = LT * NS tokens (hpcm.py compiles the forward with LT = 8 and
// the backward with LT = 6); a block, (blockIdx.x = j * ctiles + channel tile, blockIdx.y = b), owns one chunk of CW
// channels; thread (x, s) owns the LT tokens s*LT.. of channel x (a sub-chunk). Each pass is three launches (both
// scan directions in every launch):
//   wkv_forward<F, false> / wkv_backward<F, false>: each chunk's two summaries (what it hands right and left),
//   wkv_carry<F, D>: a serial pass over the chunks of each (b, c, direction), turning summaries into incoming
//                    states, in place,
//   wkv_forward<F, true> / wkv_backward<F, true>: each chunk again from its incoming states; write the outputs.
// Inside a block one warp per direction walks the sub-chunk summaries in shared memory (block_scan). Each thread
// summarises its own tokens exactly (push by push), or with section 4's lean frames where those are safe.

struct Tile {
    int b, j, c, s, cs, t0, len, nchunk;
    bool live;
    long long off;  // element offset of token t0 of channel c in a (B, T, C) tensor
    long long row;  // b * nchunk + j: the chunk's row in the (B, nchunk, 2, NV, C) state buffers
};

__device__ __forceinline__ Tile tile(int T, int C) {
    Tile q;
    int ctiles = (C + CW - 1) / CW;
    q.nchunk = (T + BL - 1) / BL;
    // grid (ctiles * nchunk, B): one 32-bit division per thread
    q.j = blockIdx.x / unsigned(ctiles);
    const int ct = blockIdx.x - q.j * ctiles;
    q.b = blockIdx.y;
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

// state of chunk row `row` in direction `dir` (0 forward, 1 reverse): (B, nchunk, 2, NV, C) with NV = 4 or 6
template <typename F, bool D> __device__ __forceinline__ St<F> load_state(const F *S, long long row, int dir, int C,
                                                                         int c) {
    return get_state<F, D>(S + (row * 2 + dir) * (D ? 6 : 4) * C + c, C);
}
template <typename F, bool D> __device__ __forceinline__ void store_state(F *S, long long row, int dir, int C, int c,
                                                                         St<F> s) {
    put_state<F, D>(S + (row * 2 + dir) * (D ? 6 : 4) * C + c, C, s);
}

// The exact path: push token by token, each state keeping the key of its largest term and that term's distance
// (token p's key comes with n0(p) tokens of decay counted).
template <typename F, bool D, typename N0>
__device__ __forceinline__ void exact_summaries(const F *key, const F *va, const F *vb, N0 n0, int len, F w,
                                                St<F> &fw, St<F> &rv) {
    fw = empty<F>();
    rv = empty<F>();
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < len) push<F, D>(fw, w, key[p], va[p], vb[p], n0(p));
#pragma unroll
    for (int p = LT - 1; p >= 0; --p)
        if (p < len) push<F, D>(rv, w, key[p], va[p], vb[p], n0(p));
}

// Section 4's lean frames, used by the kernels below where they are safe (declared here, defined after them).
template <typename F, bool D>
__device__ __forceinline__ void lean_summaries(const F *key, const F *va, const F *vb, F w, F &kmax, F *ef, F *er,
                                               St<F> &fw, St<F> &rv);
template <typename F, typename Out>
__device__ __forceinline__ bool lean_forward(bool lean, St<F> fw, St<F> rv, F kmax, F w, const F *ef, F *er,
                                             const F *vv, Out out);
template <typename F, typename Bonus, typename Grad, typename Store, typename Add>
__device__ __forceinline__ bool lean_backward(bool lean, St<F> fw, St<F> rv, F kmax, F w, const F *ef, const F *er,
                                              const F *kk, Bonus bonus, Grad grad, Store store, Add add);

// Summarise this thread's tokens (keys `key` with decay n0(p) counted, values va, vb) both ways, lean (where every
// n0 is 0) or exact, and scan the summaries across the block. With `carries` (the chunk's incoming states) fw, rv
// come back as the states entering this sub-chunk from the left and from the right; with `totals` the chunk's two
// summaries are stored.
template <typename F, bool D, typename N0>
__device__ __forceinline__ void chunk_scan(const F *key, const F *va, const F *vb, N0 n0, const Tile &q, F w, int T,
                                           int C, const F *carries, F *totals, F *sh, bool lean, F &kmax, F *ef,
                                           F *er, St<F> &fw, St<F> &rv) {
    if (lean)
        lean_summaries<F, D>(key, va, vb, w, kmax, ef, er, fw, rv);
    else
        exact_summaries<F, D>(key, va, vb, n0, q.len, w, fw, rv);
    St<F> cf = empty<F>(), cr = empty<F>(), tf, tr;
    if (carries && q.live) {
        cf = load_state<F, D>(carries, q.row, 0, C, q.c);
        cr = load_state<F, D>(carries, q.row, 1, C, q.c);
    }
    block_scan<F, D, CW, NS>(fw, rv, cf, cr, w, [&](int i) { return max(0, min(LT, T - (q.cs + i * LT))); }, sh, tf,
                             tr);
    if (totals && q.s < 2 && q.live)
        store_state<F, D>(totals, q.row, q.s, C, q.c, q.s ? tr : tf);
}

// tokens s*LT.. of this thread's channel, (x - shift) * scale; absent ones read as 0
template <typename F>
__device__ __forceinline__ void load_tokens(const F *__restrict__ src, const Tile &q, int C, F *dst,
                                            F shift = F(0), F scale = F(1)) {
#pragma unroll
    for (int p = 0; p < LT; ++p)
        dst[p] = q.live && p < q.len ? (src[q.off + (long long)p * C] - shift) * scale : F(0);
}

// the lean frames' |w| bound (log2 units): weights within 2^+-15, e^k times a frame below 2^90 (section 4)
#define LEAN_W (30.0 / (2 * LT))
#define LEAN_MIN (-60.0)  // the smallest frame weight (log2) a lean prefix may start from

// APPLY = false: write each chunk's summaries into S. APPLY = true: S holds the carries; write y and, unless
// logz_ is null, log2 Z.
template <typename F, bool APPLY>
__global__ void __launch_bounds__(CW * NS, APPLY ? MIN_BLOCKS : SUM_BLOCKS)
wkv_forward(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
            const F *__restrict__ v_, F *__restrict__ S, F *__restrict__ y_, F *__restrict__ logz_) {
    __shared__ F sh[8 * NS * CW];  // [2][4][NS][CW]: block_scan without the distance-weighted sums
    Tile q = tile(T, C);
    const F w = q.live ? per_token(w_, q.c, T) : F(0), u = q.live ? per_token(u_, q.c, T) : F(0);
    const F k0 = q.live ? k_[(long long)q.b * T * C + q.c] : F(0);
    F kk[LT], vv[LT], one[LT], kmax, ef[LT], er[LT];
    load_tokens(k_, q, C, kk, k0, F(L2E));
    load_tokens(v_, q, C, vv);
#pragma unroll
    for (int p = 0; p < LT; ++p) one[p] = F(1);
    // the lean frames take exponents as they are: not where they are taken relative to nstar (section 0)
    const bool lean = q.len == LT && fabs(w) <= F(LEAN_W) && !far_ref(w, T);
    St<F> fw, rv;
    chunk_scan<F, false>(kk, vv, one, [](int) { return F(0); }, q, w, T, C, APPLY ? S : nullptr, APPLY ? nullptr : S,
                         sh, lean, kmax, ef, er, fw, rv);
    if (!APPLY) return;
    // y_p from the sums entering token p from the left (exponent ma, sums na, da), from the right (mc, nc, dc) and
    // the bonus term, all scaled by 2^-top, exponents relative to ref = nstar_p; log2 Z = top + log2 den
    auto out = [&](int p, F ref, F ma, F na, F da, F mc, F nc, F dc) {
        const F uk = fma(ref, w, u + kk[p]), top = fmax(fmax(ma, mc), uk);
        const F eA = ex(ma - top), eC = ex(mc - top), eU = ex(uk - top);
        const F den = fma(da, eA, fma(dc, eC, eU));
        if (q.live) {
            y_[q.off + (long long)p * C] = dv(fma(na, eA, fma(nc, eC, vv[p] * eU)), den);
            if (logz_) logz_[q.off + (long long)p * C] = top + lg(den);
        }
    };
    if (lean_forward(lean, fw, rv, kmax, w, ef, er, vv, out)) return;
    auto ns = [&](int p) { return nstar<F>(far_ref(w, T), q.t0 + p, T); };
    F cm[LT], ca[LT], cb[LT];
    St<F> st = rv;
#pragma unroll
    for (int p = LT - 1; p >= 0; --p)
        if (p < q.len) {
            cm[p] = expo(st, w, ns(p)); ca[p] = st.a; cb[p] = st.b;
            push<F, false>(st, w, kk[p], vv[p], F(1));
        }
    st = fw;
#pragma unroll
    for (int p = 0; p < LT; ++p)
        if (p < q.len) {
            out(p, ns(p), expo(st, w, ns(p)), st.a, st.b, cm[p], ca[p], cb[p]);
            push<F, false>(st, w, kk[p], vv[p], F(1));
        }
}

template <typename F, bool D>
__global__ void wkv_carry(int B, int T, int C, const F *__restrict__ w_, F *__restrict__ S) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= 2LL * B * C) return;
    const int c = idx % C, b = (idx / C) % B, dir = idx / ((long long)B * C);
    const int nchunk = (T + BL - 1) / BL;
    const F w = per_token(w_, c, T);
    St<F> run = empty<F>();
    // eight chunks' summaries are loaded before any is used, so their reads overlap
    for (int j0 = 0; j0 < nchunk; j0 += 8) {
        St<F> sum[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (j0 + i < nchunk) {
                int j = dir ? nchunk - 1 - (j0 + i) : j0 + i;
                sum[i] = load_state<F, D>(S, (long long)b * nchunk + j, dir, C, c);
            }
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (j0 + i < nchunk) {
                int j = dir ? nchunk - 1 - (j0 + i) : j0 + i;
                store_state<F, D>(S, (long long)b * nchunk + j, dir, C, c, run);
                run = merge<F, D>(run, F(min(BL, T - j * BL)), sum[i], w);
            }
    }
}

// APPLY = false: write each chunk's gradient summaries into G. APPLY = true: G holds the gradient carries;
// write gk, gv and per-chunk partial sums of gw, gu (for raw w, u) into gw_, gu_ ((B, nchunk, C), summed by the
// caller).
template <typename F, bool APPLY>
__global__ void __launch_bounds__(CW * NS, APPLY ? MIN_BLOCKS : SUM_BLOCKS)
wkv_backward(int B, int T, int C, const F *__restrict__ w_, const F *__restrict__ u_, const F *__restrict__ k_,
             const F *__restrict__ v_, const F *__restrict__ y_, const F *__restrict__ logz_,
             const F *__restrict__ gy_, F *__restrict__ G, F *__restrict__ gk_, F *__restrict__ gv_,
             F *__restrict__ gw_, F *__restrict__ gu_) {
    __shared__ F sh[12 * NS * CW];
    Tile q = tile(T, C);
    const F w = q.live ? per_token(w_, q.c, T) : F(0), u = q.live ? per_token(u_, q.c, T) : F(0);
    F ka[LT], gg[LT], yy[LT], kmax, ef[LT], er[LT];
    load_tokens(logz_, q, C, ka, F(0), F(-1));
    load_tokens(gy_, q, C, gg);
    load_tokens(y_, q, C, yy);
    // u >= LEAN_MIN bounds e^(k + kappa) <= e^-u for the token's own kappa, which the lean frames may use; their
    // frames weigh keys without decay counted (nstar = 0)
    const bool lean = q.len == LT && fabs(w) <= F(LEAN_W) && u >= F(LEAN_MIN) && !far_ref(w, T);
    auto ns = [&](int p) { return nstar<F>(far_ref(w, T), q.t0 + p, T); };
    St<F> fw, rv;
    {
        F gyy[LT];
#pragma unroll
        for (int p = 0; p < LT; ++p) gyy[p] = gg[p] * yy[p];
        chunk_scan<F, true>(ka, gg, gyy, [&](int p) { return -ns(p); }, q, w, T, C, APPLY ? (const F *)G : nullptr,
                            APPLY ? nullptr : G, sh, lean, kmax, ef, er, fw, rv);
    }
    if (!APPLY) return;
    const F k0 = q.live ? k_[(long long)q.b * T * C + q.c] : F(0);
    F kk[LT], vv[LT], pk[LT], pv[LT];
    load_tokens(k_, q, C, kk, k0, F(L2E));
    load_tokens(v_, q, C, vv);
    F gw = 0, gu = 0;
    // token p's bonus terms (kept in pk, pv) and its part of gu; ka[p] is taken relative to ref = nstar_p
    auto bonus = [&](int p, F ref) {
        const F eb = ex(fma(ref, w, u + kk[p] + ka[p])) * gg[p], vy = eb * (vv[p] - yy[p]);
        pk[p] = vy;
        pv[p] = eb;
        gu += vy;
    };
    // the sums (a, b) over (gy, gy y) take token p with weight e
    auto add = [&](int p, F e, F &a, F &b) {
        const F eg = e * gg[p];
        a += eg;
        b = fma(eg, yy[p], b);
    };
    // e = e^k_p times the sums' exponent: token p's share of gk, gv (added to pk, pv) and of gw
    auto grad = [&](int p, F e, F a, F b, F a2, F b2) {
        gw = fma(e, fma(vv[p], a2, -b2), gw);
        pk[p] = fma(e, fma(vv[p], a, -b), pk[p]);
        pv[p] = fma(e, a, pv[p]);
    };
    auto store = [&](int p) {
        if (q.live) {
            gk_[q.off + (long long)p * C] = pk[p];
            gv_[q.off + (long long)p * C] = pv[p];
        }
    };
    if (!lean_backward(lean, fw, rv, kmax, w, ef, er, kk, bonus, grad, store, add)) {
        St<F> st = fw;
#pragma unroll
        for (int p = 0; p < LT; ++p)
            if (p < q.len) {
                bonus(p, ns(p));
                grad(p, ex(kk[p] + expo(st, w)), st.a, st.b, st.a2, st.b2);
                push<F, true>(st, w, ka[p], gg[p], gg[p] * yy[p], -ns(p));
            }
        st = rv;
#pragma unroll
        for (int p = LT - 1; p >= 0; --p)
            if (p < q.len) {
                grad(p, ex(kk[p] + expo(st, w)), st.a, st.b, st.a2, st.b2);
                store(p);
                push<F, true>(st, w, ka[p], gg[p], gg[p] * yy[p], -ns(p));
            }
    }
    block_sums<F, CW, NS>(sh, gw, gu, q.live, T, gw_, gu_, q.row * C + q.c);  // sh is free again after chunk_scan
}

// ================================================================================================================
// 4. Lean frames: an optimisation of section 3's per-thread work, for a full sub-chunk (LT tokens) with
// |w| <= LEAN_W (always, for w = decay / T). No running maximum token by token: all LT tokens are weighed in one
// frame per direction, referenced to kmax, the largest key: token p weighs ef[p] = 2^(key_p - kmax - (LT-1-p) w)
// as seen by the token after the sub-chunk, er[p] = 2^(key_p - kmax - p w) as seen by the token before it. Every
// weight is below 2^(LT |w|) and the largest is above 2^-(LT |w|), so no sum overflows or vanishes, and each weight
// is one ex2 of an exactly formed difference (fma): one ex2 and two fma per token and direction, where a push is
// a rescaled merge. Measured together with the backward's 6 tokens a thread (one change, H100): fwd+bwd 5.12 ->
// 4.56 ms GPU time at (64, 640, 4096). The states then read (kmax, 0, sums): their exponent is that of kmax,
// not of the largest term, which merge() does not need. Where a check fails (keys so spread that a prefix would
// underflow in the frame) the thread takes section 3's exact path.
template <typename F, bool D>
__device__ __forceinline__ void lean_summaries(const F *key, const F *va, const F *vb, F w, F &kmax, F *ef, F *er,
                                               St<F> &fw, St<F> &rv) {
    kmax = key[0];
#pragma unroll
    for (int p = 1; p < LT; ++p) kmax = fmax(kmax, key[p]);
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        const F d = key[p] - kmax;
        ef[p] = ex(fma(F(p - (LT - 1)), w, d));
        er[p] = ex(fma(F(-p), w, d));
    }
    // distance-weighted sums (D): one step further away for every token added after it
    fw = rv = St<F>{kmax, F(0), F(0), F(0), F(0), F(0)};
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        if (D) { fw.a2 += fw.a; fw.b2 += fw.b; }
        fw.a = fma(ef[p], va[p], fw.a);
        fw.b = fma(ef[p], vb[p], fw.b);
    }
#pragma unroll
    for (int p = LT - 1; p >= 0; --p) {
        if (D) { rv.a2 += rv.a; rv.b2 += rv.b; }
        rv.a = fma(er[p], va[p], rv.a);
        rv.b = fma(er[p], vb[p], rv.b);
    }
}

// an empty() state, however often merged with others empty too: its r stays near the sentinel
template <typename F> __device__ __forceinline__ bool is_empty(St<F> s) { return s.r < empty<F>().r * F(0.5); }

// One side's frame for the lean apply: the carry c (the state entering the sub-chunk from that side) against the
// sub-chunk's own weights, in whichever of the two frames is larger. `off` is the carry's exponent minus the
// weights' frame exponent (the same for both sides); the side's exponent at token p is base -/+ p w; sc scales the
// carry's sums, st the weights. ok: the sums entering the first token that has any stay above 2^LEAN_MIN, so no
// term that matters is lost to underflow (first: the weight of the side's first token).
template <typename F> struct Side { F base, sc, st; bool ok; };
template <typename F>
__device__ __forceinline__ Side<F> side(St<F> c, F kmax, F w, F frame_base, F carry_base, F first) {
    const F off = (c.r - kmax) - (c.n + F(LT)) * w;
    const bool carry_wins = off > F(0);
    const F e = ex(-fabs(off));
    return {carry_wins ? carry_base : frame_base, carry_wins ? F(1) : e, carry_wins ? e : F(1),
            off >= F(LEAN_MIN) || (is_empty(c) && first >= ex(F(LEAN_MIN)))};
}
// Both sides' frames, left from fw (exponent base - p w) and right from rv (base + p w); true when the lean apply
// may run: lean summaries were taken and neither side's check failed.
template <typename F>
__device__ __forceinline__ bool lean_sides(bool lean, St<F> fw, St<F> rv, F kmax, F w, const F *ef, const F *er,
                                           Side<F> &L, Side<F> &R) {
    if (lean) {  // evaluated eagerly, not short-circuited: the forward's apply then fits in 64 registers unspilled
        L = side(fw, kmax, w, fma(F(LT), w, kmax), fw.r - fw.n * w, ef[0]);
        R = side(rv, kmax, w, kmax + w, rv.r - (rv.n + F(LT - 1)) * w, er[LT - 1]);
    }
    return lean && L.ok && R.ok;
}

// The forward's lean apply (false, having written nothing, where lean is false or a check fails): from the right
// first, keeping each token's sums in er (numerator) and dc (denominator), then from the left, writing each token
// through out().
template <typename F, typename Out>
__device__ __forceinline__ bool lean_forward(bool lean, St<F> fw, St<F> rv, F kmax, F w, const F *ef, F *er,
                                             const F *vv, Out out) {
    Side<F> L, R;
    if (!lean_sides(lean, fw, rv, kmax, w, ef, er, L, R)) return false;
    F nc = rv.a * R.sc, dcs = rv.b * R.sc, dc[LT];
#pragma unroll
    for (int p = LT - 1; p >= 0; --p) {
        const F e = er[p] * R.st;
        er[p] = nc;
        dc[p] = dcs;
        nc = fma(e, vv[p], nc);
        dcs += e;
    }
    F na = fw.a * L.sc, da = fw.b * L.sc;
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        out(p, F(0), fma(F(-p), w, L.base), na, da, fma(F(p), w, R.base), er[p], dc[p]);
        const F e = ef[p] * L.st;
        na = fma(e, vv[p], na);
        da += e;
    }
    return true;
}

// The backward's lean apply (false, having written nothing, where lean is false or a check fails), with
// wkv_backward's token steps.
template <typename F, typename Bonus, typename Grad, typename Store, typename Add>
__device__ __forceinline__ bool lean_backward(bool lean, St<F> fw, St<F> rv, F kmax, F w, const F *ef, const F *er,
                                              const F *kk, Bonus bonus, Grad grad, Store store, Add add) {
    Side<F> L, R;
    if (!lean_sides(lean, fw, rv, kmax, w, ef, er, L, R)) return false;
    F a = fw.a * L.sc, b = fw.b * L.sc, a2 = fw.a2 * L.sc, b2 = fw.b2 * L.sc;
#pragma unroll
    for (int p = 0; p < LT; ++p) {
        bonus(p, F(0));
        grad(p, ex(kk[p] + fma(F(-p), w, L.base)), a, b, a2, b2);
        a2 += a;
        b2 += b;
        add(p, ef[p] * L.st, a, b);
    }
    a = rv.a * R.sc, b = rv.b * R.sc, a2 = rv.a2 * R.sc, b2 = rv.b2 * R.sc;
#pragma unroll
    for (int p = LT - 1; p >= 0; --p) {
        grad(p, ex(kk[p] + fma(F(p), w, R.base)), a, b, a2, b2);
        store(p);
        a2 += a;
        b2 += b;
        add(p, er[p] * R.st, a, b);
    }
    return true;
}
