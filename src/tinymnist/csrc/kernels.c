/* CPU kernels for training a tiny CNN on float32 activations in channels-last memory (kernels.py loads them).
 *
 * Fused batch norm + ReLU. The activations are a (rows = N*H*W) x C matrix. PyTorch runs this as three kernels (batch norm, ReLU, and their backward ones),
 * and its batch-norm kernels are slow for the few channels of a tiny CNN; see kernels.py for the measurements.
 *
 * forward:  mean and biased variance per channel in two passes (no cancellation), then out = max(x*a + b, 0)
 *           with a = weight / sqrt(var + eps) and b = bias - mean * a: three reads of x, one write.
 * backward: gz = g where out > 0 (ReLU's gradient); the sums of gz and gz * (x - mean); then, in one pass,
 *           dx = a * (gz - mean(gz) - xhat * mean(gz * xhat)) with xhat = (x - mean) / std.
 *
 * Determinism: every sum runs over CHUNKS fixed slices of the rows, whatever the thread count, and the slice
 * partials are added in slice order, in double. So the result depends on the data alone: the same at 1 thread
 * as at 16, and the same run after run.
 *
 * Speed: the flat element stream repeats with period C. A "unit" U is a multiple of both C and 8 floats (one
 * AVX2 register), of at least 32 floats, so one block of U elements is whole vectors with a fixed channel per
 * lane. The common units are compiled as constants, so the accumulators stay in registers: 32 (C = 1, 2, 4,
 * 8, 16, 32), 40 (C = 5, 10, 20, 40), 48 (C = 3, 6, 12, 24, 48), 56 (C = 7, 14, 28, 56) and 64. Any other unit up
 * to MAXU runs the same code with a runtime length.
 *
 * Returns 0; 1 if C is too large for MAXU (the caller checks first); 2 if out of memory. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CHUNKS 64      /* fixed reduction slices: sums do not depend on the thread count */
#define MAXU 1024      /* largest unit: C up to 128 always fits */
#define SERIAL 32768   /* below this many elements one thread is faster than waking the others */
#define INLINE static inline __attribute__((always_inline))

static long gcdl(long a, long b) { while (b) { long t = a % b; a = b; b = t; } return a; }
static int unit(int C) { int P = (int)(C / gcdl(C, 8) * 8); return P * ((32 + P - 1) / P); }

/* ---- one chunk of blocks [b0, b1) of U floats each; U is a constant after inlining */
INLINE void sum_blocks(const float *restrict x, long b0, long b1, const int U, float *restrict out) {
    float a[MAXU];
    for (int j = 0; j < U; j++) a[j] = 0;
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) a[j] += x[b * U + j];
    for (int j = 0; j < U; j++) out[j] = a[j];
}
INLINE void sqdev_blocks(const float *restrict x, long b0, long b1, const int U, const float *restrict m,
                         float *restrict out) {
    float a[MAXU];
    for (int j = 0; j < U; j++) a[j] = 0;
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) { float d = x[b * U + j] - m[j]; a[j] += d * d; }
    for (int j = 0; j < U; j++) out[j] = a[j];
}
INLINE void apply_blocks(const float *restrict x, long b0, long b1, const int U, const float *restrict s,
                         const float *restrict t, float *restrict o) {
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) { float v = x[b * U + j] * s[j] + t[j]; o[b * U + j] = v > 0.f ? v : 0.f; }
}
INLINE void gsum_blocks(const float *restrict g, const float *restrict y, const float *restrict x, long b0, long b1,
                        const int U, const float *restrict m, float *restrict o1, float *restrict o2) {
    float a1[MAXU], a2[MAXU];
    for (int j = 0; j < U; j++) { a1[j] = 0; a2[j] = 0; }
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) {
            long i = b * U + j;
            float gz = y[i] > 0.f ? g[i] : 0.f;
            a1[j] += gz;
            a2[j] += gz * (x[i] - m[j]);
        }
    for (int j = 0; j < U; j++) { o1[j] = a1[j]; o2[j] = a2[j]; }
}
INLINE void gin_blocks(const float *restrict g, const float *restrict y, const float *restrict x, long b0, long b1,
                       const int U, const float *restrict s, const float *restrict k1, const float *restrict k0,
                       float *restrict dx) {
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) {
            long i = b * U + j;
            float gz = y[i] > 0.f ? g[i] : 0.f;
            dx[i] = gz * s[j] + x[i] * k1[j] + k0[j];
        }
}

#define DISPATCH(U, CALL) switch (U) { \
    case 32: { const int u_ = 32; CALL; } break; case 40: { const int u_ = 40; CALL; } break; \
    case 48: { const int u_ = 48; CALL; } break; case 56: { const int u_ = 56; CALL; } break; \
    case 64: { const int u_ = 64; CALL; } break; default: { const int u_ = U; CALL; } }

static void fold(const float *part, int U, int C, double *out) {
    for (int c = 0; c < C; c++) out[c] = 0;
    for (int k = 0; k < CHUNKS; k++)
        for (int j = 0; j < U; j++) out[j % C] += part[k * U + j];
}

/* x, out: rows x C. Writes out, the batch mean and biased var (C doubles each), and coef = [invstd; a] (2C floats)
   for the backward pass. */
int tm_bn_relu_forward(const float *x, long rows, int C, const float *weight, const float *bias, double eps,
                       float *out, double *mean, double *var, float *coef, int threads) {
    const int U = unit(C);
    if (U > MAXU) return 1;
    const long E = rows * C, nb = E / U, tail = nb * U;
    float *part = malloc(sizeof(float) * 2 * CHUNKS * U);
    if (!part) return 2;
    float *p2 = part + CHUNKS * U;
    const int par = E > SERIAL;
    /* one parallel region, three passes with a barrier after each: the threads wake once per call. Between the
       passes every thread folds the slice sums itself (a few thousand additions, the same in every thread), which
       saves the two barriers a single thread's fold would need; the passes write separate buffers, so a thread
       still folding never sees the next pass's writes. */
    #pragma omp parallel num_threads(threads) if(par)
    {
        float m[MAXU], s[MAXU], t[MAXU];
        double mu[MAXU], v[MAXU];
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            DISPATCH(U, sum_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, part + k * U));
            if (k == 0) for (long i = tail; i < E; i++) part[(i - tail) % U] += x[i];
        }
        fold(part, U, C, mu);
        for (int c = 0; c < C; c++) mu[c] /= rows;
        for (int j = 0; j < U; j++) m[j] = (float)mu[j % C];
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            DISPATCH(U, sqdev_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, m, p2 + k * U));
            if (k == 0) for (long i = tail; i < E; i++) {
                float d = x[i] - m[(i - tail) % U];
                p2[(i - tail) % U] += d * d;
            }
        }
        fold(p2, U, C, v);
        for (int c = 0; c < C; c++) v[c] /= rows;
        for (int j = 0; j < U; j++) {
            int c = j % C;
            s[j] = (float)(weight[c] * (1.0 / sqrt(v[c] + eps)));
            t[j] = (float)(bias[c] - mu[c] * ((double)weight[c] / sqrt(v[c] + eps)));
        }
        #pragma omp master
        for (int c = 0; c < C; c++) {
            double invstd = 1.0 / sqrt(v[c] + eps);
            mean[c] = mu[c];
            var[c] = v[c];
            coef[c] = (float)invstd;
            coef[C + c] = (float)(weight[c] * invstd);
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++)
            DISPATCH(U, apply_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, t, out));
        #pragma omp master
        for (long i = tail; i < E; i++) {
            float w = x[i] * s[(i - tail) % U] + t[(i - tail) % U];
            out[i] = w > 0.f ? w : 0.f;
        }
    }
    free(part);
    return 0;
}

/* g: the gradient of out; y: out; x, mean, coef: as the forward pass left them. Writes dx, dweight, dbias. */
int tm_bn_relu_backward(const float *g, const float *y, const float *x, long rows, int C, const double *mean,
                        const float *coef, float *dx, float *dweight, float *dbias, int threads) {
    const int U = unit(C);
    if (U > MAXU) return 1;
    const long E = rows * C, nb = E / U, tail = nb * U;
    float *part = malloc(sizeof(float) * (2 * CHUNKS * U + U));
    if (!part) return 2;
    float *p2 = part + CHUNKS * U, *m = p2 + CHUNKS * U;
    for (int j = 0; j < U; j++) m[j] = (float)mean[j % C];
    const int par = E > SERIAL;
    /* two passes, one barrier between them; each thread folds the sums itself, as in the forward pass */
    #pragma omp parallel num_threads(threads) if(par)
    {
        float s[MAXU], k1[MAXU], k0[MAXU];
        double sg[MAXU], sgx[MAXU], q1[MAXU], q0[MAXU];
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            DISPATCH(U, gsum_blocks(g, y, x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, m, part + k * U,
                                    p2 + k * U));
            if (k == 0) for (long i = tail; i < E; i++) {
                int j = (int)((i - tail) % U);
                float gz = y[i] > 0.f ? g[i] : 0.f;
                part[j] += gz; p2[j] += gz * (x[i] - m[j]);
            }
        }
        fold(part, U, C, sg);
        fold(p2, U, C, sgx);
        for (int c = 0; c < C; c++) {
            double invstd = coef[c], a = coef[C + c], q = a * invstd * invstd * sgx[c] / rows;
            q1[c] = -q;
            q0[c] = -a * sg[c] / rows + mean[c] * q;
        }
        for (int j = 0; j < U; j++) { s[j] = coef[C + j % C]; k1[j] = (float)q1[j % C]; k0[j] = (float)q0[j % C]; }
        #pragma omp master
        {
            for (int c = 0; c < C; c++) {
                dweight[c] = (float)(sgx[c] * coef[c]);
                dbias[c] = (float)sg[c];
            }
            for (long i = tail; i < E; i++) {
                int j = (int)((i - tail) % U);
                float gz = y[i] > 0.f ? g[i] : 0.f;
                dx[i] = gz * s[j] + x[i] * k1[j] + k0[j];
            }
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++)
            DISPATCH(U, gin_blocks(g, y, x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, k1, k0, dx));
    }
    free(part);
    return 0;
}

/* ---- 2x2 max pool, stride 2, for the same channels-last float32 activations: x is N x H x W x C, out and idx
 * are N x (H/2) x (W/2) x C (floor). idx keeps which of the 4 inputs won (dh * 2 + dw), one byte each, where
 * PyTorch keeps an 8-byte flat index; the first maximum in row-major order wins and NaN propagates, as in
 * PyTorch, so forward and backward are bit-identical to max_pool2d's. Backward writes every element of dx once:
 * the gradient where an input won, else zero (PyTorch zero-fills dx, then scatters). */

INLINE void pool_row(const float *restrict r0, const float *restrict r1, long OW, const int C, float *restrict o,
                     unsigned char *restrict id) {
    for (long ow = 0; ow < OW; ow++) {
        const float *a = r0 + 2 * ow * C, *b = r1 + 2 * ow * C;
        for (int c = 0; c < C; c++) {
            float m = a[c]; unsigned char k = 0;
            float v = a[C + c]; if (v > m || v != v) { m = v; k = 1; }
            v = b[c];           if (v > m || v != v) { m = v; k = 2; }
            v = b[C + c];       if (v > m || v != v) { m = v; k = 3; }
            o[ow * C + c] = m; id[ow * C + c] = k;
        }
    }
}

INLINE void unpool_row(const float *restrict g, const unsigned char *restrict id, long W, long OW, const int C,
                       float *restrict d0, float *restrict d1) {
    for (long ow = 0; ow < OW; ow++) {
        float *a = d0 + 2 * ow * C, *b = d1 + 2 * ow * C;
        for (int c = 0; c < C; c++) {
            float v = g[ow * C + c]; unsigned char k = id[ow * C + c];
            a[c] = k == 0 ? v : 0.f; a[C + c] = k == 1 ? v : 0.f;
            b[c] = k == 2 ? v : 0.f; b[C + c] = k == 3 ? v : 0.f;
        }
    }
    for (long i = 2 * OW * C; i < W * C; i++) { d0[i] = 0.f; d1[i] = 0.f; }  /* an odd last column */
}

#define DISPATCH_C(C, CALL) switch (C) { \
    case 8: { const int c_ = 8; CALL; } break; case 10: { const int c_ = 10; CALL; } break; \
    case 12: { const int c_ = 12; CALL; } break; case 16: { const int c_ = 16; CALL; } break; \
    case 24: { const int c_ = 24; CALL; } break; case 32: { const int c_ = 32; CALL; } break; \
    default: { const int c_ = C; CALL; } }

void tm_maxpool2_forward(const float *x, long N, long H, long W, int C, float *out, unsigned char *idx,
                         int threads) {
    const long OH = H / 2, OW = W / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * H * W * C > SERIAL)
    for (long r = 0; r < N * OH; r++) {
        long n = r / OH, oh = r % OH;
        const float *r0 = x + ((n * H + 2 * oh) * W) * C;
        DISPATCH_C(C, pool_row(r0, r0 + W * C, OW, c_, out + r * OW * C, idx + r * OW * C));
    }
}

void tm_maxpool2_backward(const float *g, const unsigned char *idx, long N, long H, long W, int C, float *dx,
                          int threads) {
    const long OH = H / 2, OW = W / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * H * W * C > SERIAL)
    for (long n = 0; n < N; n++) {
        for (long oh = 0; oh < OH; oh++) {
            float *d0 = dx + ((n * H + 2 * oh) * W) * C;
            long r = n * OH + oh;
            DISPATCH_C(C, unpool_row(g + r * OW * C, idx + r * OW * C, W, OW, c_, d0, d0 + W * C));
        }
        if (H % 2) memset(dx + ((n * H + H - 1) * W) * C, 0, sizeof(float) * W * C);  /* an odd last row */
    }
}

/* ---- 2-D convolution for the same channels-last float32 activations: stride 1, no padding, no dilation, one
 * group, no bias (batch norm follows). x is N x H x W x Ci, w is PyTorch's Co x Ci x K x K, out is
 * N x OH x OW x Co with OH = H - K + 1.
 *
 * Why: PyTorch runs these through oneDNN, which for 1-16 channels reorders activations and weights into blocked
 * layouts around every call (about 20 extra parallel operations per training step of Model_7) and reaches about
 * a third of the machine's multiply rate in the backward pass. Each call here is one parallel region.
 *
 * forward:   a tile of PB consecutive output pixels x 8*CV output channels is held in registers; each step
 *            broadcasts one input value per pixel against a vector of packed weights ([kh][kw][ci][co]).
 * backward:  dx is the same valid convolution of the output gradient, zero-padded by K-1 on each side, with the
 *            kernel flipped and its channels swapped; dw sums x * g over the batch in CHUNKS fixed slices of
 *            images, each in float, then the slices in order in double.
 * Determinism: every output element is computed by one thread in a fixed order, and dw's slices do not depend on
 * the thread count, so all three results are the same at any thread count, run after run.
 *
 * The vectors are GCC's generic vector extension (8 floats): AVX2 registers on x86-64, pairs of NEON or SSE
 * registers elsewhere. */

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define VLD(p) (*(const v8u *)(p))
#define VST(p, v) (*(v8u *)(p) = (v))
INLINE v8 bc(float s) { return (v8){s, s, s, s, s, s, s, s}; }
static int up8(int c) { return (c + 7) & ~7; }

/* PB consecutive output pixels of one row and 8*CV output channels: o[p][c] = sum over kh, kw, ci of
   x[kh*xrow + (p+kw)*Ci + ci] * w[((kh*K + kw)*Ci + ci)*ws + c]; `lanes` of the 8*CV results are stored.
   The accumulators are named variables (an array would live in memory): up to 12 pixels x 2 vectors, of which
   the compiler keeps the PB x CV in use in registers. */
#define EACH12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
INLINE void store_px(float *restrict o, v8 a0, v8 a1, const int CV, int lanes) {
    if (lanes == 8 * CV) { VST(o, a0); if (CV > 1) VST(o + 8, a1); return; }
    float t[16];
    VST(t, a0); VST(t + 8, a1);
    memcpy(o, t, sizeof(float) * lanes);
}
INLINE void conv_tile(const float *restrict x, long xrow, int Ci, int K, const float *restrict w, int ws,
                      const int CV, const int PB, float *restrict o, int os, int lanes) {
#define DECL(p) v8 a##p##_0 = {0}, a##p##_1 = {0};
#define FMA(p) if (p < PB) { v8 b = bc(xr[p * Ci + ci]); a##p##_0 += b * w0; if (CV > 1) a##p##_1 += b * w1; }
#define STORE(p) if (p < PB) store_px(o + (long)p * os, a##p##_0, a##p##_1, CV, lanes);
    EACH12(DECL)
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++) {
            const float *xr = x + kh * xrow + kw * Ci;
            const float *wr = w + (long)(kh * K + kw) * Ci * ws;
            for (int ci = 0; ci < Ci; ci++) {
                v8 w0 = VLD(wr + (long)ci * ws), w1 = CV > 1 ? VLD(wr + (long)ci * ws + 8) : w0;
                EACH12(FMA)
            }
        }
    EACH12(STORE)
#undef DECL
#undef FMA
#undef STORE
}

#define TILE(CV, PB) conv_tile(x + ow * Ci, xrow, Ci, K, wg, ws, CV, PB, og + (long)ow * Co, Co, lanes)
#define TAIL(CV, R, CASES) switch (R) { CASES } break;

/* One output row of OW pixels, all Co channels, in groups of 16 (two vectors) or, for the last <= 8, one. */
static void conv_row(const float *x, long xrow, int Ci, int K, const float *w, int ws, int OW, float *o, int Co) {
    for (int g0 = 0; g0 < Co; g0 += 16) {
        const int lanes = Co - g0 < 16 ? Co - g0 : 16;
        const float *wg = w + g0;
        float *og = o + g0;
        int ow = 0;
        if (lanes > 8) {
            for (; ow + 6 <= OW; ow += 6) TILE(2, 6);
            switch (OW - ow) {
                case 1: TILE(2, 1); break; case 2: TILE(2, 2); break; case 3: TILE(2, 3); break;
                case 4: TILE(2, 4); break; case 5: TILE(2, 5); break;
            }
        } else {
            for (; ow + 12 <= OW; ow += 12) TILE(1, 12);
            for (; ow + 4 <= OW; ow += 4) TILE(1, 4);
            switch (OW - ow) { case 1: TILE(1, 1); break; case 2: TILE(1, 2); break; case 3: TILE(1, 3); break; }
        }
    }
}

/* w (Co x Ci x K x K) -> [kh][kw][ci][co] with co padded to ws = up8(Co); flip = 1 packs the kernel for dx:
   [kh][kw][co][ci] of the flipped kernel, ci padded to up8(Ci). */
static void pack(const float *w, int Co, int Ci, int K, int flip, float *out) {
    const int KK = K * K, ws = flip ? up8(Ci) : up8(Co), inner = flip ? Co : Ci;
    memset(out, 0, sizeof(float) * KK * inner * ws);
    for (int co = 0; co < Co; co++)
        for (int ci = 0; ci < Ci; ci++)
            for (int t = 0; t < KK; t++) {
                float v = w[((long)co * Ci + ci) * KK + t];
                if (flip) out[((long)(KK - 1 - t) * Co + co) * ws + ci] = v;
                else out[((long)t * Ci + ci) * ws + co] = v;
            }
}

int tm_conv_forward(const float *x, long N, long H, long W, int Ci, const float *w, int Co, int K, float *out,
                    int threads) {
    const long OH = H - K + 1, OW = W - K + 1;
    const int ws = up8(Co);
    float *wp = malloc(sizeof(float) * K * K * Ci * ws);
    if (!wp) return 2;
    pack(w, Co, Ci, K, 0, wp);
    #pragma omp parallel for schedule(static) num_threads(threads) if(N * OH * OW * Co > SERIAL)
    for (long r = 0; r < N * OH; r++) {
        long n = r / OH, oh = r % OH;
        conv_row(x + ((n * H + oh) * W) * Ci, W * Ci, Ci, K, wp, ws, (int)OW, out + r * OW * Co, Co);
    }
    free(wp);
    return 0;
}

/* dw slice accumulation: taps (kh, kw0 .. kw0+KB-1), channels ci0 .. ci0+CB-1, 8*CV output channels; g has pixel
   stride gs (>= 8*CV, readable), pw points at [kh][kw0][ci0][g0] of a [kh][kw][ci][co] array with co stride ws.
   Named accumulators again: KB (1 or 3) x CB (up to 8) x CV (1 or 2), at most 12 in use. */
#define EACH8(M, A) M(A, 0) M(A, 1) M(A, 2) M(A, 3) M(A, 4) M(A, 5) M(A, 6) M(A, 7)
#define EACH3x8(M) EACH8(M, 0) EACH8(M, 1) EACH8(M, 2)
INLINE void wgrad_tile(const float *restrict x, long xrow, int Ci, const float *restrict g, int gs, int OH, int OW,
                       const int KB, const int CB, const int CV, float *restrict pw, long kws, int ws) {
#define DECL(A, B) v8 a##A##B##_0 = {0}, a##A##B##_1 = {0};
#define FMA(A, B) if (A < KB && B < CB) { v8 s = bc(xp[A * Ci + B]); a##A##B##_0 += s * g0; \
                                          if (CV > 1) a##A##B##_1 += s * g1; }
#define STORE(A, B) if (A < KB && B < CB) { float *q = pw + A * kws + (long)B * ws; VST(q, VLD(q) + a##A##B##_0); \
                                            if (CV > 1) VST(q + 8, VLD(q + 8) + a##A##B##_1); }
    EACH3x8(DECL)
    for (int oh = 0; oh < OH; oh++) {
        const float *xr = x + oh * xrow, *gr = g + (long)oh * OW * gs;
        for (int ow = 0; ow < OW; ow++) {
            const float *xp = xr + (long)ow * Ci;
            v8 g0 = VLD(gr + (long)ow * gs), g1 = CV > 1 ? VLD(gr + (long)ow * gs + 8) : g0;
            EACH3x8(FMA)
        }
    }
    EACH3x8(STORE)
#undef DECL
#undef FMA
#undef STORE
}

#define WT(KB, CB, CV) wgrad_tile(xt, xrow, Ci, gg, gs, OH, OW, KB, CB, CV, pt, kws, ws)
#define WT_CB(KB, CBMAX, CV) \
    for (; ci0 + CBMAX <= Ci; ci0 += CBMAX) { SET_PTRS; WT(KB, CBMAX, CV); } \
    if (ci0 < Ci) { SET_PTRS; switch (Ci - ci0) { \
        case 1: WT(KB, 1, CV); break; case 2: WT(KB, 2, CV); break; case 3: WT(KB, 3, CV); break; \
        case 4: WT(KB, 4, CV); break; case 5: WT(KB, 5, CV); break; case 6: WT(KB, 6, CV); break; \
        case 7: WT(KB, 7, CV); break; } }
#define SET_PTRS const float *xt = x + kh * xrow + kw0 * Ci + ci0; \
    float *pt = pw + ((long)(kh * K + kw0) * Ci + ci0) * ws + g0

/* One image's contribution to a [kh][kw][ci][co] dw slice (co stride ws = up8(Co)); g with pixel stride gs. */
static void wgrad_image(const float *x, long xrow, int Ci, int K, const float *g, int gs, int OH, int OW, int Co,
                        float *pw) {
    const int ws = up8(Co);
    const long kws = (long)Ci * ws;
    for (int g0 = 0; g0 < Co; g0 += 16) {
        const int two = Co - g0 > 8;
        const float *gg = g + g0;
        for (int kh = 0; kh < K; kh++) {
            if (K == 3) {
                const int kw0 = 0;
                int ci0 = 0;
                if (two) { WT_CB(3, 2, 2) } else { WT_CB(3, 4, 1) }
            } else {
                for (int kw0 = 0; kw0 < K; kw0++) {
                    int ci0 = 0;
                    if (two) { WT_CB(1, 4, 2) } else { WT_CB(1, 7, 1) }
                }
            }
        }
    }
}

/* g: the gradient of out (N x OH x OW x Co). Writes dx (N x H x W x Ci; skipped when dx is NULL) and dw
   (Co x Ci x K x K). */
int tm_conv_backward(const float *x, long N, long H, long W, int Ci, const float *w, int Co, int K,
                     const float *g, float *dx, float *dw, int threads) {
    const long OH = H - K + 1, OW = W - K + 1, KK = K * K;
    const int wsx = up8(Ci), ws = up8(Co), gs = Co % 8 ? ws : Co;  /* g is copied at stride ws if Co % 8 */
    const long PH = OH + 2 * (K - 1), PW = OW + 2 * (K - 1);       /* g zero-padded for dx */
    const long nw = KK * Ci * ws;
    float *wt = malloc(sizeof(float) * KK * Co * wsx), *part = malloc(sizeof(float) * CHUNKS * nw);
    if (!wt || !part) { free(wt); free(part); return 2; }
    pack(w, Co, Ci, K, 1, wt);
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(N * OH * OW * Co > SERIAL)
    {
        const long padded = dx ? PH * PW * Co : 0, copied = gs != Co ? OH * OW * gs : 0;
        float *buf = malloc(sizeof(float) * (padded + copied + 1));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        if (dx) {
            #pragma omp for schedule(static) nowait
            for (long n = 0; n < N; n++) {
                if (!buf) continue;
                const float *gn = g + n * OH * OW * Co;
                memset(buf, 0, sizeof(float) * padded);
                for (long oh = 0; oh < OH; oh++)
                    memcpy(buf + ((oh + K - 1) * PW + K - 1) * Co, gn + oh * OW * Co, sizeof(float) * OW * Co);
                for (long i = 0; i < H; i++)
                    conv_row(buf + i * PW * Co, PW * Co, Co, K, wt, wsx, (int)W, dx + ((n * H + i) * W) * Ci, Ci);
            }
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            float *pw = part + k * nw;
            memset(pw, 0, sizeof(float) * nw);
            if (!buf) continue;
            for (long n = N * k / CHUNKS; n < N * (k + 1) / CHUNKS; n++) {
                const float *gn = g + n * OH * OW * Co;
                if (copied) {
                    float *gc = buf + padded;
                    for (long i = 0; i < OH * OW; i++) {
                        memcpy(gc + i * gs, gn + i * Co, sizeof(float) * Co);
                        memset(gc + i * gs + Co, 0, sizeof(float) * (gs - Co));
                    }
                    gn = gc;
                }
                wgrad_image(x + n * H * W * Ci, W * Ci, Ci, K, gn, gs, (int)OH, (int)OW, Co, pw);
            }
        }
        #pragma omp for schedule(static)
        for (long e = 0; e < nw; e++) {  /* e = [kh][kw][ci][co] of the padded layout */
            long co = e % ws, ci = e / ws % Ci, t = e / ws / Ci;
            if (co >= Co) continue;
            double s = 0;
            for (int k = 0; k < CHUNKS; k++) s += part[k * nw + e];
            dw[(co * Ci + ci) * KK + t] = (float)s;
        }
        free(buf);
    }
    free(wt); free(part);
    return failed ? 2 : 0;
}
