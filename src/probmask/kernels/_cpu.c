/* probmask._kernels: optional compiled CPU kernels.
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
 * Plain C against the CPython API only (no PyTorch headers): the Python side (probmask.native)
 * checks the tensors (CPU, float32, contiguous, sizes) and passes their data pointers as
 * integers, keeping the tensors alive during the call. The GIL is released while computing.
 *
 * Every element goes through the same vectorised code: the transcendental functions run over
 * whole tiles of TILE elements held in local arrays (a short last tile is padded), so the forward
 * and the backward pass compute bit-identical logits for the same element. No -ffast-math: the
 * order of every floating-point operation is as written (see the libmvec declarations below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define TILE 1024
#define BLOCKS (TILE / 4 + 1) /* Philox blocks that cover any TILE consecutive indices */
#define EPS 1e-20f            /* as probmask.masks.EPS */
#define MAX_PARTS 64
#define GRAIN (1 << 17) /* at least this many elements per thread */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* glibc's vector maths library (libmvec) has SIMD versions of logf and expf on x86-64; saying
 * so lets the compiler vectorise the loops that call them without -ffast-math (whose licence to
 * reassociate would, for example, turn (1 - s) + e into (1 + e) - s = 0 at s = 1). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(__FAST_MATH__)
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) float expf(float);
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
__attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math", "finite-math-only")))
static void sums_block(const float *s, Py_ssize_t len, float c, float out[3])
{
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

static void *run_task(void *p)
{
    range_task *task = p;
    task->fn(task->arg, task->lo, task->hi, task->part);
    return NULL;
}

/* Split [0, n) into at most `threads` parts of whole tiles (at least GRAIN elements each), run
 * fn on each (part 0 in this thread). Returns the number of parts. Parts whose thread cannot be
 * started run in this thread: the result never depends on it. */
static int parallel_ranges(Py_ssize_t n, int threads, range_fn fn, void *arg)
{
    int parts = threads < 1 ? 1 : (threads > MAX_PARTS ? MAX_PARTS : threads);
    if ((Py_ssize_t)parts * GRAIN > n)
        parts = (int)(n / GRAIN) > 1 ? (int)(n / GRAIN) : 1;
    Py_ssize_t chunk = (n + parts - 1) / parts;
    chunk = (chunk + TILE - 1) / TILE * TILE;
    range_task tasks[MAX_PARTS];
    pthread_t ids[MAX_PARTS];
    int started[MAX_PARTS];
    int used = 0;
    for (int k = 0; k < parts; k++) {
        Py_ssize_t lo = (Py_ssize_t)k * chunk, hi = lo + chunk < n ? lo + chunk : n;
        if (lo >= n)
            break;
        tasks[k] = (range_task){fn, arg, lo, hi, k};
        started[k] = k > 0 && pthread_create(&ids[k], NULL, run_task, &tasks[k]) == 0;
        used = k + 1;
    }
    if (used == 0)
        return 0;
    run_task(&tasks[0]);
    for (int k = 1; k < used; k++) {
        if (started[k])
            pthread_join(ids[k], NULL);
        else
            run_task(&tasks[k]);
    }
    return used;
}

/* ------------------------------------------------------------------------------ Python entry points */

static void *as_pointer(unsigned long long address) { return (void *)(uintptr_t)address; }

static void read_params(relax_params *p, unsigned long long seed, float temperature, float cap, float mask_min,
                       float dmask_min)
{
    p->k0 = (uint32_t)seed;
    p->k1 = (uint32_t)(seed >> 32);
    p->temperature = temperature;
    p->cap = cap;
    p->mask_min = mask_min;
    p->dmask_min = dmask_min;
}

static PyObject *py_relaxed_forward(PyObject *self, PyObject *args)
{
    unsigned long long s, w, out, seed, offset;
    Py_ssize_t n;
    float temperature, cap, mask_min, dmask_min;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnKKffffi", &s, &w, &out, &n, &offset, &seed, &temperature, &cap, &mask_min,
                          &dmask_min, &threads))
        return NULL;
    relax_job job = {as_pointer(s), as_pointer(w), NULL, as_pointer(out), NULL, NULL, offset, {0}};
    read_params(&job.p, seed, temperature, cap, mask_min, dmask_min);
    Py_BEGIN_ALLOW_THREADS
    parallel_ranges(n, threads, relax_range, &job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_relaxed_backward(PyObject *self, PyObject *args)
{
    unsigned long long s, w, g, grad_w, grad_s, seed, offset;
    Py_ssize_t n;
    float temperature, cap, mask_min, dmask_min;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKnKKffffi", &s, &w, &g, &grad_w, &grad_s, &n, &offset, &seed, &temperature,
                          &cap, &mask_min, &dmask_min, &threads))
        return NULL;
    relax_job job = {as_pointer(s), as_pointer(w), as_pointer(g), NULL, as_pointer(grad_w), as_pointer(grad_s),
                     offset, {0}};
    read_params(&job.p, seed, temperature, cap, mask_min, dmask_min);
    Py_BEGIN_ALLOW_THREADS
    parallel_ranges(n, threads, relax_range, &job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_clamp_sums(PyObject *self, PyObject *args)
{
    unsigned long long s;
    Py_ssize_t n;
    float c;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Knfi", &s, &n, &c, &threads))
        return NULL;
    sums_job job;
    job.s = as_pointer(s);
    job.c = c;
    int parts;
    Py_BEGIN_ALLOW_THREADS
    parts = parallel_ranges(n, threads, sums_range, &job);
    Py_END_ALLOW_THREADS
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
    unsigned long long out, seed, offset;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKK", &out, &n, &offset, &seed))
        return NULL;
    float *dst = as_pointer(out);
    float u[TILE];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i += TILE) {
        Py_ssize_t len = n - i < TILE ? n - i : TILE;
        uniform_tile(offset + (uint64_t)i, (uint32_t)seed, (uint32_t)(seed >> 32), u);
        memcpy(dst + i, u, (size_t)len * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_philox(PyObject *self, PyObject *args)
{
    unsigned int c[4], k0, k1;
    (void)self;
    if (!PyArg_ParseTuple(args, "(IIII)(II)", &c[0], &c[1], &c[2], &c[3], &k0, &k1))
        return NULL;
    uint32_t x[4] = {c[0], c[1], c[2], c[3]};
    philox_one(x, k0, k1);
    return Py_BuildValue("(kkkk)", (unsigned long)x[0], (unsigned long)x[1], (unsigned long)x[2], (unsigned long)x[3]);
}

static PyMethodDef methods[] = {
    {"relaxed_forward", py_relaxed_forward, METH_VARARGS,
     "relaxed_forward(s, w, out, n, offset, seed, T, cap, mask_min, dmask_min, threads): out = w * mask"},
    {"relaxed_backward", py_relaxed_backward, METH_VARARGS,
     "relaxed_backward(s, w, g, grad_w, grad_s, n, offset, seed, T, cap, mask_min, dmask_min, threads); "
     "a zero grad pointer skips that gradient"},
    {"clamp_sums", py_clamp_sums, METH_VARARGS,
     "clamp_sums(s, n, c, threads) -> (sum clamp(s - c, 0, 1), #{s > c}, sum s)"},
    {"uniform", py_uniform, METH_VARARGS, "uniform(out, n, offset, seed): the noise of flat indices offset.."},
    {"philox", py_philox, METH_VARARGS, "philox((c0, c1, c2, c3), (k0, k1)) -> Philox-4x32-10 of one counter (the plain reference)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu", "Optional compiled CPU kernels of probmask (see probmask.native).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
