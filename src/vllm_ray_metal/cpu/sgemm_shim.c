/* cblas_sgemm for MLX's Linux CPU backend: OpenBLAS behind it, few-row products in our own
 * kernel.
 *
 * MLX's Linux wheel resolves cblas_sgemm (its only float32 BLAS call) from the global
 * symbol scope; cpu/blas.py loads this library there before mlx.core. OpenBLAS (the
 * scipy-openblas32 wheel) exports its functions only under a "scipy_" prefix, so this
 * file gives them the plain name MLX looks for.
 *
 * Why a kernel of our own: a decode step multiplies a few rows (one per running sequence)
 * by every weight matrix, and nn.Linear hands the weight over as B transposed (n x k,
 * row-major). OpenBLAS's sgemm copies ("packs") every weight panel before multiplying,
 * which for a few rows costs as much as the product, and runs a one-row product on one
 * core's bandwidth. Here each output element is a dot product of two contiguous rows, so
 * the weights stream through once, untouched: a block of 4 weight rows stays in L1 while
 * every row of A passes over it, the next block is prefetched meanwhile, and the threads
 * split the weight rows. From 64 rows on, OpenBLAS's packing pays off and it does the
 * product (benchmarks/bench_blas.py measures both; BENCHMARKS.md row B1).
 *
 * Two builds of the block kernel, chosen once by CPU: AVX-512VL (32 vector registers:
 * 4 x 4 accumulators) and AVX2+FMA (16 registers: 2 x 4). Every other product goes to
 * OpenBLAS: more rows, other layouts (A transposed, B not transposed, column-major), or a
 * CPU without AVX2; one-row ones among them to its sgemv, which (unlike its sgemm) splits
 * them over its threads.
 *
 * cpu/blas.py binds the OpenBLAS entry points with vrm_bind().
 */
#include <pthread.h>
#include <sched.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 }; /* CBLAS enum values */
enum { KERNEL_NONE = 0, KERNEL_AVX2 = 1, KERNEL_AVX512 = 2 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef int (*threads_fn)(void);

static sgemm_fn gemm;
static sgemv_fn gemv;
static threads_fn blas_threads; /* our kernel uses as many threads as OpenBLAS is set to */
static int kernel;              /* KERNEL_* in use */
static long kernel_products;    /* how many products took our kernel (for tests) */

#if defined(__x86_64__) || defined(__i386__)
#define X86 1
#define TARGET(isa) __attribute__((target(isa)))
#else /* the kernels are x86 builds: elsewhere OpenBLAS does every product */
#define X86 0
#define TARGET(isa)
#endif

typedef float vec __attribute__((vector_size(32)));                 /* 8 floats */
typedef float vec_u __attribute__((vector_size(32), aligned(4)));   /* unaligned access */
typedef float vec4 __attribute__((vector_size(16)));

enum { LANES = 8, NR = 4, MR_MAX = 4 };
enum { MIN_PARALLEL_WORK = 1 << 15 }; /* n * k below this: one thread (attention's tiny
                                         per-head products) */

/* out[0..3] = the lane sums of p, q, r, s */
static inline __attribute__((always_inline)) void sum4(vec p, vec q, vec r, vec s, float *out) {
    vec a = __builtin_shufflevector(p, q, 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(p, q, 4, 5, 6, 7, 12, 13, 14, 15); /* p | q, 4 each */
    vec b = __builtin_shufflevector(r, s, 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(r, s, 4, 5, 6, 7, 12, 13, 14, 15);
    vec c = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
            __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15); /* 2 each */
    vec d = c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
    vec4 e = __builtin_shufflevector(d, d, 0, 2, 4, 6);
    __builtin_memcpy(out, &e, sizeof e);
}

/* out[i * NR + j] = dot(a row i, b row j) for i < mr, j < nr, over k. `next` (or NULL) is
 * the following block of b, prefetched while this one is multiplied. */
static inline __attribute__((always_inline)) void block(int mr, int nr, int k, const float *a,
                                                        int lda, const float *b, int ldb,
                                                        const float *next, float *out) {
    vec acc[MR_MAX][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = (vec){0};
    int kk = 0;
    for (; kk + LANES <= k; kk += LANES) {
        vec bv[NR], av[MR_MAX];
        for (int j = 0; j < nr; j++) bv[j] = *(const vec_u *)(b + (ptrdiff_t)j * ldb + kk);
        for (int i = 0; i < mr; i++) av[i] = *(const vec_u *)(a + (ptrdiff_t)i * lda + kk);
        if (next != NULL)
            for (int j = 0; j < NR; j++) __builtin_prefetch(next + (ptrdiff_t)j * ldb + kk, 0, 3);
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) acc[i][j] += av[i] * bv[j];
    }
    if (nr == NR && kk == k) {
        for (int i = 0; i < mr; i++) sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], out + i * NR);
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float s = 0.f;
            for (int l = 0; l < LANES; l++) s += acc[i][j][l];
            for (int t = kk; t < k; t++) s += a[(ptrdiff_t)i * lda + t] * b[(ptrdiff_t)j * ldb + t];
            out[i * NR + j] = s;
        }
}

/* Full blocks get their own unrolled copy; ragged edges (nr < 4) share a generic one. */
#define BLOCK_ARGS k, a, lda, b, ldb, next, out
#define BLOCK_PARAMS int mr, int nr, int k, const float *a, int lda, const float *b, int ldb, \
                     const float *next, float *out

static void __attribute__((noinline)) TARGET("avx2,fma,avx512f,avx512vl") block_avx512(
    BLOCK_PARAMS) {
    if (nr == NR && mr == 4) block(4, NR, BLOCK_ARGS);
    else if (nr == NR && mr == 3) block(3, NR, BLOCK_ARGS);
    else if (nr == NR && mr == 2) block(2, NR, BLOCK_ARGS);
    else if (nr == NR && mr == 1) block(1, NR, BLOCK_ARGS);
    else block(mr, nr, BLOCK_ARGS);
}

static void __attribute__((noinline)) TARGET("avx2,fma") block_avx2(BLOCK_PARAMS) {
    if (nr == NR && mr == 2) block(2, NR, BLOCK_ARGS);
    else if (nr == NR && mr == 1) block(1, NR, BLOCK_ARGS);
    else block(mr, nr, BLOCK_ARGS);
}

/* What each kernel is: its block function, rows of A per block, and the row limit above
 * which OpenBLAS's packing pays off (bench_blas.py). Indexed by KERNEL_*. */
static const struct {
    void (*block)(BLOCK_PARAMS);
    int block_rows, max_rows;
} KERNELS[] = {{NULL, 0, 0}, {block_avx2, 2, 16}, {block_avx512, 4, 32}};

/* C = alpha * A B^T + beta * C for B rows [n0, n1); A m x k, B n x k, all row-major. */
struct product {
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
};

static void skinny_abt(const struct product *p, int n0, int n1) {
    const int mr_max = KERNELS[kernel].block_rows;
    for (int j0 = n0; j0 < n1; j0 += NR) {
        const int nr = n1 - j0 < NR ? n1 - j0 : NR;
        const float *bj = p->b + (ptrdiff_t)j0 * p->ldb;
        const float *next = j0 + 2 * NR <= n1 ? bj + (ptrdiff_t)NR * p->ldb : NULL;
        float out[MR_MAX * NR];
        for (int i0 = 0; i0 < p->m; i0 += mr_max) {
            const int mr = p->m - i0 < mr_max ? p->m - i0 : mr_max;
            const float *ai = p->a + (ptrdiff_t)i0 * p->lda;
            KERNELS[kernel].block(mr, nr, p->k, ai, p->lda, bj, p->ldb, next, out);
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) {
                    float *y = p->c + (ptrdiff_t)(i0 + i) * p->ldc + j0 + j;
                    *y = p->alpha * out[i * NR + j] + (p->beta == 0.f ? 0.f : p->beta * *y);
                }
        }
    }
}

/* Helper threads. A product is cut into chunks of B rows that the caller and the helpers
 * claim one at a time, so a helper the OS has not scheduled yet costs nothing: the caller
 * takes its chunks (a fixed split would make it wait for them). Between products a helper
 * polls a while, yielding its core to anyone who needs it (a decode step's products come
 * back to back), then sleeps. Our own small
 * pool rather than OpenMP: GNU libgomp's pool does not survive fork(), and vLLM forks. */
enum { MAX_THREADS = 64, SPIN_ROUNDS = 1 << 10, /* polls before sleeping: ~0.5 ms */
       CHUNKS_PER_THREAD = 8 };
#define CLOSED 0xffffffffu /* ticket index while the next job is being written */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;         /* helpers running */
    int busy;            /* a product is using the pool (a second caller runs alone) */
    long generation;     /* bumped for every job: what sleeping helpers wait for */
    int sleepers;        /* helpers asleep on `wake` */
    int helpers_wanted;  /* helpers with a number above this leave the job alone */
    /* the job: claims go through `ticket` = (job number << 32) | next chunk, so a claim
       succeeds only while the job it read `chunks` for is still the current one */
    unsigned long long ticket;
    int chunks, chunk_rows, finished;
    struct product job;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void work_on_job(void) {
    unsigned long long t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
    for (;;) {
        const unsigned chunk = (unsigned)t;
        if (chunk == CLOSED || chunk >= (unsigned)__atomic_load_n(&pool.chunks, __ATOMIC_SEQ_CST))
            return;
        if (!__atomic_compare_exchange_n(&pool.ticket, &t, t + 1, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST))
            continue; /* t now holds the current ticket */
        const int n0 = (int)chunk * pool.chunk_rows;
        const int n1 = n0 + pool.chunk_rows < pool.job.n ? n0 + pool.chunk_rows : pool.job.n;
        skinny_abt(&pool.job, n0, n1);
        __atomic_add_fetch(&pool.finished, 1, __ATOMIC_SEQ_CST);
        t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
    }
}

static void *helper(void *arg) {
    const int number = (int)(ptrdiff_t)arg; /* 1, 2, ... */
    long seen = 0;
    for (;;) {
        long now = __atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST);
        for (int spin = 0; now == seen && spin < SPIN_ROUNDS; spin++) {
            sched_yield();
            now = __atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST);
        }
        if (now == seen) {
            pthread_mutex_lock(&pool.lock);
            __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((now = __atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = now;
        if (number <= __atomic_load_n(&pool.helpers_wanted, __ATOMIC_SEQ_CST)) work_on_job();
    }
    return NULL;
}

static void forget_helpers(void) { /* in a forked child: no helpers, nothing held */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = pool.sleepers = pool.busy = 0;
}

static int start_helpers(int wanted) {
    static int registered;
    if (!registered) registered = pthread_atfork(NULL, NULL, forget_helpers) == 0;
    while (pool.started < wanted) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&id, &attr, helper, (void *)(ptrdiff_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    return pool.started;
}

/* Publish the job, wake the helpers, claim chunks alongside them, wait for the last. */
static void run_parallel(const struct product *p, int threads) {
    const unsigned long long next_job = (pool.ticket >> 32) + 1;
    __atomic_store_n(&pool.ticket, next_job << 32 | CLOSED, __ATOMIC_SEQ_CST);
    const int blocks = (p->n + NR - 1) / NR;
    int per_chunk = blocks / (threads * CHUNKS_PER_THREAD);
    per_chunk = per_chunk < 1 ? 1 : per_chunk;
    pool.job = *p;
    pool.chunk_rows = per_chunk * NR;
    pool.finished = 0;
    __atomic_store_n(&pool.chunks, (blocks + per_chunk - 1) / per_chunk, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.helpers_wanted, threads - 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.ticket, next_job << 32, __ATOMIC_SEQ_CST); /* open */
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    work_on_job();
    while (__atomic_load_n(&pool.finished, __ATOMIC_SEQ_CST) < pool.chunks) sched_yield();
}

static void run_product(const struct product *p) {
    int threads = blas_threads != NULL ? blas_threads() : 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((long)p->n * p->k < MIN_PARALLEL_WORK || p->n < 2 * NR) threads = 1;
    if (threads > 1 && !__atomic_exchange_n(&pool.busy, 1, __ATOMIC_ACQUIRE)) {
        threads = 1 + start_helpers(threads - 1);
        if (threads > 1) run_parallel(p, threads);
        __atomic_store_n(&pool.busy, 0, __ATOMIC_RELEASE);
        if (threads > 1) return;
    }
    skinny_abt(p, 0, p->n);
}

long vrm_kernel_products(void) { return kernel_products; }

int vrm_kernel(void) { return kernel; }

/* Choose the kernel: the best this CPU runs, capped at `limit` (KERNEL_*); returns it. */
int vrm_use_kernel(int limit) {
    int best = KERNEL_NONE;
#if X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = KERNEL_AVX2;
    if (best && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        best = KERNEL_AVX512;
#endif
    kernel = best < limit ? best : limit;
    return kernel;
}

void vrm_bind(void *sgemm, void *sgemv, void *get_threads) {
    gemm = (sgemm_fn)sgemm;
    gemv = (sgemv_fn)sgemv;
    blas_threads = (threads_fn)get_threads;
    vrm_use_kernel(KERNEL_AVX512);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (order == ROW_MAJOR && m == 1 && trans_a == TRANS && lda == 1) {
        trans_a = NO_TRANS; /* one row stored as a column: the same contiguous k floats (MLX */
        lda = k;            /* passes a stacked [1, k] row this way) */
    }
    if (order == ROW_MAJOR && n > 0 && k > 0) {
        if (trans_a == NO_TRANS && trans_b == TRANS && m > 0 &&
            m <= KERNELS[kernel].max_rows) {
            __atomic_fetch_add(&kernel_products, 1, __ATOMIC_RELAXED);
            const struct product p = {m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
            run_product(&p);
            return;
        }
        if (m == 1) { /* one row: OpenBLAS's sgemv, which (unlike its sgemm) uses its threads */
            const int incx = trans_a == NO_TRANS ? 1 : lda;
            if (trans_b == NO_TRANS) /* B is k x n: c = B^T a */
                gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
            else /* B is n x k: c = B a */
                gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
            return;
        }
    }
    gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
