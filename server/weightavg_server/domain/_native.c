/* weightavg_server.domain._native: the server's two native helpers for large CPU parameter buffers.
 *
 * lerp: `avg.lerp_(value, weight)` for large contiguous CPU tensors in one fused pass, on as many
 * threads as torch's intra-op setting. On the CPU, torch's lerp_ with a scalar weight runs at about
 * 0.8 of one add_ over the same bytes (it evaluates both of its formulas and blends them); this loop
 * runs at add_'s speed or better (docs/perf.md, "Native lerp"). The bits are torch's: for
 * |w| < 0.5 the result is fma(w, value - avg, avg), otherwise fma(w - 1, value - avg, value),
 * exactly what ATen's vectorised lerp computes. The Python side (lerp.py) checks that against torch
 * at first use and falls back to torch's lerp_ where they ever differ, so this file never decides a
 * number on its own. Kinds: float32 into float32, float64 into float64, and bfloat16 into float32
 * (the value widened exactly, as `value.to(torch.float32)` does, in the same pass). The caller
 * passes addresses of tensors it holds for the whole call, checked there: same element count,
 * contiguous, on the CPU, and either the same memory or no overlap at all.
 *
 * advise_huge_pages: madvise(MADV_HUGEPAGE) over the 2 MiB pages that lie wholly inside a new,
 * untouched buffer (flat.py), so a kernel streaming it takes a TLB miss per 2 MiB instead of per
 * 4 KiB where the kernel's transparent huge pages are set to `madvise` (docs/perf.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

enum { KIND_F32 = 0, KIND_F64 = 1, KIND_F32_BF16 = 2, KINDS = 3 };

#define MAX_THREADS 256
#define BLOCK_BYTES ((int64_t)1 << 18) /* of the average: 256 KiB, a few hundred per large call */

/* One build runs on any x86-64: GCC compiles each loop for AVX-512, for AVX2 with FMA and for the
 * baseline, and picks one when the module loads. Elsewhere the compiler's default target. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

CLONES static void lerp_f32(float *avg, const float *value, int64_t n, float weight) {
    if (fabsf(weight) < 0.5f) {
        for (int64_t i = 0; i < n; i++) avg[i] = fmaf(weight, value[i] - avg[i], avg[i]);
    } else {
        const float coeff = weight - 1.0f;
        for (int64_t i = 0; i < n; i++) avg[i] = fmaf(coeff, value[i] - avg[i], value[i]);
    }
}

CLONES static void lerp_f64(double *avg, const double *value, int64_t n, double weight) {
    if (fabs(weight) < 0.5) {
        for (int64_t i = 0; i < n; i++) avg[i] = fma(weight, value[i] - avg[i], avg[i]);
    } else {
        const double coeff = weight - 1.0;
        for (int64_t i = 0; i < n; i++) avg[i] = fma(coeff, value[i] - avg[i], value[i]);
    }
}

static inline float widen_bf16(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16; /* bfloat16 is float32's upper half: exact */
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

CLONES static void lerp_f32_bf16(float *avg, const uint16_t *value, int64_t n, float weight) {
    if (fabsf(weight) < 0.5f) {
        for (int64_t i = 0; i < n; i++) avg[i] = fmaf(weight, widen_bf16(value[i]) - avg[i], avg[i]);
    } else {
        const float coeff = weight - 1.0f;
        for (int64_t i = 0; i < n; i++) {
            const float v = widen_bf16(value[i]);
            avg[i] = fmaf(coeff, v - avg[i], v);
        }
    }
}

static const size_t AVG_SIZE[KINDS] = {4, 8, 4};
static const size_t VALUE_SIZE[KINDS] = {4, 8, 2};

typedef struct {
    int kind;
    char *avg;
    const char *value;
    int64_t n;
    double weight;
    int64_t block;              /* elements a thread takes at a time: a multiple of 64 bytes of avg */
    atomic_int_fast64_t next;   /* the first element no thread has taken yet */
} Work;

static void run_range(const Work *w, int64_t start, int64_t len) {
    char *avg = w->avg + start * (int64_t)AVG_SIZE[w->kind];
    const char *value = w->value + start * (int64_t)VALUE_SIZE[w->kind];
    switch (w->kind) {
    case KIND_F32:
        lerp_f32((float *)avg, (const float *)value, len, (float)w->weight);
        break;
    case KIND_F64:
        lerp_f64((double *)avg, (const double *)value, len, w->weight);
        break;
    default:
        lerp_f32_bf16((float *)avg, (const uint16_t *)value, len, (float)w->weight);
        break;
    }
}

/* Take blocks until none is left. Blocks rather than one fixed share per thread: a thread that
 * starts late, or loses its core for a while, costs the call only the block it holds. */
static void *take_blocks(void *arg) {
    Work *w = (Work *)arg;
    for (;;) {
        const int64_t start = atomic_fetch_add(&w->next, w->block);
        if (start >= w->n) return NULL;
        run_range(w, start, w->n - start < w->block ? w->n - start : w->block);
    }
}

/* Run on the calling thread and threads - 1 more (fewer when one cannot be started). */
static void run_threads(Work *w, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int k = 1; k < threads; k++) {
        if (pthread_create(&ids[started], NULL, take_blocks, w) == 0) started++;
    }
    take_blocks(w);
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
}

PyDoc_STRVAR(lerp_doc,
             "lerp(kind, avg_address, value_address, count, weight, threads)\n\n"
             "avg[i] = lerp(avg[i], value[i], weight) for i < count, torch's formula and bits; kind 0 is\n"
             "float32 into float32, 1 float64 into float64, 2 bfloat16 into float32. The GIL is released.");

static PyObject *lerp(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    unsigned long long avg, value;
    long long n;
    double weight;
    if (!PyArg_ParseTuple(args, "iKKLdi", &kind, &avg, &value, &n, &weight, &threads)) return NULL;
    if (kind < 0 || kind >= KINDS) return PyErr_Format(PyExc_ValueError, "kind %d is not one of 0, 1, 2", kind);
    if (n < 0) return PyErr_Format(PyExc_ValueError, "count %lld is negative", n);
    if (threads < 1 || threads > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads %d is outside 1..%d", threads, MAX_THREADS);
    if (n > 0 && (avg == 0 || value == 0)) return PyErr_Format(PyExc_ValueError, "a null address");
    Work work = {kind, (char *)(uintptr_t)avg, (const char *)(uintptr_t)value, (int64_t)n, weight,
                 BLOCK_BYTES / (int64_t)AVG_SIZE[kind], 0};
    Py_BEGIN_ALLOW_THREADS
    run_threads(&work, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define HUGE_PAGE ((uintptr_t)2 << 20)

PyDoc_STRVAR(advise_doc,
             "advise_huge_pages(address, nbytes) -> int\n\n"
             "Ask for transparent huge pages over the 2 MiB pages wholly inside [address, address + nbytes);\n"
             "the bytes advised, 0 where there is no such page or the system refuses (nothing else changes).");

static PyObject *advise_huge_pages(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, nbytes;
    if (!PyArg_ParseTuple(args, "KK", &address, &nbytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t start = ((uintptr_t)address + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    const uintptr_t stop = ((uintptr_t)address + (uintptr_t)nbytes) & ~(HUGE_PAGE - 1);
    if (address != 0 && stop > start && madvise((void *)start, stop - start, MADV_HUGEPAGE) == 0)
        return PyLong_FromUnsignedLongLong((unsigned long long)(stop - start));
#endif
    return PyLong_FromLong(0);
}

static PyMethodDef methods[] = {
    {"lerp", lerp, METH_VARARGS, lerp_doc},
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS, advise_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "weightavg's native helpers: fused CPU lerp, huge-page advice (lerp.py, flat.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
