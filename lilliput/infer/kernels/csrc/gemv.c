/*
 * Batch-1..8 matrix-vector product for CPU decode: y[b, n] = sum_k x[b, k] * W[n, k].
 *
 * W is row-major (N, K) like nn.Linear.weight, fp32 or bf16 (stored as uint16).
 * x is (B, K) fp32 or bf16, y is (B, N) fp32 or bf16. Accumulation is always fp32;
 * bf16 x is widened once up front, bf16 y is rounded to nearest even at the store.
 *
 * Decode at batch 1 is memory bound: every weight byte is read once per token, so the
 * kernel streams W row by row (B inside the loop so W is read once for all rows of x)
 * and hands out chunks of rows to a small pthread pool.
 *
 * Plain GNU C, no intrinsics: the vector width comes from GCC vector extensions and the
 * ISA the file is compiled for (-march=native): 16 lanes with AVX-512, 8 with AVX/AVX2,
 * 4 otherwise. The same source therefore serves every CPU; -DGEMV_LANES=16 forces the
 * wide path on any x86 machine (GCC splits it) so it can be tested without AVX-512.
 *
 * Threading: a pool of (threads - 1) workers plus the calling thread, taking chunks of
 * rows from an atomic counter (a worker the OS has not scheduled costs nothing: the caller
 * takes its chunks). Idle workers spin for spin_us after each job (decode calls GEMVs back
 * to back with small torch ops between; past 50 us they yield the core on every check),
 * then sleep on a condition variable. One caller at a time owns the pool; a concurrent
 * caller runs single-threaded instead of waiting. pthread_atfork resets the pool in a
 * forked child. Nothing here uses OpenMP, so it cannot fight torch's bundled libgomp over
 * runtime state; it still competes for cores, hence the policy in infer/kernels/ops.py.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lilliput.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define MAX_B 8
#define MAX_THREADS 64
/* Below 2x this many weight bytes the pool handoff costs more than a second core saves. */
#define MIN_BYTES_PER_THREAD (96 * 1024)
/* Rows per work chunk aim at this many weight bytes. */
#define CHUNK_BYTES (64 * 1024)

#ifndef GEMV_LANES
#if defined(__AVX512F__)
#define GEMV_LANES 16
#elif defined(__AVX__)
#define GEMV_LANES 8
#else
#define GEMV_LANES 4
#endif
#endif

#define INLINE static inline __attribute__((always_inline))
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 4096 /* bytes ahead in a weight row (4% on the Xeon; 0 turns it off) */
#endif

typedef float vf __attribute__((vector_size(GEMV_LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(GEMV_LANES * 4)));

enum { DT_F32 = LL_DT_F32, DT_BF16 = LL_DT_BF16 };

/* ---------------------------------------------------------------- scalar helpers */

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, like torch */
    return (uint16_t)(u >> 16);
}

/* ---------------------------------------------------------------- vector helpers */

INLINE vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < GEMV_LANES; i++) s += v[i];
    return s;
}

/* ---------------------------------------------------------------- the kernel */

/*
 * bf16 weights need no widening shuffles: 2 * GEMV_LANES bf16 loaded as GEMV_LANES uint32
 * hold the even columns in their low halves and the odd columns in their high halves, so
 * `u << 16` and `u & 0xffff0000` are those columns as fp32. x is pre-split to match: each
 * block of 2 * GEMV_LANES columns is stored as its even columns, then its odd columns
 * (split_x), once per call.
 */
INLINE void load_bf16_pair(const uint16_t *p, vf *even, vf *odd) {
    vu u;
    memcpy(&u, p, sizeof u);
    vu lo = u << 16, hi = u & 0xffff0000u;
    memcpy(even, &lo, sizeof lo);
    memcpy(odd, &hi, sizeof hi);
}

/*
 * The inner loop eats one 64-byte cache line of a weight row per step: LINE(WDT) columns
 * (16 fp32 or 32 bf16), i.e. VECS(WDT) fp32 vectors. Each row is one sequential stream,
 * which the hardware prefetchers follow best (measured: 1 row at a time beat 2, 4 or 8
 * interleaved rows; software prefetch did not help on Zen 3, and gives ~4% on a Xeon).
 */
#define LINE(WDT) ((WDT) == DT_F32 ? 16 : 32)
#define VECS(WDT) (LINE(WDT) / GEMV_LANES)
/* Independent accumulators per row of x. fp32: one, for every B, so that a row's result does
 * not depend on how many rows share the call (a sequence's logits are the same alone, in a
 * batch, or verified with drafted tokens; the single FMA chain still outruns memory). bf16: one
 * per vector of a line, at most 12 / B (the FMA latency chain is the limit at B = 1; registers
 * at B = 8), so bf16 results may differ in the last bits between batch sizes. */
#define NACC(WDT, B) \
    ((WDT) == DT_F32 ? 1 : (VECS(WDT) < 12 / (B) ? VECS(WDT) : (12 / (B) > 0 ? 12 / (B) : 1)))

/*
 * Rows [n0, n1) of y for all B rows of x. B and WDT are compile-time constants after
 * inlining, so acc[][] lives in registers and W is read once for all B. x is (B, K) fp32,
 * with each full line of columns split into even/odd halves for bf16 weights (split_x).
 */
INLINE void rows_impl(const float *x, const void *w, void *y, int ydt, int64_t N, int64_t K,
                      int64_t n0, int64_t n1, const int B, const int WDT) {
    const int A = NACC(WDT, B);
    const int64_t kv = K - K % LINE(WDT);
    for (int64_t n = n0; n < n1; n++) {
        const float *wf = (const float *)w + n * K;
        const uint16_t *wh = (const uint16_t *)w + n * K;
        vf acc[MAX_B][16];
#pragma GCC unroll 8
        for (int b = 0; b < B; b++)
#pragma GCC unroll 16
            for (int a = 0; a < A; a++) acc[b][a] = (vf){0};
        for (int64_t k = 0; k < kv; k += LINE(WDT)) {
            vf wv[16];
#if GEMV_PREFETCH
            __builtin_prefetch((const char *)(WDT == DT_F32 ? (const void *)(wf + k) : (const void *)(wh + k)) + GEMV_PREFETCH);
#endif
            if (WDT == DT_F32) {
                for (int v = 0; v < VECS(WDT); v++) wv[v] = load_f32(wf + k + v * GEMV_LANES);
            } else {
                for (int v = 0; v < VECS(WDT); v += 2)
                    load_bf16_pair(wh + k + v * GEMV_LANES, &wv[v], &wv[v + 1]);
            }
#pragma GCC unroll 8
            for (int b = 0; b < B; b++)
                for (int v = 0; v < VECS(WDT); v++)
                    acc[b][v % A] += wv[v] * load_f32(x + b * K + k + v * GEMV_LANES);
        }
        for (int b = 0; b < B; b++) {
            vf t = acc[b][0];
            for (int a = 1; a < A; a++) t += acc[b][a];
            float s = hsum(t);
            for (int64_t k = kv; k < K; k++) /* K tail, fewer than LINE columns, natural order */
                s += (WDT == DT_F32 ? wf[k] : bf16_to_f32(wh[k])) * x[b * K + k];
            if (ydt == DT_F32)
                ((float *)y)[b * N + n] = s;
            else
                ((uint16_t *)y)[b * N + n] = f32_to_bf16(s);
        }
    }
}

/* x (B, K) fp32 or bf16 -> fp32 in the layout rows_impl reads for weights of type wdt:
 * inside each full line, every block of 2 * GEMV_LANES columns becomes its even columns
 * then its odd columns (the halves load_bf16_pair yields). */
static void split_x(const void *x, int xdt, int wdt, float *out, int64_t B, int64_t K) {
    const int64_t blk = 2 * GEMV_LANES, kv = wdt == DT_BF16 ? K - K % LINE(DT_BF16) : 0;
    for (int64_t b = 0; b < B; b++) {
        const float *xf = (const float *)x + b * K;
        const uint16_t *xh = (const uint16_t *)x + b * K;
        float *o = out + b * K;
        for (int64_t k = 0; k < K; k++) {
            int64_t dst = k;
            if (k < kv) {
                int64_t base = k - k % blk, i = k - base;
                dst = base + (i & 1) * GEMV_LANES + i / 2;
            }
            o[dst] = xdt == DT_F32 ? xf[k] : bf16_to_f32(xh[k]);
        }
    }
}


#define ROWS_FN(B, WDT, NAME)                                                                  \
    static void NAME(const float *x, const void *w, void *y, int ydt, int64_t N, int64_t K,    \
                     int64_t n0, int64_t n1) {                                                 \
        rows_impl(x, w, y, ydt, N, K, n0, n1, B, WDT);                                         \
    }
ROWS_FN(1, DT_F32, rows_f32_1)
ROWS_FN(2, DT_F32, rows_f32_2)
ROWS_FN(3, DT_F32, rows_f32_3)
ROWS_FN(4, DT_F32, rows_f32_4)
ROWS_FN(5, DT_F32, rows_f32_5)
ROWS_FN(6, DT_F32, rows_f32_6)
ROWS_FN(7, DT_F32, rows_f32_7)
ROWS_FN(8, DT_F32, rows_f32_8)
ROWS_FN(1, DT_BF16, rows_bf16_1)
ROWS_FN(2, DT_BF16, rows_bf16_2)
ROWS_FN(3, DT_BF16, rows_bf16_3)
ROWS_FN(4, DT_BF16, rows_bf16_4)
ROWS_FN(5, DT_BF16, rows_bf16_5)
ROWS_FN(6, DT_BF16, rows_bf16_6)
ROWS_FN(7, DT_BF16, rows_bf16_7)
ROWS_FN(8, DT_BF16, rows_bf16_8)

static const rows_fn ROWS[2][MAX_B] = {
    {rows_f32_1, rows_f32_2, rows_f32_3, rows_f32_4, rows_f32_5, rows_f32_6, rows_f32_7,
     rows_f32_8},
    {rows_bf16_1, rows_bf16_2, rows_bf16_3, rows_bf16_4, rows_bf16_5, rows_bf16_6, rows_bf16_7,
     rows_bf16_8},
};

/* ---------------------------------------------------------------- thread pool */

/*
 * Work is handed out in chunks of rows from an atomic counter, so a worker that the OS
 * has not scheduled yet costs nothing: the caller takes every chunk itself.
 *
 * `state` = (generation << 32) | CLOSED bit | workers inside the job. The caller opens
 * generation g with no workers inside; a worker enters with a CAS only while g is open,
 * takes chunks until none are left and leaves. The caller, out of chunks, closes g and
 * waits for the workers inside (each finishing at most one chunk) - never for a worker
 * that has not entered, which later sees CLOSED and goes back to waiting.
 */
#define CLOSED (1ull << 31)
#define INSIDE_MASK (CLOSED - 1)

typedef struct {
    rows_fn fn;
    const float *x;
    const void *w;
    void *y;
    int ydt;
    int64_t N, K;
    int64_t chunk; /* rows per chunk */
    int64_t next;  /* next chunk index (atomic) */
    int64_t chunks;
    uint64_t max_inside; /* workers allowed in: threads - 1 (more may exist after set_threads) */
} job_t;

static struct {
    pthread_mutex_t call_lock; /* one caller owns the pool at a time */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    uint64_t state; /* see above (atomic) */
    int sleeping;   /* workers blocked on `wake` (atomic) */
    int started;    /* workers running */
    int threads;    /* wanted threads, caller included; 0 = not set yet */
    long spin_ns;   /* how long an idle worker spins before sleeping */
    job_t job;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
       0, 0, 0, 0, 1000000L, {0}};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

INLINE void cpu_relax(void) {
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

static void take_chunks(job_t *j) {
    for (;;) {
        int64_t c = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (c >= j->chunks) return;
        int64_t n0 = c * j->chunk, n1 = n0 + j->chunk;
        j->fn(j->x, j->w, j->y, j->ydt, j->N, j->K, n0, n1 < j->N ? n1 : j->N);
    }
}

/* Spinning this long is pure pause; past it a spinning thread yields its core each check, so
 * on an oversubscribed machine the thread that has work (often our own caller) runs. */
#define POLITE_AFTER_NS 50000L

static void *worker(void *arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg; /* generation current at creation */
    for (;;) {
        long t0 = now_ns();
        uint64_t s;
        for (int it = 0; (uint32_t)((s = __atomic_load_n(&P.state, __ATOMIC_ACQUIRE)) >> 32) == seen;
             it++) {
            cpu_relax();
            if ((it & 127) != 127) continue;
            long spun = now_ns() - t0;
            if (spun > P.spin_ns) {
                pthread_mutex_lock(&P.sleep_lock);
                __atomic_add_fetch(&P.sleeping, 1, __ATOMIC_SEQ_CST);
                while ((uint32_t)(__atomic_load_n(&P.state, __ATOMIC_SEQ_CST) >> 32) == seen)
                    pthread_cond_wait(&P.wake, &P.sleep_lock);
                __atomic_sub_fetch(&P.sleeping, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&P.sleep_lock);
                t0 = now_ns();
            } else if (spun > POLITE_AFTER_NS) {
                sched_yield();
            }
        }
        seen = (uint32_t)(s >> 32);
        /* Enter generation `seen` if it is still open and has room. */
        while (!(s & CLOSED) && (uint32_t)(s >> 32) == seen &&
               (s & INSIDE_MASK) < P.job.max_inside) {
            if (__atomic_compare_exchange_n(&P.state, &s, s + 1, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_ACQUIRE)) {
                take_chunks(&P.job);
                __atomic_sub_fetch(&P.state, 1, __ATOMIC_RELEASE);
                break;
            }
        }
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* The child has only the forking thread: forget the workers, rebuild the locks. */
    pthread_mutex_init(&P.call_lock, NULL);
    pthread_mutex_init(&P.sleep_lock, NULL);
    pthread_cond_init(&P.wake, NULL);
    P.state &= ~(uint64_t)0xffffffffu;
    P.started = 0;
    P.sleeping = 0;
}

static void install_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

static int default_threads(void) {
    cpu_set_t set;
    int n = 1;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
    if (n < 1) n = 1;
    return n > MAX_THREADS ? MAX_THREADS : n;
}

/* Starts workers up to `want - 1`; call with call_lock held. Returns workers running. */
static int ensure_workers(int want) {
    pthread_once(&atfork_once, install_atfork);
    while (P.started < want - 1) {
        pthread_t tid;
        uint32_t gen = (uint32_t)(__atomic_load_n(&P.state, __ATOMIC_ACQUIRE) >> 32);
        if (pthread_create(&tid, NULL, worker, (void *)(uintptr_t)gen) != 0) break;
        pthread_detach(tid);
        P.started++;
    }
    return P.started;
}

/* ---------------------------------------------------------------- public API */

int gemv_lanes(void) { return GEMV_LANES; }

void gemv_set_threads(int n) {
    if (n < 1) n = default_threads();
    P.threads = n > MAX_THREADS ? MAX_THREADS : n;
}

int gemv_get_threads(void) {
    if (P.threads == 0) P.threads = default_threads();
    return P.threads;
}

void gemv_set_spin_us(long us) { P.spin_ns = (us < 0 ? 0 : us) * 1000L; }

/* Rows [0, N) by `fn` on the pool in chunks of `chunk` rows (the caller's thread alone when the
 * pool is busy: one caller owns it at a time). */
static void pool_run(rows_fn fn, const float *xf, const void *w, void *y, int ydt, int64_t N, int64_t K,
                     int64_t chunk, int threads) {
    if (threads < 2 || chunk >= N || pthread_mutex_trylock(&P.call_lock) != 0) {
        fn(xf, w, y, ydt, N, K, 0, N);
        return;
    }
    ensure_workers(threads);
    job_t *j = &P.job;
    *j = (job_t){fn, xf, w, y, ydt, N, K, chunk, 0, (N + chunk - 1) / chunk, (uint64_t)(threads - 1)};
    uint64_t gen = (__atomic_load_n(&P.state, __ATOMIC_RELAXED) >> 32) + 1;
    __atomic_store_n(&P.state, (gen & 0xffffffffu) << 32, __ATOMIC_SEQ_CST); /* open */
    if (__atomic_load_n(&P.sleeping, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&P.sleep_lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.sleep_lock);
    }
    take_chunks(j);
    __atomic_fetch_or(&P.state, CLOSED, __ATOMIC_ACQ_REL);
    /* A worker inside finishes its last chunk; if the OS took its core, let it back. */
    for (int it = 1; __atomic_load_n(&P.state, __ATOMIC_ACQUIRE) & INSIDE_MASK; it++)
        if (it % 1024 == 0) sched_yield(); else cpu_relax();
    pthread_mutex_unlock(&P.call_lock);
}

/*
 * Rows [0, N) of y by `fn` on the pool (or on the caller's thread for small W or a busy pool).
 * Also the entry for the other kernels compiled into this library (qgemv*.c), which pass
 * their own row function and context through `x` and `w`; row_bytes = weight bytes per row.
 */
int gemv_pool_run(rows_fn fn, const float *xf, const void *w, void *y, int ydt, int64_t N,
                  int64_t K, int64_t row_bytes) {
    int threads = gemv_get_threads();
    if (threads < 2 || N * row_bytes < 2 * MIN_BYTES_PER_THREAD) threads = 1;
    /* ~CHUNK_BYTES of W per chunk, at least 16 rows, and at least 4 chunks per thread */
    int64_t rows = CHUNK_BYTES / (row_bytes > 0 ? row_bytes : 1);
    int64_t fair = N / (4 * (int64_t)threads);
    if (rows > fair) rows = fair;
    pool_run(fn, xf, w, y, ydt, N, K, rows < 16 ? 16 : (rows + 15) & ~(int64_t)15, threads);
    return 0;
}

/* Items [0, N) of `fn` (which gets `ctx` as its w, and y and K as given) on the pool, `chunk` items at a time: work
 * split finer than rows of a matrix (attention's (token, head) items). */
int gemv_pool_items(rows_fn fn, const void *ctx, void *y, int64_t N, int64_t K, int64_t chunk) {
    pool_run(fn, NULL, ctx, y, 0, N, K, chunk < 1 ? 1 : chunk, gemv_get_threads());
    return 0;
}

/*
 * y (B, N) = x (B, K) @ W (N, K)^T with dtype codes 0 = fp32, 1 = bf16. Returns 0, or -1
 * for arguments it does not handle (the Python side checks them first).
 */
int gemv(const void *x, int xdt, const void *w, int wdt, void *y, int ydt, int64_t B,
         int64_t N, int64_t K) {
    if (B < 1 || B > MAX_B || N < 0 || K < 0 || (unsigned)xdt > 1 || (unsigned)wdt > 1 ||
        (unsigned)ydt > 1)
        return -1;
    if (N == 0) return 0;

    const float *xf = (const float *)x;
    float *xbuf = NULL;
    if (xdt == DT_BF16 || wdt == DT_BF16) { /* widen / split once; every row of W reuses it */
        xbuf = (float *)malloc((size_t)(B * K > 0 ? B * K : 1) * sizeof(float));
        if (!xbuf) return -1;
        split_x(x, xdt, wdt, xbuf, B, K);
        xf = xbuf;
    }

    rows_fn fn = ROWS[wdt][B - 1];
    gemv_pool_run(fn, xf, w, y, ydt, N, K, K * (wdt == DT_F32 ? 4 : 2));
    free(xbuf);
    return 0;
}

/*
 * The same call with its arguments in one struct, so Python converts one argument instead of
 * nine (ctypes charges ~0.2 us per argument).
 */
int gemv_packed(const gemv_args_t *a) {
    const int64_t code = a->code;
    return gemv(a->x, (int)(code & 15), a->w, (int)((code >> 4) & 15), a->y, (int)((code >> 8) & 15), code >> 16,
                a->n, a->k);
}

/* ---------------------------------------------------------------- decode helpers */

#include <math.h>

/*
 * One query position per sequence against its KV cache, grouped-query attention:
 * q (B, nh, hs), k/v caches (B, nkv, L, hs) of which the first S positions are valid,
 * out (B, nh, hs). Query head h reads kv head h / (nh / nkv), as Hugging Face's repeat_kv.
 */
INLINE float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float d = 0.0f;
    if (n % GEMV_LANES == 0) {
        vf acc = {0};
        for (; i < n; i += GEMV_LANES) acc += load_f32(a + i) * load_f32(b + i);
        d = hsum(acc);
    }
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

/*
 * out[r] = index of the largest value of row r of x (rows, n) fp32, the first on ties (as
 * torch.argmax, which takes ~250 us for 8 rows of a 49k vocabulary on 2 cores; this ~30 us):
 * the maximum in one vectorizable pass, then the first position holding it.
 */
int argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float m = xr[0];
        int64_t i = 0;
        if (n >= 2 * GEMV_LANES) { /* lane-wise maxima, two accumulators */
            vf m0, m1;
            memcpy(&m0, xr, sizeof m0), m1 = m0;
            for (; i + 2 * GEMV_LANES <= n; i += 2 * GEMV_LANES) {
                vf a, b;
                memcpy(&a, xr + i, sizeof a), memcpy(&b, xr + i + GEMV_LANES, sizeof b);
                const vu ga = (vu)(a > m0), gb = (vu)(b > m1);
                m0 = (vf)(((vu)a & ga) | ((vu)m0 & ~ga)), m1 = (vf)(((vu)b & gb) | ((vu)m1 & ~gb));
            }
            for (int k = 0; k < GEMV_LANES; k++) m = m0[k] > m ? m0[k] : m, m = m1[k] > m ? m1[k] : m;
        }
        for (; i < n; i++) m = xr[i] > m ? xr[i] : m;
        i = 0;
#if defined(__AVX__)
        const __m256 mv = _mm256_set1_ps(m); /* the first block of 8 holding m, then its lane */
        while (i + 8 <= n && !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xr + i), mv, _CMP_EQ_OQ))) i += 8;
#endif
        while (i < n - 1 && xr[i] != m) i++;
        out[r] = i;
    }
    return 0;
}

/*
 * RMSNorm of `rows` fp32 vectors of width dim: out = x * rsqrt(mean(x^2) + eps) * w.
 * torch spends ~20 us per call on this at one thread (a reduction plus four kernels).
 */
int rmsnorm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, double eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float ss = dot_f32(xr, xr, dim);
        float inv = 1.0f / sqrtf(ss / (float)dim + (float)eps);
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
    return 0;
}
