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
#define SERIAL 2048    /* below this many elements one thread is faster than waking the others */
#define INLINE static inline __attribute__((always_inline))


/* ---- the threads: a small pool of its own, not OpenMP.
 *
 * A training step of a tiny CNN is a few dozen short parallel operations with gaps of Python between them. Under a
 * passive wait policy a helper thread sleeps in each gap, and on a virtual machine waking it costs about 0.1-0.3 ms
 * (measured: a bare OpenMP loop on a 2-core AMD EPYC host), twice per operation, since the caller then also sleeps
 * at the closing barrier while the late helper finishes its half. Spinning threads (OMP_WAIT_POLICY=ACTIVE) avoid
 * that but hold both cores, and a second training beside them collapses. This pool's helpers wait for the next
 * operation by spinning with sched_yield(): the core is theirs only while nothing else wants it, so a process
 * beside them runs at once. After `spin_ns` without work they sleep on a condition variable.
 *
 * tm_run(task, arg, n) runs task(arg, tid, n) on the caller (tid 0) and n - 1 helpers and returns when all are done;
 * tm_barrier() inside a task waits for the other n - 1. Work is split by tid into fixed contiguous ranges. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

typedef void (*task_fn)(void *arg, int tid, int n);
#define MAXT 255   /* an operation's thread count travels in the low byte of P.word */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int helpers;                         /* helper threads started */
    atomic_ulong word;                   /* operation number << 8 | its thread count (caller included) */
    task_fn fn;                          /* read only by the operation's participants */
    void *arg;
    atomic_int pending, sleepers, bar_count;
    atomic_ulong bar_gen;
    atomic_long spin_ns;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 2000000};

INLINE void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}
/* spin (yielding the core every 32 rounds) until *v != old; never sleeps: for waits inside an operation */
INLINE void spin_while(atomic_ulong *v, unsigned long old) {
    for (unsigned i = 1; atomic_load_explicit(v, memory_order_acquire) == old; i++)
        if (i % 32) relax(); else sched_yield();
}

static void *helper(void *arg) {
    /* the operation number current when the helper was made: the operation that made it comes after */
    const int tid = (int)((unsigned long)arg & 255);
    unsigned long seen = (unsigned long)arg >> 8, w;
    for (;;) {
        long t0 = now_ns();
        for (unsigned i = 1; (atomic_load_explicit(&P.word, memory_order_acquire) >> 8) == seen; i++) {
            if (i % 32) { relax(); continue; }
            const long limit = atomic_load_explicit(&P.spin_ns, memory_order_relaxed);
            if (limit >= 0 && now_ns() - t0 > limit) {
                pthread_mutex_lock(&P.mu);
                atomic_fetch_add(&P.sleepers, 1);
                while ((atomic_load(&P.word) >> 8) == seen) pthread_cond_wait(&P.cv, &P.mu);
                atomic_fetch_sub(&P.sleepers, 1);
                pthread_mutex_unlock(&P.mu);
                break;
            }
            sched_yield();
        }
        /* one load: a helper outside this operation must not read a later operation's fields */
        w = atomic_load_explicit(&P.word, memory_order_acquire);
        seen = w >> 8;
        const int n = (int)(w & 255);
        if (tid < n) {  /* the caller waits for every participant, so fn and arg stay this operation's */
            P.fn(P.arg, tid, n);
            atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
        }
    }
    return NULL;
}

static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER;  /* one operation at a time */

static void after_fork_in_child(void) {  /* the helpers did not come along, nor did a lock another thread held */
    pthread_mutex_init(&run_mu, NULL);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.helpers = 0;
    atomic_store(&P.sleepers, 0);
}

static pthread_mutex_t start_mu = PTHREAD_MUTEX_INITIALIZER;

/* the number of threads an operation may use: n, or fewer if helpers could not be started */
static int ensure_helpers(int n) {
    if (n > MAXT) n = MAXT;
    if (n - 1 <= P.helpers) return n;
    pthread_mutex_lock(&start_mu);
    static int atfork;
    if (!atfork) { pthread_atfork(NULL, NULL, after_fork_in_child); atfork = 1; }
    while (P.helpers < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        unsigned long arg = (atomic_load(&P.word) >> 8) << 8 | (unsigned long)(P.helpers + 1);
        int failed = pthread_create(&t, &attr, helper, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) break;
        P.helpers++;
    }
    pthread_mutex_unlock(&start_mu);
    return P.helpers + 1 < n ? P.helpers + 1 : n;
}

/* Operations do not nest (a task never calls tm_run). Callers on several threads (ctypes releases the GIL) take
   turns: the pool runs one operation at a time. */
static void tm_run(task_fn fn, void *arg, int n) {
    if (n > 1) n = ensure_helpers(n);
    if (n <= 1) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&run_mu);
    P.fn = fn; P.arg = arg;
    atomic_store(&P.pending, n - 1);
    atomic_store(&P.bar_count, 0);
    atomic_store(&P.word, ((atomic_load(&P.word) >> 8) + 1) << 8 | (unsigned long)n);  /* publishes fn, arg */
    if (atomic_load(&P.sleepers) > 0) {                 /* a helper that checked gen before the bump sleeps */
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    fn(arg, 0, n);
    for (unsigned i = 1; atomic_load_explicit(&P.pending, memory_order_acquire) > 0; i++)
        if (i % 32) relax(); else sched_yield();
    pthread_mutex_unlock(&run_mu);
}

/* all n threads of the current operation meet here */
static void tm_barrier(int n) {
    if (n <= 1) return;
    unsigned long g = atomic_load(&P.bar_gen);
    if (atomic_fetch_add(&P.bar_count, 1) == n - 1) {
        atomic_store(&P.bar_count, 0);
        atomic_fetch_add(&P.bar_gen, 1);
    } else {
        spin_while(&P.bar_gen, g);
    }
}

/* how long an idle helper spins before it sleeps: ns >= 0, or -1 for never (the user asked for ACTIVE waiting) */
void tm_set_spin(long ns) { atomic_store(&P.spin_ns, ns); }

INLINE long lo(long n, int tid, int nt) { return n * tid / nt; }  /* thread tid's range [lo(tid), lo(tid + 1)) */

static long gcdl(long a, long b) { while (b) { long t = a % b; a = b; b = t; } return a; }
static int unit(int C) { int P = (int)(C / gcdl(C, 8) * 8); return P * ((32 + P - 1) / P); }

/* the support rule, for the caller to ask instead of copying it: 1 if the batch norm kernels take C channels */
int tm_bn_supports(int C) { return C > 0 && unit(C) <= MAXU; }

/* ---- the activations after batch norm, chosen by `act`: 0 ReLU, 1 GELU (the exact, erf form), 2 SiLU, 3 leaky
 * ReLU with `slope` below zero. Each is written without branches or library calls, so that the block loops below
 * vectorise: exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf coefficients), and
 * the normal CDF of GELU by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, float's own rounding near
 * 1), which needs the same exp(-z*z/2) as the normal density of its derivative. The tests hold them to PyTorch's
 * activations computed in float64. */
enum { ACT_RELU = 0, ACT_GELU = 1, ACT_SILU = 2, ACT_LEAKY = 3 };

INLINE float vexp(float x) {  /* e^x for x in [-87, 88], clamped outside: about 1 ulp */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = __builtin_fmaf(n, -0.693359375f, x);
    r = __builtin_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = __builtin_fmaf(p, r, 1.3981999507e-3f);
    p = __builtin_fmaf(p, r, 8.3334519073e-3f);
    p = __builtin_fmaf(p, r, 4.1665795894e-2f);
    p = __builtin_fmaf(p, r, 1.6666665459e-1f);
    p = __builtin_fmaf(p, r, 5.0000001201e-1f);
    p = __builtin_fmaf(p, r * r, r) + 1.0f;
    union { int i; float f; } scale = {.i = ((int)n + 127) << 23};
    return p * scale.f;
}

/* the normal CDF at z and, in *e, the unnormalised density exp(-z*z/2) */
INLINE float ncdf(float z, float *e) {
    float u = (z < 0.f ? -z : z) * 0.70710678118654752f;
    float t = 1.0f / __builtin_fmaf(0.3275911f, u, 1.0f);
    float q = 1.061405429f;
    q = __builtin_fmaf(q, t, -1.453152027f);
    q = __builtin_fmaf(q, t, 1.421413741f);
    q = __builtin_fmaf(q, t, -0.284496736f);
    q = __builtin_fmaf(q, t, 0.254829592f);
    q *= t;
    *e = vexp(-u * u);
    float half_erfc = 0.5f * q * *e;  /* (1 - erf(u)) / 2 */
    return z < 0.f ? half_erfc : 1.0f - half_erfc;
}

INLINE float act_f(const int A, float z, float slope) {
    if (A == ACT_RELU) return z > 0.f ? z : 0.f;
    if (A == ACT_GELU) { float e; return z * ncdf(z, &e); }
    if (A == ACT_SILU) return z / (1.0f + vexp(-z));
    return z > 0.f ? z : z * slope;
}

INLINE float act_d(const int A, float z, float slope) {  /* the derivative (not used for ReLU: see gz_relu) */
    if (A == ACT_GELU) { float e, c = ncdf(z, &e); return __builtin_fmaf(z * 0.39894228040143268f, e, c); }
    if (A == ACT_SILU) { float s = 1.0f / (1.0f + vexp(-z)); return s * __builtin_fmaf(z, 1.0f - s, 1.0f); }
    return z > 0.f ? 1.0f : slope;
}

#define DISPATCH_ACT(A, CALL) switch (A) { \
    case ACT_RELU: { const int a_ = ACT_RELU; CALL; } break; case ACT_GELU: { const int a_ = ACT_GELU; CALL; } break; \
    case ACT_SILU: { const int a_ = ACT_SILU; CALL; } break; default: { const int a_ = ACT_LEAKY; CALL; } }

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
                         const float *restrict t, const int A, float slope, float *restrict o) {
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) o[b * U + j] = act_f(A, x[b * U + j] * s[j] + t[j], slope);
}
/* Pass 1 of the backward pass: the sums of gz and gz * (x - mean), where gz is the gradient through the activation.
   ReLU's comes from its output (y > 0), exactly as before the other activations came; the others' from z = x*s + t,
   computed as the forward pass computed it, and gz is kept in dx for pass 2. */
INLINE void gsum_blocks(const float *restrict g, const float *restrict y, const float *restrict x, long b0, long b1,
                        const int U, const float *restrict m, const float *restrict s, const float *restrict t,
                        const int A, float slope, float *restrict o1, float *restrict o2, float *restrict gzs) {
    float a1[MAXU], a2[MAXU];
    for (int j = 0; j < U; j++) { a1[j] = 0; a2[j] = 0; }
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) {
            long i = b * U + j;
            float gz;
            if (A == ACT_RELU) gz = y[i] > 0.f ? g[i] : 0.f;
            else { gz = g[i] * act_d(A, x[i] * s[j] + t[j], slope); gzs[i] = gz; }
            a1[j] += gz;
            a2[j] += gz * (x[i] - m[j]);
        }
    for (int j = 0; j < U; j++) { o1[j] = a1[j]; o2[j] = a2[j]; }
}
INLINE void gin_blocks(const float *restrict g, const float *restrict y, const float *restrict x, long b0, long b1,
                       const int U, const float *restrict s, const float *restrict k1, const float *restrict k0,
                       const int A, float *restrict dx) {
    for (long b = b0; b < b1; b++)
        for (int j = 0; j < U; j++) {
            long i = b * U + j;
            float gz = A == ACT_RELU ? (y[i] > 0.f ? g[i] : 0.f) : dx[i];
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

/* x, out: rows x C. Writes out = act(x*a + b), the batch mean and biased var (C doubles each), and coef =
   [invstd; a; b] (3C floats) for the backward pass. One operation, three passes with a barrier after each of the
   first two. Between the passes every thread folds the slice sums itself (a few thousand additions, the same in
   every thread) instead of waiting for one thread to do it; the passes write separate buffers, so a thread still
   folding never sees the next pass's writes. */
struct bn_fwd { const float *x; long rows, E, nb, tail; int C, U, act; float slope; const float *weight, *bias;
                double eps; float *out; double *mean, *var; float *coef, *part, *p2; };

static void bn_fwd_task(void *arg, int tid, int n) {
    const struct bn_fwd *a = arg;
    const float *x = a->x;
    const long nb = a->nb, tail = a->tail, E = a->E, rows = a->rows;
    const int C = a->C, U = a->U, k0 = (int)lo(CHUNKS, tid, n), k1 = (int)lo(CHUNKS, tid + 1, n);
    const float slope = a->slope;
    float *part = a->part, *p2 = a->p2;
    float m[MAXU], s[MAXU], t[MAXU];
    double mu[MAXU], v[MAXU];
    for (int k = k0; k < k1; k++) {
        DISPATCH(U, sum_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, part + k * U));
        if (k == 0) for (long i = tail; i < E; i++) part[(i - tail) % U] += x[i];
    }
    tm_barrier(n);
    fold(part, U, C, mu);
    for (int c = 0; c < C; c++) mu[c] /= rows;
    for (int j = 0; j < U; j++) m[j] = (float)mu[j % C];
    for (int k = k0; k < k1; k++) {
        DISPATCH(U, sqdev_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, m, p2 + k * U));
        if (k == 0) for (long i = tail; i < E; i++) {
            float d = x[i] - m[(i - tail) % U];
            p2[(i - tail) % U] += d * d;
        }
    }
    tm_barrier(n);
    fold(p2, U, C, v);
    for (int c = 0; c < C; c++) v[c] /= rows;
    for (int j = 0; j < U; j++) {
        int c = j % C;
        s[j] = (float)(a->weight[c] * (1.0 / sqrt(v[c] + a->eps)));
        t[j] = (float)(a->bias[c] - mu[c] * ((double)a->weight[c] / sqrt(v[c] + a->eps)));
    }
    for (int k = k0; k < k1; k++)
        DISPATCH_ACT(a->act, DISPATCH(U, apply_blocks(x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, t, a_, slope,
                                                      a->out)));
    if (tid == 0) {
        for (int c = 0; c < C; c++) {
            double invstd = 1.0 / sqrt(v[c] + a->eps);
            a->mean[c] = mu[c];
            a->var[c] = v[c];
            a->coef[c] = (float)invstd;
            a->coef[C + c] = s[c];  /* the same floats as s and t above (U is a multiple of C) */
            a->coef[2 * C + c] = t[c];
        }
        for (long i = tail; i < E; i++) {
            float w = x[i] * s[(i - tail) % U] + t[(i - tail) % U];
            DISPATCH_ACT(a->act, a->out[i] = act_f(a_, w, slope));
        }
    }
}

int tm_bn_act_forward(const float *x, long rows, int C, const float *weight, const float *bias, double eps, int act,
                      float slope, float *out, double *mean, double *var, float *coef, int threads) {
    const int U = unit(C);
    if (U > MAXU) return 1;
    const long E = rows * C, nb = E / U;
    float *part = malloc(sizeof(float) * 2 * CHUNKS * U);
    if (!part) return 2;
    struct bn_fwd a = {x, rows, E, nb, nb * U, C, U, act, slope, weight, bias, eps, out, mean, var, coef, part,
                       part + CHUNKS * U};
    tm_run(bn_fwd_task, &a, E > SERIAL ? threads : 1);
    free(part);
    return 0;
}

/* g: the gradient of out; y: out; x, mean, coef: as the forward pass left them. Writes dx, dweight, dbias. Two
   passes, one barrier between them; each thread folds the sums itself, as in the forward pass. */
struct bn_bwd { const float *g, *y, *x; long rows, E, nb, tail; int C, U, act; float slope; const double *mean;
                const float *coef; float *dx, *dweight, *dbias, *part, *p2, *m; };

static void bn_bwd_task(void *arg, int tid, int n) {
    const struct bn_bwd *a = arg;
    const float *g = a->g, *y = a->y, *x = a->x, *m = a->m, *coef = a->coef;
    const long nb = a->nb, tail = a->tail, E = a->E, rows = a->rows;
    const int C = a->C, U = a->U, k0 = (int)lo(CHUNKS, tid, n), k1 = (int)lo(CHUNKS, tid + 1, n);
    const float slope = a->slope;
    float *part = a->part, *p2 = a->p2, *dx = a->dx;
    float s[MAXU], t[MAXU], k1v[MAXU], k0v[MAXU];
    double sg[MAXU], sgx[MAXU], q1[MAXU], q0[MAXU];
    for (int j = 0; j < U; j++) { s[j] = coef[C + j % C]; t[j] = coef[2 * C + j % C]; }
    for (int k = k0; k < k1; k++) {
        DISPATCH_ACT(a->act, DISPATCH(U, gsum_blocks(g, y, x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, m, s, t, a_,
                                                     slope, part + k * U, p2 + k * U, dx)));
        if (k == 0) for (long i = tail; i < E; i++) {
            int j = (int)((i - tail) % U);
            float gz;
            if (a->act == ACT_RELU) gz = y[i] > 0.f ? g[i] : 0.f;
            else { DISPATCH_ACT(a->act, gz = g[i] * act_d(a_, x[i] * s[j] + t[j], slope)); dx[i] = gz; }
            part[j] += gz; p2[j] += gz * (x[i] - m[j]);
        }
    }
    tm_barrier(n);
    fold(part, U, C, sg);
    fold(p2, U, C, sgx);
    for (int c = 0; c < C; c++) {
        double invstd = coef[c], av = coef[C + c], q = av * invstd * invstd * sgx[c] / rows;
        q1[c] = -q;
        q0[c] = -av * sg[c] / rows + a->mean[c] * q;
    }
    for (int j = 0; j < U; j++) { k1v[j] = (float)q1[j % C]; k0v[j] = (float)q0[j % C]; }
    for (int k = k0; k < k1; k++)
        DISPATCH_ACT(a->act, DISPATCH(U, gin_blocks(g, y, x, nb * k / CHUNKS, nb * (k + 1) / CHUNKS, u_, s, k1v, k0v,
                                                    a_, dx)));
    if (tid == 0) {
        for (int c = 0; c < C; c++) {
            a->dweight[c] = (float)(sgx[c] * coef[c]);
            a->dbias[c] = (float)sg[c];
        }
        for (long i = tail; i < E; i++) {
            int j = (int)((i - tail) % U);
            float gz = a->act == ACT_RELU ? (y[i] > 0.f ? g[i] : 0.f) : dx[i];
            dx[i] = gz * s[j] + x[i] * k1v[j] + k0v[j];
        }
    }
}

int tm_bn_act_backward(const float *g, const float *y, const float *x, long rows, int C, const double *mean,
                       const float *coef, int act, float slope, float *dx, float *dweight, float *dbias,
                       int threads) {
    const int U = unit(C);
    if (U > MAXU) return 1;
    const long E = rows * C, nb = E / U;
    float *part = malloc(sizeof(float) * (2 * CHUNKS * U + U));
    if (!part) return 2;
    float *m = part + 2 * CHUNKS * U;
    for (int j = 0; j < U; j++) m[j] = (float)mean[j % C];
    struct bn_bwd a = {g, y, x, rows, E, nb, nb * U, C, U, act, slope, mean, coef, dx, dweight, dbias, part,
                       part + CHUNKS * U, m};
    tm_run(bn_bwd_task, &a, E > SERIAL ? threads : 1);
    free(part);
    return 0;
}

/* ---- 2x2 max pool, stride 2, for the same channels-last float32 activations: x is N x H x W x C, out and idx
 * are N x (H/2) x (W/2) x C (floor). idx keeps which of the 4 inputs won (dh * 2 + dw), one byte each, where
 * PyTorch keeps an 8-byte flat index; the first maximum in row-major order wins and NaN propagates, as in
 * PyTorch, so forward and backward are bit-identical to max_pool2d's. Backward writes every element of dx once:
 * the gradient where an input won, else zero (PyTorch zero-fills dx, then scatters). */

/* 8 channels of one window at a time (GCC's vectors, as the convolutions below use): lanes compare and select
   as the scalar loop's branches do, element by element, so the same maxima and winners. C >= 8: the last group of
   8 ends at channel C, overlapping the one before when 8 does not divide C (its lanes are written twice, alike). */
typedef float pv8 __attribute__((vector_size(32)));
typedef float pv8u __attribute__((vector_size(32), aligned(4)));
typedef int pi8 __attribute__((vector_size(32)));
typedef unsigned char pb8 __attribute__((vector_size(8)));
#define PLD(p) (*(const pv8u *)(p))
#define PST(p, v) (*(pv8u *)(p) = (v))

INLINE void pool8(const float *a, const float *b, const int C, float *o, unsigned char *id) {
    pv8 m = PLD(a), v;
    pi8 k = {0}, won;
#define PICK(src, j) v = PLD(src); won = (v > m) | (v != v); \
    m = (pv8)(((pi8)v & won) | ((pi8)m & ~won)); k = (k & ~won) | ((pi8){j, j, j, j, j, j, j, j} & won);
    PICK(a + C, 1) PICK(b, 2) PICK(b + C, 3)
#undef PICK
    PST(o, m);
    pb8 kb = __builtin_convertvector(k, pb8);
    memcpy(id, &kb, 8);
}

INLINE void unpool8(const float *g, const unsigned char *id, const int C, float *d0, float *d1) {
    pb8 kb;
    memcpy(&kb, id, 8);
    const pi8 k = __builtin_convertvector(kb, pi8), v = (pi8)PLD(g);
    PST(d0, (pv8)(v & (k == 0))); PST(d0 + C, (pv8)(v & (k == 1)));
    PST(d1, (pv8)(v & (k == 2))); PST(d1 + C, (pv8)(v & (k == 3)));
}

INLINE void pool_row(const float *restrict r0, const float *restrict r1, long OW, const int C, float *restrict o,
                     unsigned char *restrict id) {
    for (long ow = 0; ow < OW; ow++) {
        const float *a = r0 + 2 * ow * C, *b = r1 + 2 * ow * C;
        if (C >= 8) {
            for (int c = 0; c < C; c += 8) {
                const int c0 = c + 8 <= C ? c : C - 8;
                pool8(a + c0, b + c0, C, o + ow * C + c0, id + ow * C + c0);
            }
            continue;
        }
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
        if (C >= 8) {
            for (int c = 0; c < C; c += 8) {
                const int c0 = c + 8 <= C ? c : C - 8;
                unpool8(g + ow * C + c0, id + ow * C + c0, C, a + c0, b + c0);
            }
            continue;
        }
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

struct pool2 { const float *x; const unsigned char *idx_in; long N, H, W; int C; float *out; unsigned char *idx; };

static void pool_fwd_task(void *arg, int tid, int n) {
    const struct pool2 *a = arg;
    const long H = a->H, W = a->W, OH = H / 2, OW = W / 2, rows = a->N * OH;
    const int C = a->C;
    for (long r = lo(rows, tid, n); r < lo(rows, tid + 1, n); r++) {
        const float *r0 = a->x + ((r / OH * H + 2 * (r % OH)) * W) * C;
        DISPATCH_C(C, pool_row(r0, r0 + W * C, OW, c_, a->out + r * OW * C, a->idx + r * OW * C));
    }
}

void tm_maxpool2_forward(const float *x, long N, long H, long W, int C, float *out, unsigned char *idx,
                         int threads) {
    struct pool2 a = {x, NULL, N, H, W, C, out, idx};
    tm_run(pool_fwd_task, &a, N * H * W * C > SERIAL ? threads : 1);
}

static void pool_bwd_task(void *arg, int tid, int n) {  /* x: the output gradient; out: dx */
    const struct pool2 *a = arg;
    const long H = a->H, W = a->W, OH = H / 2, OW = W / 2;
    const int C = a->C;
    for (long i = lo(a->N, tid, n); i < lo(a->N, tid + 1, n); i++) {
        for (long oh = 0; oh < OH; oh++) {
            float *d0 = a->out + ((i * H + 2 * oh) * W) * C;
            long r = i * OH + oh;
            DISPATCH_C(C, unpool_row(a->x + r * OW * C, a->idx_in + r * OW * C, W, OW, c_, d0, d0 + W * C));
        }
        if (H % 2) memset(a->out + ((i * H + H - 1) * W) * C, 0, sizeof(float) * W * C);  /* an odd last row */
    }
}

void tm_maxpool2_backward(const float *g, const unsigned char *idx, long N, long H, long W, int C, float *dx,
                          int threads) {
    struct pool2 a = {g, idx, N, H, W, C, dx, NULL};
    tm_run(pool_bwd_task, &a, N * H * W * C > SERIAL ? threads : 1);
}

/* ---- 2-D convolution for the same channels-last float32 activations: stride 1, no padding, no dilation, one
 * group, no bias (batch norm follows). x is N x H x W x Ci, w is PyTorch's Co x Ci x K x K, out is
 * N x OH x OW x Co with OH = H - K + 1.
 *
 * Why: PyTorch runs these through oneDNN, which for 1-16 channels reorders activations and weights into blocked
 * layouts around every call (about 20 extra parallel operations per training step of Model_7) and reaches about
 * a third of the machine's multiply rate in the backward pass. Each call here is one operation of the thread pool
 * above.
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

/* ---- the same rows with pixels in the vector lanes, for Co that 8 does not divide and below 16 (12: the answer's
 * front). The channel-vector tiles above then leave lanes idle (12 of 16); here a vector holds 8 consecutive output
 * pixels of one channel, and the input is read from a planar copy of the image (xt[(h*Ci + ci)*plane + w], plane >=
 * W + 16, readable past a row's end). Each output element is still the sum over kh, then kw, then ci of x * w, one
 * fused multiply-add each from zero: the same operations in the same order as conv_tile, so the same bits.
 * Tiles: 16 pixels x up to 6 channels, or, for the last <= 8 pixels of a row, 8 pixels x up to 12 channels; 12
 * accumulators either way. Two functions, not one with the vector count as a parameter as conv_tile has: merged
 * that way (the same bits), gcc 12 made the forward pass of the answer's two 12-channel layers 8-10% slower. */
#define EACH6(M) M(0) M(1) M(2) M(3) M(4) M(5)
INLINE void px_tile16(const float *restrict xt, long plane, int Ci, int K, const float *restrict w, int ws,
                      const int NC, float *restrict o, int Co, int valid) {
#define DECL(j) v8 a##j##_0 = {0}, a##j##_1 = {0};
#define FMA(j) if (j < NC) { const v8 b = bc(wp[j]); a##j##_0 += x0 * b; a##j##_1 += x1 * b; }
#define KEEP(j) if (j < NC) { VST(t[j], a##j##_0); VST(t[j] + 8, a##j##_1); }
    EACH6(DECL)
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++)
            for (int ci = 0; ci < Ci; ci++) {
                const float *xp = xt + ((long)kh * Ci + ci) * plane + kw;
                const v8 x0 = VLD(xp), x1 = VLD(xp + 8);
                const float *wp = w + ((long)(kh * K + kw) * Ci + ci) * ws;
                EACH6(FMA)
            }
    float t[6][16];
    EACH6(KEEP)
    for (int p = 0; p < valid; p++)
        for (int j = 0; j < NC; j++) o[(long)p * Co + j] = t[j][p];
#undef DECL
#undef FMA
#undef KEEP
}

INLINE void px_tile8(const float *restrict xt, long plane, int Ci, int K, const float *restrict w, int ws,
                     const int NC, float *restrict o, int Co, int valid) {
#define DECL(j) v8 a##j = {0};
#define FMA(j) if (j < NC) a##j += x0 * bc(wp[j]);
#define KEEP(j) if (j < NC) VST(t[j], a##j);
    EACH12(DECL)
    for (int kh = 0; kh < K; kh++)
        for (int kw = 0; kw < K; kw++)
            for (int ci = 0; ci < Ci; ci++) {
                const v8 x0 = VLD(xt + ((long)kh * Ci + ci) * plane + kw);
                const float *wp = w + ((long)(kh * K + kw) * Ci + ci) * ws;
                EACH12(FMA)
            }
    float t[12][8];
    EACH12(KEEP)
    for (int p = 0; p < valid; p++)
        for (int j = 0; j < NC; j++) o[(long)p * Co + j] = t[j][p];
#undef DECL
#undef FMA
#undef KEEP
}

/* Whether a row of OW pixels and Co channels takes the pixel tiles: 9 to 15 channels, where the channel tiles leave
   a quarter or more of their lanes idle. Fewer than 8 channels stay on the channel tiles: there the compiler fuses
   the multiply-adds of some tail tiles and not others (a row's last pixels, in separate multiply and add), so no
   other arrangement gives their bits. tm_set_pixel_tiles(0) turns the pixel tiles off, for the test that holds
   both to the same bits. */
static atomic_int px_on = 1;
void tm_set_pixel_tiles(int on) { atomic_store(&px_on, on); }
static int px_rows(int Co, int OW) { return atomic_load(&px_on) && Co > 8 && Co < 16 && OW >= 8; }

#define T16(NC) px_tile16(xr + ow, plane, Ci, K, w + c0, ws, NC, o + (long)ow * Co + c0, Co, valid)
#define T8(NC) px_tile8(xr + ow, plane, Ci, K, w + c0, ws, NC, o + (long)ow * Co + c0, Co, valid)

/* One output row: xr is the planar copy at the row's first input row; w packed as for conv_row (ws = up8(Co)). */
static void conv_row_px(const float *xr, long plane, int Ci, int K, const float *w, int ws, int OW, float *o, int Co) {
    int ow = 0;
    for (; OW - ow > 8; ow += 16) {
        const int valid = OW - ow < 16 ? OW - ow : 16;
        for (int c0 = 0; c0 < Co; c0 += 6)
            switch (Co - c0 < 6 ? Co - c0 : 6) {
                case 1: T16(1); break; case 2: T16(2); break; case 3: T16(3); break;
                case 4: T16(4); break; case 5: T16(5); break; default: T16(6);
            }
    }
    if (ow < OW) {  /* 8 pixels x all the channels, or, above 12, two halves (a lone channel's tile is not fused) */
        const int valid = OW - ow, half = Co > 12 ? (Co + 1) / 2 : Co;
        for (int c0 = 0; c0 < Co; c0 += half)
            switch (Co - c0 < half ? Co - c0 : half) {
                case 1: T8(1); break; case 2: T8(2); break; case 3: T8(3); break; case 4: T8(4); break;
                case 5: T8(5); break; case 6: T8(6); break; case 7: T8(7); break; case 8: T8(8); break;
                case 9: T8(9); break; case 10: T8(10); break; case 11: T8(11); break; default: T8(12);
            }
    }
}
#undef T16
#undef T8

/* `rows` rows of one channels-last image (W pixels of C channels each) into the planar layout
   xt[(h*C + c)*plane + w]; what lies around them in xt (a plane's columns from W on, a padding) is left as it is */
static void planar(const float *x, long rows, long W, int C, long plane, float *xt) {
    for (long h = 0; h < rows; h++)
        for (long w = 0; w < W; w++) {
            const float *px = x + (h * W + w) * C;
            for (int c = 0; c < C; c++) xt[(h * C + c) * plane + w] = px[c];
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

struct conv { const float *x; long N, H, W; int Ci, Co, K; const float *g; float *out, *dx, *dw;
               const float *wp; float *part; atomic_int failed; };

static void conv_fwd_task(void *arg, int tid, int n) {
    struct conv *a = arg;
    const long H = a->H, W = a->W, OH = H - a->K + 1, OW = W - a->K + 1, rows = a->N * OH;
    const int Ci = a->Ci, K = a->K;
    if (px_rows(a->Co, (int)OW)) {  /* a planar copy of each image this thread's rows read, made once */
        const long plane = W + 16;
        float *xt = calloc(H * Ci * plane + 16, sizeof(float));
        if (!xt) { atomic_store(&a->failed, 1); return; }
        long have = -1;
        for (long r = lo(rows, tid, n); r < lo(rows, tid + 1, n); r++) {
            const long i = r / OH, oh = r % OH;
            if (i != have) { planar(a->x + i * H * W * Ci, H, W, Ci, plane, xt); have = i; }
            conv_row_px(xt + oh * Ci * plane, plane, Ci, K, a->wp, up8(a->Co), (int)OW, a->out + r * OW * a->Co,
                        a->Co);
        }
        free(xt);
        return;
    }
    for (long r = lo(rows, tid, n); r < lo(rows, tid + 1, n); r++)
        conv_row(a->x + ((r / OH * H + r % OH) * W) * Ci, W * Ci, Ci, K, a->wp, up8(a->Co), (int)OW,
                 a->out + r * OW * a->Co, a->Co);
}

int tm_conv_forward(const float *x, long N, long H, long W, int Ci, const float *w, int Co, int K, float *out,
                    int threads) {
    const long OH = H - K + 1, OW = W - K + 1;
    float *wp = malloc(sizeof(float) * K * K * Ci * up8(Co));
    if (!wp) return 2;
    pack(w, Co, Ci, K, 0, wp);
    struct conv a = {x, N, H, W, Ci, Co, K, NULL, out, NULL, NULL, wp, NULL, 0};
    tm_run(conv_fwd_task, &a, N * OH * OW * Co > SERIAL ? threads : 1);
    free(wp);
    return atomic_load(&a.failed) ? 2 : 0;
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

/* One image's output gradient g (OH x OW x C) into buf, zero-padded by K-1 on every side: what dx convolves. */
static void pad_image(const float *g, long OH, long OW, int C, int K, float *buf) {
    const long PW = OW + 2 * (K - 1);
    memset(buf, 0, sizeof(float) * (OH + 2 * (K - 1)) * PW * C);
    for (long oh = 0; oh < OH; oh++)
        memcpy(buf + ((oh + K - 1) * PW + K - 1) * C, g + oh * OW * C, sizeof(float) * OW * C);
}

/* dw from the CHUNKS slice partials ([kh][kw][ci][co], co padded to up8(Co)): this thread's share of the elements,
   each summed in slice order, in double. A depthwise conv's partials are the same layout with Ci = 1. */
static void sum_slices(const float *part, long nw, int Ci, int Co, int KK, float *dw, int tid, int n) {
    const long ws = up8(Co);
    for (long e = lo(nw, tid, n); e < lo(nw, tid + 1, n); e++) {
        const long co = e % ws, ci = e / ws % Ci, t = e / ws / Ci;
        if (co >= Co) continue;
        double sum = 0;
        for (int k = 0; k < CHUNKS; k++) sum += part[k * nw + e];
        dw[(co * Ci + ci) * KK + t] = (float)sum;
    }
}

/* dx for images [i0, i1): the valid convolution of the output gradient, zero-padded by K-1, with the flipped
   kernel; then dw for the fixed image slices of this thread; a barrier; then this thread's share of the slice sums,
   in slice order, in double. */
static void conv_bwd_task(void *arg, int tid, int n) {
    struct conv *a = arg;
    const long N = a->N, H = a->H, W = a->W;
    const int Ci = a->Ci, Co = a->Co, K = a->K;
    const long OH = H - K + 1, OW = W - K + 1, KK = K * K, PH = OH + 2 * (K - 1), PW = OW + 2 * (K - 1);
    const int ws = up8(Co), gs = Co % 8 ? ws : Co;  /* g is copied at stride ws if Co % 8 */
    const long nw = KK * Ci * ws;
    const long padded = a->dx ? PH * PW * Co : 0, copied = gs != Co ? OH * OW * gs : 0;
    float *buf = malloc(sizeof(float) * (padded + copied + 1));
    if (!buf) atomic_store(&a->failed, 1);
    if (a->dx && buf && px_rows(Ci, (int)W)) {  /* dx in pixel tiles: the padded gradient as planes, zeroed once */
        const long plane = PW + 16;
        float *gt = calloc(PH * Co * plane + 16, sizeof(float));
        if (!gt) atomic_store(&a->failed, 1);
        for (long i = lo(N, tid, n); gt && i < lo(N, tid + 1, n); i++) {
            planar(a->g + i * OH * OW * Co, OH, OW, Co, plane, gt + (K - 1) * Co * plane + (K - 1));
            for (long r = 0; r < H; r++)
                conv_row_px(gt + r * Co * plane, plane, Co, K, a->wp, up8(Ci), (int)W, a->dx + ((i * H + r) * W) * Ci,
                            Ci);
        }
        free(gt);
    } else if (a->dx && buf)
        for (long i = lo(N, tid, n); i < lo(N, tid + 1, n); i++) {
            pad_image(a->g + i * OH * OW * Co, OH, OW, Co, K, buf);
            for (long r = 0; r < H; r++)
                conv_row(buf + r * PW * Co, PW * Co, Co, K, a->wp, up8(Ci), (int)W, a->dx + ((i * H + r) * W) * Ci,
                         Ci);
        }
    for (long k = lo(CHUNKS, tid, n); k < lo(CHUNKS, tid + 1, n); k++) {
        float *pw = a->part + k * nw;
        memset(pw, 0, sizeof(float) * nw);
        if (!buf) continue;
        for (long i = N * k / CHUNKS; i < N * (k + 1) / CHUNKS; i++) {
            const float *gn = a->g + i * OH * OW * Co;
            if (copied) {
                float *gc = buf + padded;
                for (long j = 0; j < OH * OW; j++) {
                    memcpy(gc + j * gs, gn + j * Co, sizeof(float) * Co);
                    memset(gc + j * gs + Co, 0, sizeof(float) * (gs - Co));
                }
                gn = gc;
            }
            wgrad_image(a->x + i * H * W * Ci, W * Ci, Ci, K, gn, gs, (int)OH, (int)OW, Co, pw);
        }
    }
    free(buf);
    tm_barrier(n);
    sum_slices(a->part, nw, Ci, Co, (int)KK, a->dw, tid, n);
}

/* g: the gradient of out (N x OH x OW x Co). Writes dx (N x H x W x Ci; skipped when dx is NULL) and dw
   (Co x Ci x K x K). */
int tm_conv_backward(const float *x, long N, long H, long W, int Ci, const float *w, int Co, int K,
                     const float *g, float *dx, float *dw, int threads) {
    const long OH = H - K + 1, OW = W - K + 1, nw = (long)K * K * Ci * up8(Co);
    float *wt = malloc(sizeof(float) * K * K * Co * up8(Ci)), *part = malloc(sizeof(float) * CHUNKS * nw);
    if (!wt || !part) { free(wt); free(part); return 2; }
    pack(w, Co, Ci, K, 1, wt);
    struct conv a = {x, N, H, W, Ci, Co, K, g, NULL, dx, dw, wt, part, 0};
    tm_run(conv_bwd_task, &a, N * OH * OW * Co > SERIAL ? threads : 1);
    free(wt); free(part);
    return atomic_load(&a.failed) ? 2 : 0;
}

/* ---- depthwise 2-D convolution (groups = C: one K x K filter per channel), stride 1, no padding, no bias, on the
 * same channels-last activations: out[n][oh][ow][c] = sum over kh, kw of x[n][oh+kh][ow+kw][c] * w[c][0][kh][kw].
 *
 * Why: PyTorch runs a depthwise convolution in channels-last memory through oneDNN, with a reorder of the weights
 * around each call, and its backward as separate input and weight passes; in a training step of Model_11 at batch
 * 32 its three depthwise layers cost about as much as its seven other convolutions' forward passes.
 *
 * forward:  each output pixel is C/8 vectors of 8 channels, each the sum of K*K products of an input vector with a
 *           vector of packed weights ([kh][kw][c], c padded to up8(C) with zeros).
 * backward: dx is the same depthwise convolution of the output gradient, zero-padded by K-1, with each filter
 *           flipped; dw sums x * g over CHUNKS fixed slices of images in float, then the slices in order in double.
 * A vector that would reach past a channel group's C reads the next pixel's channels (in bounds; those lanes are
 * never stored), except at a buffer's very end, where it reads a zero-filled copy.
 * Determinism: as for the convolutions above, every result is the same at any thread count, run after run. */

INLINE v8 ld_to(const float *p, const float *end) {
    if (p + 8 <= end) return VLD(p);
    float t[8] = {0};
    memcpy(t, p, sizeof(float) * (end - p));
    return VLD(t);
}
INLINE void st_lanes(float *o, v8 v, int lanes) {
    if (lanes == 8) { VST(o, v); return; }
    float t[8];
    VST(t, v);
    memcpy(o, t, sizeof(float) * lanes);
}

/* w (C x 1 x K x K) -> [kh][kw][c] with c padded to up8(C); flip = 1 reverses each filter (for dx) */
static void pack_dw(const float *w, int C, int K, int flip, float *out) {
    const int KK = K * K, ws = up8(C);
    memset(out, 0, sizeof(float) * KK * ws);
    for (int c = 0; c < C; c++)
        for (int t = 0; t < KK; t++) out[(long)(flip ? KK - 1 - t : t) * ws + c] = w[(long)c * KK + t];
}

/* One output row of OW pixels: x points at the first of the K input rows (row stride xrow, pixel stride C). */
static void dw_row(const float *x, long xrow, int C, int K, const float *wp, int OW, float *o, const float *end) {
    const int ws = up8(C);
    for (int c0 = 0; c0 < C; c0 += 8) {
        const int lanes = C - c0 < 8 ? C - c0 : 8;
        if (K == 3) {
            const float *w = wp + c0;
            const v8 w0 = VLD(w), w1 = VLD(w + ws), w2 = VLD(w + 2 * ws), w3 = VLD(w + 3 * ws), w4 = VLD(w + 4 * ws),
                     w5 = VLD(w + 5 * ws), w6 = VLD(w + 6 * ws), w7 = VLD(w + 7 * ws), w8 = VLD(w + 8 * ws);
            for (int ow = 0; ow < OW; ow++) {
                const float *p = x + (long)ow * C + c0, *q = p + xrow, *r = q + xrow;
                v8 acc = ld_to(p, end) * w0 + ld_to(p + C, end) * w1 + ld_to(p + 2 * C, end) * w2
                       + ld_to(q, end) * w3 + ld_to(q + C, end) * w4 + ld_to(q + 2 * C, end) * w5
                       + ld_to(r, end) * w6 + ld_to(r + C, end) * w7 + ld_to(r + 2 * C, end) * w8;
                st_lanes(o + (long)ow * C + c0, acc, lanes);
            }
        } else {
            for (int ow = 0; ow < OW; ow++) {
                v8 acc = {0};
                for (int kh = 0; kh < K; kh++)
                    for (int kw = 0; kw < K; kw++)
                        acc += ld_to(x + kh * xrow + (long)(ow + kw) * C + c0, end) * VLD(wp + (long)(kh * K + kw) * ws + c0);
                st_lanes(o + (long)ow * C + c0, acc, lanes);
            }
        }
    }
}

/* One image's contribution to dw ([kh][kw][c], c stride ws = up8(C); the padding lanes collect nothing used). */
static void dw_wgrad_image(const float *x, long xrow, int C, int K, const float *g, int OH, int OW, float *pw,
                           const float *xend, const float *gend) {
    const int ws = up8(C);
    for (int c0 = 0; c0 < C; c0 += 8) {
        if (K == 3) {
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}, a8 = {0};
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    const v8 gv = ld_to(g + ((long)oh * OW + ow) * C + c0, gend);
                    const float *p = x + oh * xrow + (long)ow * C + c0, *q = p + xrow, *r = q + xrow;
                    a0 += ld_to(p, xend) * gv; a1 += ld_to(p + C, xend) * gv; a2 += ld_to(p + 2 * C, xend) * gv;
                    a3 += ld_to(q, xend) * gv; a4 += ld_to(q + C, xend) * gv; a5 += ld_to(q + 2 * C, xend) * gv;
                    a6 += ld_to(r, xend) * gv; a7 += ld_to(r + C, xend) * gv; a8 += ld_to(r + 2 * C, xend) * gv;
                }
            float *w = pw + c0;
            VST(w, VLD(w) + a0); VST(w + ws, VLD(w + ws) + a1); VST(w + 2 * ws, VLD(w + 2 * ws) + a2);
            VST(w + 3 * ws, VLD(w + 3 * ws) + a3); VST(w + 4 * ws, VLD(w + 4 * ws) + a4);
            VST(w + 5 * ws, VLD(w + 5 * ws) + a5); VST(w + 6 * ws, VLD(w + 6 * ws) + a6);
            VST(w + 7 * ws, VLD(w + 7 * ws) + a7); VST(w + 8 * ws, VLD(w + 8 * ws) + a8);
        } else {
            for (int kh = 0; kh < K; kh++)
                for (int kw = 0; kw < K; kw++) {
                    v8 acc = {0};
                    for (int oh = 0; oh < OH; oh++)
                        for (int ow = 0; ow < OW; ow++)
                            acc += ld_to(x + (oh + kh) * xrow + (long)(ow + kw) * C + c0, xend)
                                 * ld_to(g + ((long)oh * OW + ow) * C + c0, gend);
                    float *w = pw + (long)(kh * K + kw) * ws + c0;
                    VST(w, VLD(w) + acc);
                }
        }
    }
}

struct dwc { const float *x; long N, H, W; int C, K; const float *g; float *out, *dx, *dw; const float *wp;
             float *part; atomic_int failed; };

static void dw_fwd_task(void *arg, int tid, int n) {
    struct dwc *a = arg;
    const long H = a->H, W = a->W, C = a->C, OH = H - a->K + 1, OW = W - a->K + 1, rows = a->N * OH;
    const float *end = a->x + a->N * H * W * C;
    for (long r = lo(rows, tid, n); r < lo(rows, tid + 1, n); r++)
        dw_row(a->x + ((r / OH * H + r % OH) * W) * C, W * C, (int)C, a->K, a->wp, (int)OW, a->out + r * OW * C, end);
}

static void dw_bwd_task(void *arg, int tid, int n) {
    struct dwc *a = arg;
    const long N = a->N, H = a->H, W = a->W, C = a->C, K = a->K;
    const long OH = H - K + 1, OW = W - K + 1, PH = OH + 2 * (K - 1), PW = OW + 2 * (K - 1), ws = up8((int)C);
    const long nw = K * K * ws, padded = a->dx ? PH * PW * C : 0;
    if (a->dx) {
        float *buf = malloc(sizeof(float) * (padded + 8));
        if (!buf) atomic_store(&a->failed, 1);
        else {
            for (long i = lo(N, tid, n); i < lo(N, tid + 1, n); i++) {
                pad_image(a->g + i * OH * OW * C, OH, OW, (int)C, (int)K, buf);
                for (long r = 0; r < H; r++)
                    dw_row(buf + r * PW * C, PW * C, (int)C, (int)K, a->wp, (int)W, a->dx + ((i * H + r) * W) * C,
                           buf + padded);
            }
            free(buf);
        }
    }
    const float *xend = a->x + N * H * W * C, *gend = a->g + N * OH * OW * C;
    for (long k = lo(CHUNKS, tid, n); k < lo(CHUNKS, tid + 1, n); k++) {
        float *pw = a->part + k * nw;
        memset(pw, 0, sizeof(float) * nw);
        for (long i = N * k / CHUNKS; i < N * (k + 1) / CHUNKS; i++)
            dw_wgrad_image(a->x + i * H * W * C, W * C, (int)C, (int)K, a->g + i * OH * OW * C, (int)OH, (int)OW, pw,
                           xend, gend);
    }
    tm_barrier(n);
    sum_slices(a->part, nw, 1, (int)C, (int)(K * K), a->dw, tid, n);  /* [kh][kw][c]: one input channel per filter */
}

/* The same parameters as tm_conv_forward and tm_conv_backward, so that a caller calls either the same way; Co must
   equal C (else 1). */
int tm_dwconv_forward(const float *x, long N, long H, long W, int C, const float *w, int Co, int K, float *out,
                      int threads) {
    if (Co != C) return 1;
    const long OH = H - K + 1, OW = W - K + 1;
    float *wp = malloc(sizeof(float) * K * K * up8(C));
    if (!wp) return 2;
    pack_dw(w, C, K, 0, wp);
    struct dwc a = {x, N, H, W, C, K, NULL, out, NULL, NULL, wp, NULL, 0};
    tm_run(dw_fwd_task, &a, N * OH * OW * C > SERIAL ? threads : 1);
    free(wp);
    return 0;
}

/* g: the gradient of out (N x OH x OW x C). Writes dx (N x H x W x C; skipped when dx is NULL) and dw (C x 1 x K x K). */
int tm_dwconv_backward(const float *x, long N, long H, long W, int C, const float *w, int Co, int K, const float *g,
                       float *dx, float *dw, int threads) {
    if (Co != C) return 1;
    const long OH = H - K + 1, OW = W - K + 1, nw = (long)K * K * up8(C);
    float *wt = malloc(sizeof(float) * nw), *part = malloc(sizeof(float) * CHUNKS * nw);
    if (!wt || !part) { free(wt); free(part); return 2; }
    pack_dw(w, C, K, 1, wt);
    struct dwc a = {x, N, H, W, C, K, g, NULL, dx, dw, wt, part, 0};
    tm_run(dw_bwd_task, &a, N * OH * OW * C > SERIAL ? threads : 1);
    free(wt); free(part);
    return atomic_load(&a.failed) ? 2 : 0;
}

/* ---- a chain of the kernels above in one call: the forward or the backward pass of a program's run of kernel
 * leaves (accel/program.py), one op after the other, each op the same call with the same arguments as the caller
 * would make it, so the results are bit for bit those of calling them one by one.
 *
 * Why: at batch 32 a step of the answer is about 40 such calls of tens to hundreds of microseconds, and between
 * them Python fetched each tensor's pointer and shape and marshalled a dozen ctypes arguments. A profile of that
 * step (py-spy, 1 thread, AMD EPYC AVX-512) put the program's Python around its kernels at about a sixth of it.
 *
 * An op names its kernel, its input's shape (N, H, W, C: channels-last) and its memory. The caller builds the array
 * once per set of buffers and, each step, sets what changes: the chain's input, the last op's output gradient, and
 * the parameters' gradients (new tensors every step). In the backward pass, op i's output gradient is op i+1's dx.
 * Returns 0, or (the op's index + 1) * 16 + its kernel's error code. Layout: kernels.py's ChainOp, field for field (tm_op_layout). */
enum { OP_CONV = 0, OP_DWCONV = 1, OP_BN = 2, OP_POOL = 3 };

typedef struct {
    long kind, n, h, w, c, co, k, act;
    double eps;
    float slope;
    const float *x;                  /* the input (the forward pass reads it; the backward pass too) */
    float *out;                      /* the output */
    const float *weight, *bias;      /* a convolution's weight; a batch norm's weight and bias */
    double *mean, *var;              /* a batch norm's batch mean and variance, as the forward pass leaves them */
    float *coef;                     /* ... and its coefficients */
    unsigned char *idx;              /* a pool's winners */
    const float *g;                  /* the output's gradient */
    float *dx;                       /* the input's gradient; NULL: not wanted (a convolution only) */
    float *dweight, *dbias;          /* the parameters' gradients */
    long ns_forward, ns_backward;    /* written: how long the op's kernel took, in nanoseconds (bench --layers) */
} tm_op;

/* sizeof(tm_op), then each field's offset, in order: what tests/test_kernels.py holds ChainOp to */
void tm_op_layout(long *out) {
    long i = 0;
    out[i++] = sizeof(tm_op);
#define OFF(f) out[i++] = (long)__builtin_offsetof(tm_op, f);
    OFF(kind) OFF(n) OFF(h) OFF(w) OFF(c) OFF(co) OFF(k) OFF(act) OFF(eps) OFF(slope) OFF(x) OFF(out) OFF(weight)
    OFF(bias) OFF(mean) OFF(var) OFF(coef) OFF(idx) OFF(g) OFF(dx) OFF(dweight) OFF(dbias) OFF(ns_forward)
    OFF(ns_backward)
#undef OFF
}

int tm_chain_forward(tm_op *ops, int count, int threads) {
    for (int i = 0; i < count; i++) {
        tm_op *o = &ops[i];
        const long t0 = now_ns();
        int rc = 0;
        switch (o->kind) {
        case OP_CONV:
            rc = tm_conv_forward(o->x, o->n, o->h, o->w, (int)o->c, o->weight, (int)o->co, (int)o->k, o->out, threads);
            break;
        case OP_DWCONV:
            rc = tm_dwconv_forward(o->x, o->n, o->h, o->w, (int)o->c, o->weight, (int)o->co, (int)o->k, o->out,
                                   threads);
            break;
        case OP_BN:
            rc = tm_bn_act_forward(o->x, o->n * o->h * o->w, (int)o->c, o->weight, o->bias, o->eps, (int)o->act,
                                   o->slope, o->out, o->mean, o->var, o->coef, threads);
            break;
        case OP_POOL:
            tm_maxpool2_forward(o->x, o->n, o->h, o->w, (int)o->c, o->out, o->idx, threads);
            break;
        default:
            rc = 15;
        }
        if (rc) return (i + 1) * 16 + rc;
        o->ns_forward = now_ns() - t0;
    }
    return 0;
}

int tm_chain_backward(tm_op *ops, int count, int threads) {
    for (int i = count - 1; i >= 0; i--) {
        tm_op *o = &ops[i];
        const long t0 = now_ns();
        const float *g = i == count - 1 ? o->g : ops[i + 1].dx;
        int rc = 0;
        switch (o->kind) {
        case OP_CONV:
            rc = tm_conv_backward(o->x, o->n, o->h, o->w, (int)o->c, o->weight, (int)o->co, (int)o->k, g, o->dx,
                                  o->dweight, threads);
            break;
        case OP_DWCONV:
            rc = tm_dwconv_backward(o->x, o->n, o->h, o->w, (int)o->c, o->weight, (int)o->co, (int)o->k, g, o->dx,
                                    o->dweight, threads);
            break;
        case OP_BN:
            rc = tm_bn_act_backward(g, o->out, o->x, o->n * o->h * o->w, (int)o->c, o->mean, o->coef, (int)o->act,
                                    o->slope, o->dx, o->dweight, o->dbias, threads);
            break;
        case OP_POOL:
            tm_maxpool2_backward(g, o->idx, o->n, o->h, o->w, (int)o->c, o->dx, threads);
            break;
        default:
            rc = 15;
        }
        if (rc) return (i + 1) * 16 + rc;
        o->ns_backward = now_ns() - t0;
    }
    return 0;
}
