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
    float *part = malloc(sizeof(float) * (CHUNKS * U + 3 * U));
    if (!part) return 2;
    float *m = part + CHUNKS * U, *s = m + U, *t = s + U;
    const int par = E > SERIAL;
    /* one parallel region, three passes: the threads wake once per call, and the barriers between passes are
       short (equal static slices), so they mostly spin instead of sleeping */
    #pragma omp parallel num_threads(threads) if(par)
    {
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            DISPATCH(U, sum_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, part + k * U));
            if (k == 0) for (long i = tail; i < E; i++) part[(i - tail) % U] += x[i];
        }
        #pragma omp single
        {
            fold(part, U, C, mean);
            for (int c = 0; c < C; c++) mean[c] /= rows;
            for (int j = 0; j < U; j++) m[j] = (float)mean[j % C];
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++) {
            DISPATCH(U, sqdev_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, m, part + k * U));
            if (k == 0) for (long i = tail; i < E; i++) {
                float d = x[i] - m[(i - tail) % U];
                part[(i - tail) % U] += d * d;
            }
        }
        #pragma omp single
        {
            fold(part, U, C, var);
            for (int c = 0; c < C; c++) {
                var[c] /= rows;
                double invstd = 1.0 / sqrt(var[c] + eps), a = weight[c] * invstd;
                coef[c] = (float)invstd;
                coef[C + c] = (float)a;
            }
            for (int j = 0; j < U; j++) {
                int c = j % C;
                s[j] = coef[C + c];
                t[j] = (float)(bias[c] - mean[c] * ((double)weight[c] / sqrt(var[c] + eps)));
            }
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++)
            DISPATCH(U, apply_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, t, out));
    }
    for (long i = tail; i < E; i++) { float v = x[i] * s[(i - tail) % U] + t[(i - tail) % U]; out[i] = v > 0.f ? v : 0.f; }
    free(part);
    return 0;
}

/* g: the gradient of out; y: out; x, mean, coef: as the forward pass left them. Writes dx, dweight, dbias. */
int tm_bn_relu_backward(const float *g, const float *y, const float *x, long rows, int C, const double *mean,
                        const float *coef, float *dx, float *dweight, float *dbias, int threads) {
    const int U = unit(C);
    if (U > MAXU) return 1;
    const long E = rows * C, nb = E / U, tail = nb * U;
    float *part = malloc(sizeof(float) * (2 * CHUNKS * U + 4 * U));
    double *sums = malloc(sizeof(double) * 4 * C);
    if (!part || !sums) { free(part); free(sums); return 2; }
    float *p2 = part + CHUNKS * U, *m = p2 + CHUNKS * U, *s = m + U, *k1 = s + U, *k0 = k1 + U;
    double *sg = sums, *sgx = sums + C, *q1 = sums + 2 * C, *q0 = sums + 3 * C;
    for (int j = 0; j < U; j++) m[j] = (float)mean[j % C];
    const int par = E > SERIAL;
    #pragma omp parallel num_threads(threads) if(par)
    {
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
        #pragma omp single
        {
            fold(part, U, C, sg);
            fold(p2, U, C, sgx);
            for (int c = 0; c < C; c++) {
                double invstd = coef[c], a = coef[C + c], q = a * invstd * invstd * sgx[c] / rows;
                dweight[c] = (float)(sgx[c] * invstd);
                dbias[c] = (float)sg[c];
                q1[c] = -q;
                q0[c] = -a * sg[c] / rows + mean[c] * q;
            }
            for (int j = 0; j < U; j++) { s[j] = coef[C + j % C]; k1[j] = (float)q1[j % C]; k0[j] = (float)q0[j % C]; }
        }
        #pragma omp for schedule(static)
        for (int k = 0; k < CHUNKS; k++)
            DISPATCH(U, gin_blocks(g, y, x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, k1, k0, dx));
    }
    for (long i = tail; i < E; i++) {
        int j = (int)((i - tail) % U);
        float gz = y[i] > 0.f ? g[i] : 0.f;
        dx[i] = gz * s[j] + x[i] * k1[j] + k0[j];
    }
    free(part); free(sums);
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
