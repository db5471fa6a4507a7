/* probmask.kernels._cpu: optional compiled CPU kernels.
 *
 * Three hot loops of a ProbMask training step on the CPU, each one pass over memory:
 *
 *   relaxed_forward   noise, logits and mask of the relaxed sample, times the weight;
 *   relaxed_backward  the gradients of weight * mask with respect to the weight and the score,
 *                     recomputing the noise and the logits instead of keeping them;
 *   clamp_sums        sum(clamp(s - c, 0, 1)), #{s > c} and sum(s): one evaluation of the
 *                     projection's threshold search.
 *
 * The noise is counter-based (Philox-4x32-10, Salmon et al., SC 2011): the uniform of flat score
 * index i is a pure function of (seed, i), so the backward pass regenerates it, the result does
 * not depend on the number of threads, and a seed drawn from PyTorch's generator keeps
 * torch.manual_seed reproducible. The uniform is (x >> 8) * 2^-24 for a 32-bit output word x:
 * [0, 1) on the grid of torch.rand.
 *
 * Plain C against the CPython API only (no PyTorch headers). The arrays arrive as objects with
 * the buffer protocol (the Python side, probmask.kernels.cpu, passes tensor.numpy(): zero-copy
 * views of CPU tensors), and every entry point checks them before touching memory: float32
 * (format 'f', item size 4), C-contiguous, aligned, writable where written, of consistent
 * lengths, as well as the ranges of its scalar arguments. A wrong call raises TypeError or
 * ValueError. The buffers are held (and so kept alive) during the call, and the GIL is released
 * while computing.
 *
 * Every element goes through the same vectorised code: the transcendental functions run over
 * whole tiles of TILE elements held in local arrays (a short last tile is padded), so the forward
 * and the backward pass compute bit-identical logits for the same element. No -ffast-math: the
 * order of every floating-point operation is as written (see the libmvec declarations below).
 *
 * Portability: C11 and the CPython API; POSIX threads where available (elsewhere, or built with
 * -DPROBMASK_NO_THREADS, every call runs in the calling thread, with the same results). The
 * compiler-specific parts below are each guarded: other compilers and targets (clang, aarch64)
 * build the same maths without them, with their own logf and expf and their own order of the
 * block sums, so that builds by different compilers agree to float32 rounding, not bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it sets the feature-test macros (_POSIX_C_SOURCE, ...) */

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(PROBMASK_NO_THREADS) && !defined(_WIN32)
#define USE_POOL 1
#include <pthread.h>
#else
#define USE_POOL 0
#endif

#define TILE 1024
#define BLOCKS (TILE / 4 + 1) /* Philox blocks that cover any TILE consecutive indices */
#define EPS 1e-20f            /* as probmask.numerics.EPS */
#define MAX_PARTS 64
#define GRAIN (1 << 17) /* at least this many elements per thread */

/* GCC proper (clang and the Intel compilers also define __GNUC__ but lack some of its
 * attributes): major * 100 + minor, else 0. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER) && !defined(__INTEL_LLVM_COMPILER)
#define GCC_VERSION (__GNUC__ * 100 + __GNUC_MINOR__)
#else
#define GCC_VERSION 0
#endif

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 22))
#define GLIBC_2_22 1
#else
#define GLIBC_2_22 0
#endif

/* Versions of the hot functions for AVX-512, AVX2 and plain x86-64, one chosen at load time:
 * GCC 11 or later (which knows the x86-64-v3/v4 levels) and glibc (whose ifunc resolution the
 * clones rely on; musl has none) on x86-64 Linux. */
#if GCC_VERSION >= 1100 && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* glibc's vector maths library (libmvec, glibc 2.22 and later) has SIMD versions of logf and
 * expf on x86-64; saying so lets GCC vectorise the loops that call them without -ffast-math
 * (whose licence to reassociate would, for example, turn (1 - s) + e into (1 + e) - s = 0 at
 * s = 1). Elsewhere the loops call the scalar functions, with the same maths. */
#if GCC_VERSION >= 600 && defined(__x86_64__) && GLIBC_2_22 && !defined(__FAST_MATH__)
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) float expf(float);
#endif

/* The block sums of clamp_sums may be reassociated (into vector lanes): per function with GCC's
 * optimize attribute, with a pragma at the top of the function body with clang; other compilers
 * add them in order (not vectorised). */
#if GCC_VERSION >= 408
#define SUMS_REASSOCIATE_ATTRIBUTE \
    __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math", "finite-math-only")))
#else
#define SUMS_REASSOCIATE_ATTRIBUTE
#endif
#if defined(__clang__)
#define SUMS_REASSOCIATE_PRAGMA _Pragma("clang fp reassociate(on)")
#else
#define SUMS_REASSOCIATE_PRAGMA
#endif

/* ------------------------------------------------------------------------------ the noise */

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* Philox-4x32-10 of the counters (block, 0, 0) for BLOCKS consecutive blocks, structure of
 * arrays so that the rounds vectorise. out[4 * j + w] is word w of block first + j. */
VECTOR_CLONES
static void philox_blocks(uint64_t first, uint32_t k0, uint32_t k1, uint32_t *out)
{
    uint32_t x0[BLOCKS], x1[BLOCKS], x2[BLOCKS], x3[BLOCKS];
    for (int j = 0; j < BLOCKS; j++) {
        uint64_t b = first + (uint64_t)j;
        x0[j] = (uint32_t)b;
        x1[j] = (uint32_t)(b >> 32);
        x2[j] = 0;
        x3[j] = 0;
    }
    for (int r = 0; r < 10; r++) {
        uint32_t ka = k0 + (uint32_t)r * PHILOX_W0, kb = k1 + (uint32_t)r * PHILOX_W1;
        for (int j = 0; j < BLOCKS; j++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x0[j];
            uint64_t p1 = (uint64_t)PHILOX_M1 * x2[j];
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[j] ^ ka;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3[j] ^ kb;
            x1[j] = (uint32_t)p1;
            x3[j] = (uint32_t)p0;
            x0[j] = y0;
            x2[j] = y2;
        }
    }
    for (int j = 0; j < BLOCKS; j++) {
        out[4 * j] = x0[j];
        out[4 * j + 1] = x1[j];
        out[4 * j + 2] = x2[j];
        out[4 * j + 3] = x3[j];
    }
}

/* The same function for one counter, written plainly: the reference the tests hold the
 * vectorised form and Random123's published answers against. */
static void philox_one(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c[0];
        uint64_t p1 = (uint64_t)PHILOX_M1 * c[2];
        uint32_t y[4] = {(uint32_t)(p1 >> 32) ^ c[1] ^ k0, (uint32_t)p1, (uint32_t)(p0 >> 32) ^ c[3] ^ k1, (uint32_t)p0};
        memcpy(c, y, sizeof(y));
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
}

/* The uniforms of flat indices [start, start + TILE) into u[0 .. TILE). */
VECTOR_CLONES
static void uniform_tile(uint64_t start, uint32_t k0, uint32_t k1, float *u)
{
    uint32_t words[4 * BLOCKS];
    philox_blocks(start >> 2, k0, k1, words);
    const uint32_t *w = words + (start & 3);
    for (int t = 0; t < TILE; t++)
        u[t] = (float)(w[t] >> 8) * 0x1p-24f;
}

/* ------------------------------------------------------------------------------ the relaxation */

typedef struct {
    uint32_t k0, k1;  /* the key: the seed */
    float temperature;
    float cap;        /* |z| <= cap */
    float mask_min;   /* mask values below this are 0 */
    float dmask_min;  /* a * (1 - a) below this is 0 */
} relax_params;

/* z = clamp(T * log(odds(u) * (s + e) / (1 - s + e)), -cap, cap) for one tile, with
 * odds(u) = max(u, e) / (1 - u): the maths of probmask.masks._relaxed_logits. */
VECTOR_CLONES
static void logits_tile(const float *u, const float *s, const relax_params *p, float *z)
{
    const float T = p->temperature, cap = p->cap;
    for (int t = 0; t < TILE; t++) {
        float ui = u[t] > EPS ? u[t] : EPS;
        float num = ui * (s[t] + EPS);
        float den = (1.0f - ui) * ((1.0f - s[t]) + EPS);
        float zt = T * logf(num / den);
        zt = zt > cap ? cap : zt;
        z[t] = zt < -cap ? -cap : zt;
    }
}

/* a = sigmoid(-|z|) and m = sigmoid(z) (flushed to 0 below mask_min), one exp per element. */
VECTOR_CLONES
static void sigmoids_tile(const float *z, float mask_min, float *a, float *m)
{
    for (int t = 0; t < TILE; t++) {
        float e = expf(-fabsf(z[t]));
        float r = 1.0f / (1.0f + e);
        float at = e * r;
        float mt = z[t] >= 0.0f ? r : at;
        a[t] = at;
        m[t] = mt < mask_min ? 0.0f : mt;
    }
}

/* The logits of one tile of len <= TILE elements starting at flat index start. */
static void tile_logits(uint64_t start, Py_ssize_t len, const float *s, const relax_params *p, float *z)
{
    float u[TILE], sb[TILE];
    uniform_tile(start, p->k0, p->k1, u);
    memcpy(sb, s, (size_t)len * sizeof(float));
    for (Py_ssize_t t = len; t < TILE; t++)
        sb[t] = 0.5f;
    logits_tile(u, sb, p, z);
}

typedef struct {
    const float *s, *w, *g;
    float *out, *grad_w, *grad_s;
    uint64_t offset; /* flat index of s[0] */
    relax_params p;
} relax_job;

/* Forward (job->out set): out = w * m. */
static void forward_tile(const relax_job *job, Py_ssize_t i, Py_ssize_t len, const float *m)
{
    const float *w = job->w + i;
    float *out = job->out + i;
    for (Py_ssize_t t = 0; t < len; t++)
        out[t] = w[t] * m[t];
}

/* Backward (job->out unset): the gradients asked for (a null pointer skips one). */
VECTOR_CLONES
static void backward_tile(const relax_job *job, Py_ssize_t i, Py_ssize_t len, const float *a, const float *m)
{
    const float *s = job->s + i, *w = job->w + i, *g = job->g + i;
    const float T = job->p.temperature, dmin = job->p.dmask_min;
    if (job->grad_w) {
        float *gw = job->grad_w + i;
        for (Py_ssize_t t = 0; t < len; t++)
            gw[t] = m[t] * g[t];
    }
    if (job->grad_s) {
        float *gs = job->grad_s + i;
        for (Py_ssize_t t = 0; t < len; t++) {
            float d = a[t] - a[t] * a[t]; /* dm/dz / T = a (1 - a) */
            d = d < dmin ? 0.0f : d;
            float dlogit = 1.0f / ((1.0f - s[t]) * s[t] + EPS); /* d logit(s) / ds */
            gs[t] = d * dlogit * T * g[t] * w[t];
        }
    }
}

/* Both passes tile by tile: the same logits and mask for an element in either pass. */
static void relax_range(void *arg, Py_ssize_t lo, Py_ssize_t hi, int part)
{
    const relax_job *job = arg;
    float z[TILE], a[TILE], m[TILE];
    (void)part;
    for (Py_ssize_t i = lo; i < hi; i += TILE) {
        Py_ssize_t len = hi - i < TILE ? hi - i : TILE;
        tile_logits(job->offset + (uint64_t)i, len, job->s + i, &job->p, z);
        sigmoids_tile(z, job->p.mask_min, a, m);
        if (job->out)
            forward_tile(job, i, len, m);
        else
            backward_tile(job, i, len, a, m);
    }
}

/* ------------------------------------------------------------------------------ the projection */

typedef struct {
    const float *s;
    float c;
    double f[MAX_PARTS], count[MAX_PARTS], raw[MAX_PARTS];
} sums_job;

/* Sums over one tile: float partial sums over blocks of SUM_BLOCK elements, added up in double.
 * The projection's search relies on sums about as accurate as PyTorch's float32 sum: a float
 * running sum over a whole tile was off by several float32 ulps, which made f(c) jitter at the
 * float32 scale of c; summing every element in double cost twice the time. The block sums may be
 * reassociated (into vector lanes), and NaN need not survive the clamp: the raw sum shows it. */
#define SUM_BLOCK 128
VECTOR_CLONES
SUMS_REASSOCIATE_ATTRIBUTE
static void sums_block(const float *s, Py_ssize_t len, float c, float out[3])
{
    SUMS_REASSOCIATE_PRAGMA
    float fs = 0.0f, ns = 0.0f, rs = 0.0f;
    for (Py_ssize_t t = 0; t < len; t++) {
        float x = s[t] - c; /* rounded to float32, as PyTorch computes it */
        x = x < 0.0f ? 0.0f : x;
        x = x > 1.0f ? 1.0f : x;
        fs += x;
        ns += x > 0.0f ? 1.0f : 0.0f;
        rs += s[t];
    }
    out[0] = fs;
    out[1] = ns;
    out[2] = rs;
}

static void sums_tile(const float *s, Py_ssize_t len, float c, double *f, double *count, double *raw)
{
    float part[3];
    for (Py_ssize_t i = 0; i < len; i += SUM_BLOCK) {
        sums_block(s + i, len - i < SUM_BLOCK ? len - i : SUM_BLOCK, c, part);
        *f += part[0];
        *count += part[1];
        *raw += part[2];
    }
}

static void sums_range(void *arg, Py_ssize_t lo, Py_ssize_t hi, int part)
{
    sums_job *job = arg;
    double f = 0.0, count = 0.0, raw = 0.0;
    for (Py_ssize_t i = lo; i < hi; i += TILE) {
        Py_ssize_t len = hi - i < TILE ? hi - i : TILE;
        sums_tile(job->s + i, len, job->c, &f, &count, &raw);
    }
    job->f[part] = f;
    job->count[part] = count;
    job->raw[part] = raw;
}

/* ------------------------------------------------------------------------------ threads */

typedef void (*range_fn)(void *arg, Py_ssize_t lo, Py_ssize_t hi, int part);

typedef struct {
    range_fn fn;
    void *arg;
    Py_ssize_t lo, hi;
    int part;
} range_task;

static void run_task(const range_task *task) { task->fn(task->arg, task->lo, task->hi, task->part); }

#if USE_POOL
/* A persistent pool of worker threads, started on first use, as many as calls have asked for
 * (at most MAX_PARTS - 1), and kept for the later calls.
 *
 * A call posts its tasks (one per part) under `lock`, wakes the workers, then takes tasks from
 * the same list until none is left, and waits until the tasks the workers took are done. Which
 * thread runs which part does not matter: each part writes only its own outputs (its range of
 * the arrays, its slot of the partial sums), so the results do not depend on the number of
 * workers, and with none at all the calling thread runs every part. One call at a time uses the
 * pool (it holds `call` throughout); a concurrent call runs its parts in its own thread instead
 * of waiting.
 *
 * After fork() the child has only the forking thread: no worker, and no call in progress
 * (kernels do not fork). A handler registered with pthread_atfork then gives the child a fresh,
 * empty pool, with new locks and condition variables (the parent's may be held or waited on by
 * threads the child does not have); its first parallel call starts new workers. */
static struct {
    pthread_mutex_t call;     /* held by the call using the pool */
    pthread_mutex_t lock;     /* guards the fields below */
    pthread_cond_t posted;    /* tasks were posted */
    pthread_cond_t finished;  /* the last pending task is done */
    range_task tasks[MAX_PARTS];
    int ntasks, next, pending; /* tasks posted, tasks taken, tasks not done */
    int workers;              /* threads started */
} pool = {
    .call = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .posted = PTHREAD_COND_INITIALIZER,
    .finished = PTHREAD_COND_INITIALIZER,
};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_forksafe; /* the fork handler is registered: the pool may be used */

static void pool_reset_in_child(void)
{
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.posted, NULL);
    pthread_cond_init(&pool.finished, NULL);
    pool.ntasks = pool.next = pool.pending = pool.workers = 0;
}

static void pool_register(void) { pool_forksafe = pthread_atfork(NULL, NULL, pool_reset_in_child) == 0; }

static void *pool_worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.next >= pool.ntasks)
            pthread_cond_wait(&pool.posted, &pool.lock);
        range_task task = pool.tasks[pool.next++];
        pthread_mutex_unlock(&pool.lock);
        run_task(&task);
        pthread_mutex_lock(&pool.lock);
        if (--pool.pending == 0)
            pthread_cond_signal(&pool.finished);
    }
    return NULL;
}

/* Starts workers (with pool.lock held) until there are `want` or one cannot be started. The
 * stack size is explicit because some C libraries (musl) give threads very small stacks; the
 * kernels' tile arrays take about 30 KiB. */
static void pool_grow(int want)
{
    if (pool.workers >= want)
        return;
    pthread_attr_t attr;
    int attr_ok = pthread_attr_init(&attr) == 0;
    if (attr_ok) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, (size_t)1 << 20);
    }
    while (pool.workers < want) {
        pthread_t id;
        if (pthread_create(&id, attr_ok ? &attr : NULL, pool_worker, NULL) != 0)
            break;
        if (!attr_ok)
            pthread_detach(id);
        pool.workers++;
    }
    if (attr_ok)
        pthread_attr_destroy(&attr);
}

/* Runs the tasks on the pool and this thread; returns 0, or -1 (having run nothing) when the
 * pool is in use by another call or has no worker. */
static int pool_run(const range_task *tasks, int count)
{
    pthread_once(&pool_once, pool_register);
    if (!pool_forksafe || pthread_mutex_trylock(&pool.call) != 0)
        return -1;
    pthread_mutex_lock(&pool.lock);
    pool_grow(count - 1);
    if (pool.workers == 0) {
        pthread_mutex_unlock(&pool.lock);
        pthread_mutex_unlock(&pool.call);
        return -1;
    }
    memcpy(pool.tasks, tasks, (size_t)count * sizeof(*tasks));
    pool.ntasks = count;
    pool.next = 0;
    pool.pending = count;
    pthread_cond_broadcast(&pool.posted);
    while (pool.next < pool.ntasks) {
        range_task task = pool.tasks[pool.next++];
        pthread_mutex_unlock(&pool.lock);
        run_task(&task);
        pthread_mutex_lock(&pool.lock);
        pool.pending--;
    }
    while (pool.pending > 0)
        pthread_cond_wait(&pool.finished, &pool.lock);
    pool.ntasks = pool.next = 0;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call);
    return 0;
}
#else
static int pool_run(const range_task *tasks, int count)
{
    (void)tasks;
    (void)count;
    return -1;
}
#endif

/* Split [0, n) into at most `threads` parts of whole tiles (at least GRAIN elements each) and run
 * fn on each, on the pool or else in this thread: the parts, and so the results, depend only on
 * n and threads. Returns the number of parts. */
static int parallel_ranges(Py_ssize_t n, int threads, range_fn fn, void *arg)
{
    int parts = threads < 1 ? 1 : (threads > MAX_PARTS ? MAX_PARTS : threads);
    if ((Py_ssize_t)parts * GRAIN > n)
        parts = (int)(n / GRAIN) > 1 ? (int)(n / GRAIN) : 1;
    Py_ssize_t chunk = (n + parts - 1) / parts;
    chunk = (chunk + TILE - 1) / TILE * TILE;
    range_task tasks[MAX_PARTS];
    int used = 0;
    for (int k = 0; k < parts; k++) {
        Py_ssize_t lo = (Py_ssize_t)k * chunk, hi = lo + chunk < n ? lo + chunk : n;
        if (lo >= n)
            break;
        tasks[k] = (range_task){fn, arg, lo, hi, k};
        used = k + 1;
    }
    if (used > 1 && pool_run(tasks, used) == 0)
        return used;
    for (int k = 0; k < used; k++)
        run_task(&tasks[k]);
    return used;
}

/* ------------------------------------------------------------------------------ checking the arguments */

/* Whether a buffer format string is one float32 in native byte order ('f', '@f', '=f', or '<f'
 * / '>f' as the machine is). A NULL format means unsigned bytes. */
static int is_float32_format(const char *format)
{
    if (format == NULL)
        return 0;
    char order = format[0];
    char native_order = PY_LITTLE_ENDIAN ? '<' : '>';
    if (order == '@' || order == '=' || order == native_order || (!PY_LITTLE_ENDIAN && order == '!'))
        format++;
    return format[0] == 'f' && format[1] == '\0';
}

/* Acquires the buffer of `obj` as float32 numbers to read (and write, if `writable`) in place:
 * format 'f', item size 4, C-contiguous, aligned for float. Returns 0 with the buffer held, or
 * -1 with TypeError (not a float32 buffer) or ValueError (layout, read-only) set and nothing
 * held. The number of elements is view->len / 4. */
static int get_floats(PyObject *obj, const char *name, int writable, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FULL_RO) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must support the buffer protocol (a float32 array such as "
                         "tensor.numpy()), not %.200s", name, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    if (view->itemsize != (Py_ssize_t)sizeof(float) || !is_float32_format(view->format))
        PyErr_Format(PyExc_TypeError, "%s must hold float32 numbers (buffer format 'f'), not format '%s' "
                     "of item size %zd", name, view->format ? view->format : "B", view->itemsize);
    else if (!PyBuffer_IsContiguous(view, 'C'))
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
    else if (writable && view->readonly)
        PyErr_Format(PyExc_ValueError, "%s is read-only, and the kernel writes it", name);
    else if ((uintptr_t)view->buf % sizeof(float) != 0)
        PyErr_Format(PyExc_ValueError, "%s is not aligned for float32", name);
    else
        return 0;
    PyBuffer_Release(view);
    return -1;
}

/* The buffers of one call: acquired all or none, released together. An optional one given as
 * None stays empty (obj and buf NULL, len 0). */
typedef struct {
    PyObject *obj;
    const char *name;
    int writable, optional;
} buffer_arg;

static void release_all(Py_buffer *views, int count)
{
    for (int k = 0; k < count; k++)
        if (views[k].obj != NULL)
            PyBuffer_Release(&views[k]);
}

static int get_all(const buffer_arg *args, int count, Py_buffer *views)
{
    for (int k = 0; k < count; k++) {
        if (args[k].optional && args[k].obj == Py_None) {
            memset(&views[k], 0, sizeof(views[k]));
            continue;
        }
        if (get_floats(args[k].obj, args[k].name, args[k].writable, &views[k]) < 0) {
            release_all(views, k);
            return -1;
        }
    }
    return 0;
}

static Py_ssize_t length(const Py_buffer *view) { return view->len / (Py_ssize_t)sizeof(float); }

/* An integer argument (a Python int or any object with __index__) in [0, max]; -1 with TypeError
 * or ValueError set otherwise. */
static int read_uint(PyObject *obj, const char *name, unsigned long long max, unsigned long long *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be an integer, not %.200s", name, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(index); /* OverflowError if < 0 or too large */
    Py_DECREF(index);
    int overflow = value == (unsigned long long)-1 && PyErr_Occurred();
    if (overflow) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
    }
    if (overflow || value > max) {
        PyErr_Format(PyExc_ValueError, "%s must lie in [0, %llu], got %R", name, max, obj);
        return -1;
    }
    *out = value;
    return 0;
}

#define SEED_MAX ((1ULL << 63) - 1) /* seeds are non-negative int64s, as PyTorch draws them */

/* The number of threads asked for: an integer >= 1; more than MAX_PARTS counts as MAX_PARTS. */
static int read_threads(PyObject *obj, int *threads)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "threads must be an integer, not %.200s", Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (overflow == 0 && value < 1)) {
        PyErr_Format(PyExc_ValueError, "threads must be at least 1, got %R", obj);
        return -1;
    }
    *threads = overflow > 0 || value > MAX_PARTS ? MAX_PARTS : (int)value;
    return 0;
}

/* A float argument as the kernels use it: rounded to float32, finite, and > 0 (or >= 0 with
 * `zero_ok`). The range is checked before the conversion, which C leaves undefined outside it. */
static int read_float(double value, const char *name, int zero_ok, float *out)
{
    int ok = (zero_ok ? value >= 0.0 : value > 0.0) && value <= FLT_MAX; /* false for NaN */
    float f = ok ? (float)value : 0.0f;
    if (!ok || (!zero_ok && f == 0.0f)) {
        PyObject *given = PyFloat_FromDouble(value);
        if (given != NULL) {
            PyErr_Format(PyExc_ValueError, "%s must be a finite float32 %s 0, got %R", name, zero_ok ? ">=" : ">",
                         given);
            Py_DECREF(given);
        }
        return -1;
    }
    *out = f;
    return 0;
}

/* ------------------------------------------------------------------------------ Python entry points */

/* The seed and the temperature, cap, mask_min, dmask_min of a relaxation, checked. */
static int read_relax_params(relax_params *p, PyObject *seed_obj, double temperature, double cap, double mask_min,
                             double dmask_min)
{
    unsigned long long seed;
    if (read_uint(seed_obj, "seed", SEED_MAX, &seed) < 0 ||
        read_float(temperature, "temperature", 0, &p->temperature) < 0 || read_float(cap, "cap", 0, &p->cap) < 0 ||
        read_float(mask_min, "mask_min", 1, &p->mask_min) < 0 ||
        read_float(dmask_min, "dmask_min", 1, &p->dmask_min) < 0)
        return -1;
    p->k0 = (uint32_t)seed;
    p->k1 = (uint32_t)(seed >> 32);
    return 0;
}

/* Elements [offset, offset + n) of a flat buffer of `len` elements exist. */
static int check_span(const char *name, Py_ssize_t len, unsigned long long offset, Py_ssize_t n)
{
    if (n <= len && offset <= (unsigned long long)(len - n))
        return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd elements, fewer than offset + n = %llu + %zd", name, len, offset, n);
    return -1;
}

static int check_length(const char *name, const Py_buffer *view, Py_ssize_t n)
{
    if (length(view) == n)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd elements and the weight %zd: they must be equal", name,
                 length(view), n);
    return -1;
}

static PyObject *py_relaxed_forward(PyObject *self, PyObject *args)
{
    PyObject *s_obj, *w_obj, *out_obj, *offset_obj, *seed_obj;
    PyObject *threads_obj;
    double temperature, cap, mask_min, dmask_min;
    int threads;
    unsigned long long offset;
    relax_job job = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOddddO:relaxed_forward", &s_obj, &w_obj, &out_obj, &offset_obj, &seed_obj,
                          &temperature, &cap, &mask_min, &dmask_min, &threads_obj) ||
        read_uint(offset_obj, "offset", PY_SSIZE_T_MAX, &offset) < 0 ||
        read_relax_params(&job.p, seed_obj, temperature, cap, mask_min, dmask_min) < 0 ||
        read_threads(threads_obj, &threads) < 0)
        return NULL;
    const buffer_arg spec[3] = {{s_obj, "scores", 0, 0}, {w_obj, "weight", 0, 0}, {out_obj, "out", 1, 0}};
    Py_buffer v[3];
    if (get_all(spec, 3, v) < 0)
        return NULL;
    Py_ssize_t n = length(&v[1]);
    if (check_span("scores", length(&v[0]), offset, n) < 0 || check_length("out", &v[2], n) < 0) {
        release_all(v, 3);
        return NULL;
    }
    job.s = (const float *)v[0].buf + offset;
    job.w = v[1].buf;
    job.out = v[2].buf;
    job.offset = offset;
    Py_BEGIN_ALLOW_THREADS
    parallel_ranges(n, threads, relax_range, &job);
    Py_END_ALLOW_THREADS
    release_all(v, 3);
    Py_RETURN_NONE;
}

static PyObject *py_relaxed_backward(PyObject *self, PyObject *args)
{
    PyObject *s_obj, *w_obj, *g_obj, *gw_obj, *gs_obj, *offset_obj, *seed_obj;
    PyObject *threads_obj;
    double temperature, cap, mask_min, dmask_min;
    int threads;
    unsigned long long offset;
    relax_job job = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOddddO:relaxed_backward", &s_obj, &w_obj, &g_obj, &gw_obj, &gs_obj,
                          &offset_obj, &seed_obj, &temperature, &cap, &mask_min, &dmask_min, &threads_obj) ||
        read_uint(offset_obj, "offset", PY_SSIZE_T_MAX, &offset) < 0 ||
        read_relax_params(&job.p, seed_obj, temperature, cap, mask_min, dmask_min) < 0 ||
        read_threads(threads_obj, &threads) < 0)
        return NULL;
    const buffer_arg spec[5] = {
        {s_obj, "scores", 0, 0}, {w_obj, "weight", 0, 0}, {g_obj, "grad", 0, 0},
        {gw_obj, "grad_weight", 1, 1}, {gs_obj, "grad_scores", 1, 1},
    };
    Py_buffer v[5];
    if (get_all(spec, 5, v) < 0)
        return NULL;
    Py_ssize_t n = length(&v[1]);
    if (check_span("scores", length(&v[0]), offset, n) < 0 || check_length("grad", &v[2], n) < 0 ||
        (v[3].buf != NULL && check_length("grad_weight", &v[3], n) < 0) ||
        (v[4].buf != NULL && check_span("grad_scores", length(&v[4]), offset, n) < 0)) {
        release_all(v, 5);
        return NULL;
    }
    job.s = (const float *)v[0].buf + offset;
    job.w = v[1].buf;
    job.g = v[2].buf;
    job.grad_w = v[3].buf;
    job.grad_s = v[4].buf == NULL ? NULL : (float *)v[4].buf + offset;
    job.offset = offset;
    if (job.grad_w != NULL || job.grad_s != NULL) {
        Py_BEGIN_ALLOW_THREADS
        parallel_ranges(n, threads, relax_range, &job);
        Py_END_ALLOW_THREADS
    }
    release_all(v, 5);
    Py_RETURN_NONE;
}

static PyObject *py_clamp_sums(PyObject *self, PyObject *args)
{
    PyObject *s_obj, *threads_obj;
    double c;
    int threads;
    Py_buffer v;
    (void)self;
    if (!PyArg_ParseTuple(args, "OdO:clamp_sums", &s_obj, &c, &threads_obj) ||
        read_threads(threads_obj, &threads) < 0 || get_floats(s_obj, "scores", 0, &v) < 0)
        return NULL;
    sums_job job;
    job.s = v.buf;
    /* any threshold is allowed (NaN stays NaN); beyond the float32 range it is +-infinity */
    job.c = c > FLT_MAX ? INFINITY : (c < -FLT_MAX ? -INFINITY : (float)c);
    int parts;
    Py_BEGIN_ALLOW_THREADS
    parts = parallel_ranges(length(&v), threads, sums_range, &job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    double f = 0.0, count = 0.0, raw = 0.0;
    for (int k = 0; k < parts; k++) {
        f += job.f[k];
        count += job.count[k];
        raw += job.raw[k];
    }
    return Py_BuildValue("(ddd)", f, count, raw);
}

static PyObject *py_uniform(PyObject *self, PyObject *args)
{
    PyObject *out_obj, *offset_obj, *seed_obj;
    unsigned long long offset, seed;
    Py_buffer v;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO:uniform", &out_obj, &offset_obj, &seed_obj) ||
        read_uint(offset_obj, "offset", ULLONG_MAX, &offset) < 0 ||
        read_uint(seed_obj, "seed", SEED_MAX, &seed) < 0 || get_floats(out_obj, "out", 1, &v) < 0)
        return NULL;
    float *dst = v.buf;
    Py_ssize_t n = length(&v);
    if (n > 0 && offset > ULLONG_MAX - (unsigned long long)(n - 1)) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "offset + n = %llu + %zd passes the last index 2**64 - 1", offset, n);
        return NULL;
    }
    float u[TILE];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i += TILE) {
        Py_ssize_t len = n - i < TILE ? n - i : TILE;
        uniform_tile(offset + (uint64_t)i, (uint32_t)seed, (uint32_t)(seed >> 32), u);
        memcpy(dst + i, u, (size_t)len * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_philox(PyObject *self, PyObject *args)
{
    PyObject *c_obj[4], *k_obj[2];
    unsigned long long word;
    uint32_t x[4], k[2];
    (void)self;
    if (!PyArg_ParseTuple(args, "(OOOO)(OO):philox", &c_obj[0], &c_obj[1], &c_obj[2], &c_obj[3], &k_obj[0],
                          &k_obj[1]))
        return NULL;
    for (int j = 0; j < 4; j++) {
        if (read_uint(c_obj[j], "a counter word", UINT32_MAX, &word) < 0)
            return NULL;
        x[j] = (uint32_t)word;
    }
    for (int j = 0; j < 2; j++) {
        if (read_uint(k_obj[j], "a key word", UINT32_MAX, &word) < 0)
            return NULL;
        k[j] = (uint32_t)word;
    }
    philox_one(x, k[0], k[1]);
    return Py_BuildValue("(kkkk)", (unsigned long)x[0], (unsigned long)x[1], (unsigned long)x[2], (unsigned long)x[3]);
}

static PyMethodDef methods[] = {
    {"relaxed_forward", py_relaxed_forward, METH_VARARGS,
     "relaxed_forward(scores, weight, out, offset, seed, temperature, cap, mask_min, dmask_min, threads)\n\n"
     "out = weight * mask for one layer of n = len(weight) elements, whose scores are the elements "
     "[offset, offset + n) of the flat float32 buffer `scores` (the noise of flat index i is "
     "uniform's). weight, out: float32 buffers of n elements, out writable."},
    {"relaxed_backward", py_relaxed_backward, METH_VARARGS,
     "relaxed_backward(scores, weight, grad, grad_weight, grad_scores, offset, seed, temperature, cap, "
     "mask_min, dmask_min, threads)\n\n"
     "The gradients of one layer as for relaxed_forward, grad the gradient of its output: grad_weight "
     "(n elements) and grad_scores[offset : offset + n] (a flat buffer like scores) are written; None "
     "skips either."},
    {"clamp_sums", py_clamp_sums, METH_VARARGS,
     "clamp_sums(scores, c, threads) -> (sum clamp(s - c, 0, 1), #{s > c}, sum s) of a float32 buffer"},
    {"uniform", py_uniform, METH_VARARGS,
     "uniform(out, offset, seed): the noise of flat indices offset .. offset + len(out) into the "
     "writable float32 buffer out"},
    {"philox", py_philox, METH_VARARGS,
     "philox((c0, c1, c2, c3), (k0, k1)) -> Philox-4x32-10 of one counter (the plain reference)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu", "Optional compiled CPU kernels of probmask (see probmask.kernels.cpu).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
