/* weightavg_server.domain._native: the server's native helpers for large CPU parameter buffers.
 *
 * lerp: `avg.lerp_(value, weight)` for large contiguous CPU tensors in one fused pass, on as many
 * threads as torch's intra-op setting. On the CPU, torch's lerp_ with a scalar weight runs at about
 * 0.8 of one add_ over the same bytes (it evaluates both of its formulas and blends them); this loop
 * runs at add_'s speed or better (docs/perf.md, "Native lerp"). The bits are torch's: for
 * |w| < 0.5 the result is fma(w, value - avg, avg), otherwise fma(w - 1, value - avg, value),
 * exactly what ATen's vectorised lerp computes. One call takes any number of pairs of one kind (a
 * dictionary that is not flat, a module's runs and lone tensors), whose blocks the threads share.
 * The Python side (lerp.py) checks that against torch at first use and falls back to torch's lerp_ where they ever differ, so this file never decides a
 * number on its own. Kinds: float32 into float32, float64 into float64, and bfloat16 into float32
 * (the value widened exactly, as `value.to(torch.float32)` does, in the same pass). The caller
 * passes addresses of tensors it holds for the whole call, checked there: same element count,
 * contiguous, on the CPU, and either the same memory or no overlap at all.
 *
 * weighted_sum: merging's weighted average (and linear sum) of many same-shape tensors in one pass
 * over them instead of one pass per input, with torch's sequence of roundings (weighted_sum.py checks
 * it); one call takes every entry of a merge, as lerp takes every pair.
 *
 * kth_largest_magnitude and zero_below: TIES's trim of a delta, its threshold by a radix selection on the
 * bits and the zeroing below it in one pass (selection.py checks both against torch.kthvalue and
 * masked_fill_).
 *
 * advise_huge_pages: madvise(MADV_HUGEPAGE) over the 2 MiB pages that lie wholly inside a new,
 * untouched buffer (flat.py), so a kernel streaming it takes a TLB miss per 2 MiB instead of per
 * 4 KiB where the kernel's transparent huge pages are set to `madvise` (docs/perf.md).
 *
 * copy: large memcpys with streaming stores (x86-64; plain memcpy elsewhere), several at once on
 * threads sharing their blocks as lerp's do: uploads into new tensors (a shared memory region's
 * bytes, a stream's chunks) and a fetch's copies into the client's region (native.py).
 *
 * guard, unguard, guard_broken: a SIGBUS handler for the mappings of clients' shared memory regions
 * (shm.py). A client that truncates its region's file while the server copies into or out of it
 * makes the next touch of a lost page raise SIGBUS, in whichever thread touches it (ours, torch's
 * OpenMP workers, numpy), which would kill the server. The handler maps a private zero page over
 * the faulting page of a guarded range, marks the range broken and returns, so the copy finishes
 * (reading zeros, or writing into the private page); the caller then refuses the call and the
 * region for good. A fault outside every guarded range goes to the handler installed before
 * (faulthandler's, say) or kills the process as it would have.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* sched_getcpu, the CPU sets and pthread_attr_setaffinity_np */
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { KIND_F32 = 0, KIND_F64 = 1, KIND_F32_BF16 = 2, KINDS = 3 };

#define MAX_THREADS 256
#define BLOCK_BYTES ((int64_t)1 << 18) /* of the average: 256 KiB, a few hundred per large call */
/* A one-thread lerp of fewer elements (a few microseconds of work) keeps the GIL, as numpy keeps it for
 * small arrays: a small average (the 2-to-1 linear) would otherwise hand it to another thread of the
 * server and wait to take it back, for less work than the hand-over. */
#define GIL_KEPT_ELEMENTS ((int64_t)1 << 14)

/* One build runs on any x86-64: GCC compiles each loop for AVX-512, for AVX2 with FMA and for the
 * baseline, and picks one when the module loads. Elsewhere the compiler's default target. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Each float loop is written once, for float and for double: FMA and ABS are that type's fmaf/fma and
 * fabsf/fabs, and 0.5 and 1 are exact in both. */
#define DEFINE_LERP(NAME, T, FMA, ABS)                                                                      \
    CLONES static void NAME(T *avg, const T *value, int64_t n, T weight) {                                  \
        if (ABS(weight) < (T)0.5) {                                                                          \
            for (int64_t i = 0; i < n; i++) avg[i] = FMA(weight, value[i] - avg[i], avg[i]);                 \
        } else {                                                                                             \
            const T coeff = weight - (T)1;                                                                   \
            for (int64_t i = 0; i < n; i++) avg[i] = FMA(coeff, value[i] - avg[i], value[i]);                \
        }                                                                                                    \
    }

DEFINE_LERP(lerp_f32, float, fmaf, fabsf)
DEFINE_LERP(lerp_f64, double, fma, fabs)

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

static void run_range(int kind, char *avg, const char *value, int64_t start, int64_t len, double weight) {
    avg += start * (int64_t)AVG_SIZE[kind];
    value += start * (int64_t)VALUE_SIZE[kind];
    switch (kind) {
    case KIND_F32:
        lerp_f32((float *)avg, (const float *)value, len, (float)weight);
        break;
    case KIND_F64:
        lerp_f64((double *)avg, (const double *)value, len, weight);
        break;
    default:
        lerp_f32_bf16((float *)avg, (const uint16_t *)value, len, (float)weight);
        break;
    }
}

/* Items (a lerp's pairs, a sum's entries) of n[i] elements, cut into blocks of at most `block`
 * elements: item i owns the blocks [first[i], first[i + 1]), so one counter hands out the blocks of
 * every item in order. Blocks rather than one fixed share per thread: a thread that starts late, or
 * loses its core for a while, costs the call only the block it holds. Both kernels share this. */
typedef struct {
    Py_ssize_t items;
    int64_t *n;
    int64_t *first;            /* items + 1 entries, first[0] = 0 */
    int64_t block;             /* elements: a multiple of 64 bytes of the result */
    atomic_int_fast64_t next;  /* the first block no thread has taken yet */
} Blocks;

static void blocks_set(Blocks *b, Py_ssize_t i, int64_t n) {
    b->n[i] = n;
    b->first[i + 1] = b->first[i] + (n + b->block - 1) / b->block;
}

/* The next block for a thread: its item, first element and length, or 0 when none is left. A thread's
 * blocks come in increasing order, so its item index (*i, 0 at first) only moves forward. */
static int next_block(Blocks *b, Py_ssize_t *i, int64_t *start, int64_t *len) {
    const int64_t k = atomic_fetch_add(&b->next, 1);
    if (k >= b->first[b->items]) return 0;
    while (b->first[*i + 1] <= k) (*i)++;
    *start = (k - b->first[*i]) * b->block;
    const int64_t left = b->n[*i] - *start;
    *len = left < b->block ? left : b->block;
    return 1;
}

/* Pairs (avg, value) of one kind. */
typedef struct {
    int kind;
    double weight;
    char **avg;
    const char **value;
    Blocks blocks;
} Work;

static void *take_blocks(void *arg) {
    Work *w = (Work *)arg;
    Py_ssize_t s = 0;
    int64_t start, len;
    while (next_block(&w->blocks, &s, &start, &len)) run_range(w->kind, w->avg[s], w->value[s], start, len, w->weight);
    return NULL;
}

#if defined(__linux__)
/* Where a call's extra threads start. Linux puts a new thread on its creator's CPU, and a thread woken
 * after the process slept there too; in the project's 2-vCPU VMs (kernel 6.18) the other CPU, idle,
 * did not pull it, so the thread ran only once the creator had taken every block and waited in
 * pthread_join: a "two-thread" average ran on one core after a pause (docs/perf.md, "Threads that
 * started on their creator's CPU"). The extra threads therefore start on the CPUs this thread may
 * use other than its own, and take the whole set back once running, so that the scheduler may still
 * move them. Nothing changes where the set holds one CPU, or cannot be read. */
typedef struct {
    void *(*work)(void *);
    void *arg;
    int here; /* the creator's CPU when it started them */
    cpu_set_t allowed;
    int *started_on;  /* where each extra thread began, before it took the whole set back; NULL but in tests */
    atomic_int count; /* how many of started_on are set */
} Start;

static void *start_elsewhere(void *arg) {
    Start *s = (Start *)arg;
    if (s->started_on != NULL) s->started_on[atomic_fetch_add(&s->count, 1)] = sched_getcpu();
    pthread_setaffinity_np(pthread_self(), sizeof s->allowed, &s->allowed);
    return s->work(s->arg);
}

/* The attributes that start a thread away from this one's CPU, into `elsewhere`; 0 where there is no
 * other CPU to start on (then the threads start as the system places them). */
static int away_from_here(Start *start, pthread_attr_t *elsewhere) {
    if (sched_getaffinity(0, sizeof start->allowed, &start->allowed) != 0) return 0;
    start->here = sched_getcpu();
    if (start->here < 0 || start->here >= CPU_SETSIZE || !CPU_ISSET(start->here, &start->allowed)) return 0;
    cpu_set_t others = start->allowed;
    CPU_CLR(start->here, &others);
    if (CPU_COUNT(&others) == 0 || pthread_attr_init(elsewhere) != 0) return 0;
    if (pthread_attr_setaffinity_np(elsewhere, sizeof others, &others) != 0) {
        pthread_attr_destroy(elsewhere);
        return 0;
    }
    return 1;
}
#endif

/* Run `work(arg)` on the calling thread and threads - 1 more (fewer when one cannot be started), each
 * taking blocks from the same counter until none is left; every kernel goes through here. For the tests
 * (both may be NULL): the creator's CPU where the extra threads were started away from it, else -1,
 * into *here, and the CPU each of them began on, before taking the whole set back, into started_on. */
static void run_threads_from(void *(*work)(void *), void *arg, int threads, int *here, int *started_on) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    void *(*entry)(void *) = work;
    void *entry_arg = arg;
    pthread_attr_t *attr = NULL;
#if defined(__linux__)
    Start start = {.work = work, .arg = arg, .here = -1, .started_on = started_on};
    atomic_init(&start.count, 0);
    pthread_attr_t elsewhere;
    if (threads > 1 && away_from_here(&start, &elsewhere)) {
        entry = start_elsewhere;
        entry_arg = &start;
        attr = &elsewhere;
        if (here != NULL) *here = start.here;
    }
#endif
    for (int k = 1; k < threads; k++) {
        if (pthread_create(&ids[started], attr, entry, entry_arg) == 0) started++;
    }
    work(arg);
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
    if (attr != NULL) pthread_attr_destroy(attr);
}

static void run_threads(void *(*work)(void *), void *arg, int threads) { run_threads_from(work, arg, threads, NULL, NULL); }

/* start_cpus: where run_threads' threads begin, for the tests. */
typedef struct {
    pthread_t creator;
    int cpus[MAX_THREADS]; /* the creator's first, then the others' in the order they ran */
    atomic_int others;
} Seen;

static void *note_cpu(void *arg) {
    Seen *seen = (Seen *)arg;
    const int k = pthread_equal(pthread_self(), seen->creator) ? 0 : 1 + atomic_fetch_add(&seen->others, 1);
#if defined(__linux__)
    seen->cpus[k] = sched_getcpu();
#else
    seen->cpus[k] = -1;
#endif
    return NULL;
}

PyDoc_STRVAR(start_cpus_doc,
             "start_cpus(threads) -> (int, tuple[int, ...])\n\n"
             "Start threads - 1 threads as the kernels do and return the creator's CPU when it started them (-1\n"
             "where they were started as the system places them) and the CPU each thread first ran on: the\n"
             "creator's first, then the threads it started. For the tests.");

static PyObject *start_cpus(PyObject *self, PyObject *args) {
    (void)self;
    int threads;
    if (!PyArg_ParseTuple(args, "i", &threads)) return NULL;
    if (threads < 1 || threads > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads %d is outside 1..%d", threads, MAX_THREADS);
    Seen seen;
    seen.creator = pthread_self();
    atomic_init(&seen.others, 0);
    int here = -1;
    int started_on[MAX_THREADS];
    Py_BEGIN_ALLOW_THREADS
    run_threads_from(note_cpu, &seen, threads, &here, started_on);
    Py_END_ALLOW_THREADS
    const int count = 1 + atomic_load(&seen.others);
    /* A thread started elsewhere is noted where it began: once it holds the whole set again the scheduler
     * may move it anywhere before note_cpu runs (three threads on two CPUs: onto the creator's, idle in
     * pthread_join), which is what the set is given back for. */
    if (here >= 0)
        for (int k = 1; k < count; k++) seen.cpus[k] = started_on[k - 1];
    PyObject *cpus = PyTuple_New(count);
    if (cpus == NULL) return NULL;
    for (int k = 0; k < count; k++) PyTuple_SET_ITEM(cpus, k, PyLong_FromLong(seen.cpus[k]));
    return Py_BuildValue("(iN)", here, cpus);
}

/* Pairs of addresses (`firsts`, `seconds`) with their element counts, three tuples of one length, read
 * into one allocation: *first and *second point into it, and `blocks` (whose block is set) gets the
 * counts. The memory to free after the call, or NULL with an exception set; `item` and `count` name
 * an entry in errors ("pair" and "count"), `uneven` is the error for tuples of different lengths. */
static void *read_pairs(PyObject *firsts, PyObject *seconds, PyObject *counts, char ***first, const char ***second,
                        Blocks *blocks, const char *item, const char *count, const char *uneven) {
    const Py_ssize_t items = PyTuple_GET_SIZE(firsts);
    if (PyTuple_GET_SIZE(seconds) != items || PyTuple_GET_SIZE(counts) != items) {
        PyErr_SetString(PyExc_ValueError, uneven);
        return NULL;
    }
    const size_t bytes = (size_t)items * (sizeof(char *) + sizeof(const char *) + sizeof(int64_t)) +
                         (size_t)(items + 1) * sizeof(int64_t);
    void *memory = PyMem_Malloc(bytes);
    if (memory == NULL) return PyErr_NoMemory();
    *first = (char **)memory;
    *second = (const char **)(*first + items);
    blocks->items = items;
    blocks->n = (int64_t *)(*second + items);
    blocks->first = blocks->n + items;
    blocks->first[0] = 0;
    for (Py_ssize_t s = 0; s < items; s++) {
        const unsigned long long a = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(firsts, s));
        const unsigned long long b = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(seconds, s));
        const long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(counts, s));
        if (!PyErr_Occurred() && (n < 0 || (n > 0 && (a == 0 || b == 0))))
            PyErr_Format(PyExc_ValueError, "%s %zd: a negative %s or a null address", item, s, count);
        if (PyErr_Occurred()) {
            PyMem_Free(memory);
            return NULL;
        }
        (*first)[s] = (char *)(uintptr_t)a;
        (*second)[s] = (const char *)(uintptr_t)b;
        blocks_set(blocks, s, (int64_t)n);
    }
    atomic_init(&blocks->next, 0);
    return memory;
}

PyDoc_STRVAR(lerp_doc,
             "lerp(kind, avg_addresses, value_addresses, counts, weight, threads)\n\n"
             "avg[i] = lerp(avg[i], value[i], weight) for i < count, for every (avg, value, count) of the\n"
             "three tuples, torch's formula and bits; kind 0 is float32 into float32, 1 float64 into float64,\n"
             "2 bfloat16 into float32. With threads > 1 the pairs' averages must not overlap one another.\n"
             "The GIL is released, but for one thread's call on fewer elements than GIL_KEPT_ELEMENTS.");

static PyObject *lerp(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    PyObject *avgs, *values, *counts;
    double weight;
    if (!PyArg_ParseTuple(args, "iO!O!O!di", &kind, &PyTuple_Type, &avgs, &PyTuple_Type, &values, &PyTuple_Type,
                          &counts, &weight, &threads))
        return NULL;
    if (kind < 0 || kind >= KINDS) return PyErr_Format(PyExc_ValueError, "kind %d is not one of 0, 1, 2", kind);
    if (threads < 1 || threads > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads %d is outside 1..%d", threads, MAX_THREADS);
    Work work = {kind, weight, NULL, NULL, {0, NULL, NULL, BLOCK_BYTES / (int64_t)AVG_SIZE[kind], 0}};
    void *memory = read_pairs(avgs, values, counts, &work.avg, &work.value, &work.blocks, "pair", "count",
                              "need as many value addresses and counts as average addresses");
    if (memory == NULL) return NULL;
    int64_t elements = 0;
    for (Py_ssize_t s = 0; s < work.blocks.items; s++) elements += work.blocks.n[s];
    if (threads == 1 && elements < GIL_KEPT_ELEMENTS) {
        take_blocks(&work);
    } else {
        Py_BEGIN_ALLOW_THREADS
        run_threads(take_blocks, &work, threads);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(memory);
    Py_RETURN_NONE;
}

/* -- weighted_sum: out = (sum_k w_k x_k) [/ divisor], merging.py's average and linear ------------------ */

#define MAX_INPUTS 256
/* Elements summed in a stack buffer at a time: 256 B of float32 from each input per step, so every
 * input's stream moves on together and the prefetchers keep up with all of them. 1024 (4 KiB from each
 * input in turn) ran 9-18% slower over 8 x 25.6M float32 on the 2-vCPU AMD EPYC VM (24.6-28.0 against
 * 22.4-23.0 ms); 32 and 128 fell between; software prefetching on top only slowed it (docs/perf.md). */
#define TILE 64

/* torch's sequence, one pass: the first term `x0 * w0` (torch.mul), each further term
 * fma(x_k, w_k, acc) (add_ with alpha), then acc / divisor (div_). A tile's inputs are all read before
 * its outputs are written, so `out` may be one of the inputs (the same memory, not an overlap). */
#define DEFINE_SUM(NAME, T, FMA)                                                                            \
    CLONES static void NAME(T *out, const T *const *xs, const T *w, int count, int divide, T divisor,          \
                            int64_t start, int64_t n) {                                                      \
        T acc[TILE];                                                                                         \
        for (int64_t s = start; s < start + n; s += TILE) {                                                  \
            const int64_t len = start + n - s < TILE ? start + n - s : TILE;                                 \
            const T *x0 = xs[0] + s;                                                                         \
            for (int64_t j = 0; j < len; j++) acc[j] = x0[j] * w[0];                                         \
            for (int k = 1; k < count; k++) {                                                                \
                const T *xk = xs[k] + s;                                                                     \
                const T wk = w[k];                                                                           \
                for (int64_t j = 0; j < len; j++) acc[j] = FMA(xk[j], wk, acc[j]);                           \
            }                                                                                                \
            T *o = out + s;                                                                                  \
            if (divide) {                                                                                    \
                for (int64_t j = 0; j < len; j++) o[j] = acc[j] / divisor;                                   \
            } else {                                                                                         \
                for (int64_t j = 0; j < len; j++) o[j] = acc[j];                                             \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_SUM(sum_f32, float, fmaf)
DEFINE_SUM(sum_f64, double, fma)

/* Entries summed from the same inputs' entries with the same weights: entry e writes out[e] from
 * inputs[e * count + k], k < count. */
typedef struct {
    int kind; /* KIND_F32 or KIND_F64 */
    int count;
    int divide;
    double divisor;
    float weights32[MAX_INPUTS];
    double weights64[MAX_INPUTS];
    void **out;
    const void **inputs;
    Blocks blocks;
} SumWork;

static void *take_sum_blocks(void *arg) {
    SumWork *w = (SumWork *)arg;
    Py_ssize_t e = 0;
    int64_t start, len;
    while (next_block(&w->blocks, &e, &start, &len)) {
        const void **xs = w->inputs + e * w->count;
        if (w->kind == KIND_F32)
            sum_f32((float *)w->out[e], (const float *const *)xs, w->weights32, w->count, w->divide,
                    (float)w->divisor, start, len);
        else
            sum_f64((double *)w->out[e], (const double *const *)xs, w->weights64, w->count, w->divide,
                    w->divisor, start, len);
    }
    return NULL;
}

PyDoc_STRVAR(weighted_sum_doc,
             "weighted_sum(kind, out_addresses, input_addresses, weights, counts, divisor, threads)\n\n"
             "out_e[i] = (x0_e[i] * w0 + x1_e[i] * w1 + ...) / divisor for i < counts[e], for every entry e,\n"
             "in torch's order and rounding (mul, then add_ with alpha, then div_); entry e's inputs are\n"
             "input_addresses[e * len(weights):(e + 1) * len(weights)]; divisor 0 leaves the sum undivided.\n"
             "kind 0 is float32, 1 float64. With threads > 1 no entry's result may overlap another entry's\n"
             "tensors. The GIL is released.");

static PyObject *weighted_sum(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    PyObject *outs, *inputs, *weights, *counts;
    double divisor;
    if (!PyArg_ParseTuple(args, "iO!O!O!O!di", &kind, &PyTuple_Type, &outs, &PyTuple_Type, &inputs, &PyTuple_Type,
                          &weights, &PyTuple_Type, &counts, &divisor, &threads))
        return NULL;
    if (kind != KIND_F32 && kind != KIND_F64) return PyErr_Format(PyExc_ValueError, "kind %d is not 0 or 1", kind);
    const Py_ssize_t count = PyTuple_GET_SIZE(weights);
    const Py_ssize_t entries = PyTuple_GET_SIZE(outs);
    if (count < 1 || count > MAX_INPUTS) return PyErr_Format(PyExc_ValueError, "need 1 to %d weights", MAX_INPUTS);
    if (PyTuple_GET_SIZE(counts) != entries || PyTuple_GET_SIZE(inputs) != entries * count)
        return PyErr_Format(PyExc_ValueError, "need a count per result and as many inputs per result as weights");
    if (threads < 1 || threads > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads %d is outside 1..%d", threads, MAX_THREADS);
    /* One allocation: the work, out, inputs, n, first. */
    const size_t bytes = sizeof(SumWork) + (size_t)entries * sizeof(void *) + (size_t)(entries * count) * sizeof(void *) +
                         (size_t)entries * sizeof(int64_t) + (size_t)(entries + 1) * sizeof(int64_t);
    SumWork *work = PyMem_Calloc(1, bytes);
    if (work == NULL) return PyErr_NoMemory();
    work->kind = kind;
    work->count = (int)count;
    work->out = (void **)(work + 1);
    work->inputs = (const void **)(work->out + entries);
    work->blocks.items = entries;
    work->blocks.n = (int64_t *)(work->inputs + entries * count);
    work->blocks.first = work->blocks.n + entries; /* first[0] = 0: calloc */
    work->blocks.block = BLOCK_BYTES / (int64_t)(kind == KIND_F32 ? 4 : 8);
    for (Py_ssize_t k = 0; k < count; k++) {
        const double weight = PyFloat_AsDouble(PyTuple_GET_ITEM(weights, k));
        work->weights64[k] = weight;
        work->weights32[k] = (float)weight;
    }
    for (Py_ssize_t e = 0; e < entries; e++) {
        const unsigned long long out = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(outs, e));
        const long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(counts, e));
        int null = out == 0;
        for (Py_ssize_t k = 0; k < count; k++) {
            const unsigned long long address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(inputs, e * count + k));
            work->inputs[e * count + k] = (const void *)(uintptr_t)address;
            null |= address == 0;
        }
        if (PyErr_Occurred()) {
            PyMem_Free(work);
            return NULL;
        }
        if (n < 0 || (n > 0 && null)) {
            PyMem_Free(work);
            return PyErr_Format(PyExc_ValueError, "result %zd: a negative count or a null address", e);
        }
        work->out[e] = (void *)(uintptr_t)out;
        blocks_set(&work->blocks, e, (int64_t)n);
    }
    if (PyErr_Occurred()) {
        PyMem_Free(work);
        return NULL;
    }
    work->divide = divisor != 0.0;
    work->divisor = divisor;
    atomic_init(&work->blocks.next, 0);
    Py_BEGIN_ALLOW_THREADS
    run_threads(take_sum_blocks, work, threads);
    Py_END_ALLOW_THREADS
    PyMem_Free(work);
    Py_RETURN_NONE;
}

/* weightavg_stream_bytes (client/weightavg/_stream_bytes.h, shared with the client's _copy.c): a copy
 * with streaming stores, so that an upload's 16 MB tensors do not take glibc's cached stores. */
#include "_stream_bytes.h"

#define COPY_BLOCK ((int64_t)1 << 20) /* bytes: a 256 MB copy is 256 blocks for the threads to share */

/* Copies (target, source), bytes; every target apart from every other and from every source. */
typedef struct {
    char **target;
    const char **source;
    Blocks blocks;
} Copies;

static void *take_copy_blocks(void *arg) {
    Copies *c = (Copies *)arg;
    Py_ssize_t s = 0;
    int64_t start, len;
    while (next_block(&c->blocks, &s, &start, &len)) weightavg_stream_bytes(c->target[s] + start, c->source[s] + start, (size_t)len);
    return NULL;
}

PyDoc_STRVAR(copy_doc,
             "copy(target_addresses, source_addresses, sizes, threads) -> None\n\n"
             "Copy sizes[i] bytes from source_addresses[i] to target_addresses[i] for every i, with streaming\n"
             "stores, on `threads` threads sharing 1 MiB blocks; no target may overlap another target or any\n"
             "source. The GIL is released.");

static PyObject *copy(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *targets, *sources, *sizes;
    int threads;
    if (!PyArg_ParseTuple(args, "O!O!O!i", &PyTuple_Type, &targets, &PyTuple_Type, &sources, &PyTuple_Type, &sizes,
                          &threads))
        return NULL;
    if (threads < 1 || threads > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "threads %d is outside 1..%d", threads, MAX_THREADS);
    Copies c = {NULL, NULL, {0, NULL, NULL, COPY_BLOCK, 0}};
    void *memory = read_pairs(targets, sources, sizes, &c.target, &c.source, &c.blocks, "copy", "size",
                              "need as many source addresses and sizes as target addresses");
    if (memory == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (threads == 1) { /* one pass per copy: no blocks to share */
        for (Py_ssize_t s = 0; s < c.blocks.items; s++) weightavg_stream_bytes(c.target[s], c.source[s], (size_t)c.blocks.n[s]);
    } else {
        run_threads(take_copy_blocks, &c, threads);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(memory);
    Py_RETURN_NONE;
}

/* kth_largest_magnitude: TIES's trim threshold, the k-th largest |x| of one contiguous tensor, by radix
 * selection on the bits. With the sign bit cleared, a float's bits order its magnitudes as integers do,
 * +0 at the bottom, then the subnormals, the normal numbers, inf, and every NaN above inf (torch.kthvalue
 * also counts NaN as the largest). Each pass counts the next SELECT_DIGIT bits of the elements whose higher
 * bits are those chosen so far and picks the digit the k-th largest has: 3 passes over a float32 tensor, 6
 * over a float64 one, each a plain read of the tensor. torch.kthvalue over a 1-D tensor runs quickselect on
 * one thread over a copy of the values and an int64 index per element; a TIES merge of 3 x 160 entries of
 * 160K float32 spent 0.72 of its 1.05 s there (docs/perf.md, "TIES"). The counts live on the stack
 * (SELECT_BINS int64, 16 KiB): the call allocates nothing. selection.py checks it against torch.kthvalue at
 * first use, as the other kernels are checked. */
#define SELECT_DIGIT 11
#define SELECT_BINS (1 << SELECT_DIGIT)

#define DEFINE_SELECT(NAME, UT, KEY_BITS)                                                                    \
    CLONES static UT NAME(const UT *x, int64_t n, int64_t k) {                                               \
        const UT magnitude = (((UT)1) << (KEY_BITS)) - 1;                                                    \
        int64_t counts[SELECT_BINS];                                                                         \
        UT prefix = 0; /* the top `done` bits of the k-th largest's key */                                   \
        int done = 0;                                                                                        \
        while (done < (KEY_BITS)) {                                                                          \
            const int width = (KEY_BITS) - done < SELECT_DIGIT ? (KEY_BITS) - done : SELECT_DIGIT;          \
            const int shift = (KEY_BITS) - done - width;                                                     \
            const UT digit = (((UT)1) << width) - 1;                                                         \
            memset(counts, 0, sizeof counts);                                                                \
            if (done == 0) {                                                                                 \
                for (int64_t i = 0; i < n; i++) counts[((x[i] & magnitude) >> shift) & digit]++;             \
            } else {                                                                                         \
                for (int64_t i = 0; i < n; i++) {                                                            \
                    const UT key = x[i] & magnitude;                                                         \
                    if ((key >> (shift + width)) == prefix) counts[(key >> shift) & digit]++;                \
                }                                                                                            \
            }                                                                                                \
            int64_t bin = (int64_t)digit; /* from the top: k counts down the elements above this bin */      \
            while (bin > 0 && counts[bin] < k) k -= counts[bin--];                                           \
            prefix = (prefix << width) | (UT)bin;                                                            \
            done += width;                                                                                   \
        }                                                                                                    \
        return prefix;                                                                                       \
    }

DEFINE_SELECT(select_u32, uint32_t, 31)
DEFINE_SELECT(select_u64, uint64_t, 63)

/* The k-th largest |x| as a double: the float32 value widened exactly, or the float64 value. */
static double select_value(int kind, const void *x, int64_t n, int64_t k) {
    if (kind == KIND_F32) {
        const uint32_t bits = select_u32((const uint32_t *)x, n, k);
        float f;
        memcpy(&f, &bits, sizeof f);
        return (double)f;
    }
    const uint64_t bits = select_u64((const uint64_t *)x, n, k);
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

PyDoc_STRVAR(kth_largest_magnitude_doc,
             "kth_largest_magnitude(kind, address, count, k) -> float\n\n"
             "The k-th largest |x| (1 <= k <= count) of the count contiguous elements at address, NaN counted\n"
             "above inf (any NaN comes back as a NaN); kind 0 is float32, 1 float64. The GIL is released for a\n"
             "large tensor.");

static PyObject *kth_largest_magnitude(PyObject *self, PyObject *args) {
    (void)self;
    int kind;
    unsigned long long address;
    long long n, k;
    if (!PyArg_ParseTuple(args, "iKLL", &kind, &address, &n, &k)) return NULL;
    if (kind != KIND_F32 && kind != KIND_F64) return PyErr_Format(PyExc_ValueError, "kind %d is not 0 or 1", kind);
    if (address == 0 || n < 1 || k < 1 || k > n)
        return PyErr_Format(PyExc_ValueError, "need a tensor of at least one element and 1 <= k <= count");
    const void *x = (const void *)(uintptr_t)address;
    double value;
    if (n < GIL_KEPT_ELEMENTS) {
        value = select_value(kind, x, (int64_t)n, (int64_t)k);
    } else {
        Py_BEGIN_ALLOW_THREADS
        value = select_value(kind, x, (int64_t)n, (int64_t)k);
        Py_END_ALLOW_THREADS
    }
    return PyFloat_FromDouble(value);
}

/* zero_below: TIES's trim, x[i] = +0 where |x[i]| < threshold, in one pass: torch's way is abs into a
 * buffer, lt into a bool mask, then masked_fill_, whose loop over a bool mask ran at about 1.4 G elements
 * a second on two threads (0.14 ms of every 160K-element delta, twice per model and entry). A NaN is not
 * below anything and stays as it is, as masked_fill_ leaves it. */
#define DEFINE_ZERO_BELOW(NAME, T, ABS)                                                                      \
    CLONES static void NAME(T *x, int64_t n, T threshold) {                                                  \
        for (int64_t i = 0; i < n; i++) x[i] = ABS(x[i]) < threshold ? (T)0 : x[i];                          \
    }

DEFINE_ZERO_BELOW(zero_below_f32, float, fabsf)
DEFINE_ZERO_BELOW(zero_below_f64, double, fabs)

PyDoc_STRVAR(zero_below_doc,
             "zero_below(kind, address, count, threshold) -> None\n\n"
             "x[i] = +0.0 wherever |x[i]| < threshold for the count contiguous elements at address (NaN stays);\n"
             "kind 0 is float32 (the threshold rounded to float32), 1 float64. The GIL is released for a large\n"
             "tensor.");

static PyObject *zero_below(PyObject *self, PyObject *args) {
    (void)self;
    int kind;
    unsigned long long address;
    long long n;
    double threshold;
    if (!PyArg_ParseTuple(args, "iKLd", &kind, &address, &n, &threshold)) return NULL;
    if (kind != KIND_F32 && kind != KIND_F64) return PyErr_Format(PyExc_ValueError, "kind %d is not 0 or 1", kind);
    if (n < 0 || (n > 0 && address == 0)) return PyErr_Format(PyExc_ValueError, "a negative count or a null address");
    void *x = (void *)(uintptr_t)address;
    if (n < GIL_KEPT_ELEMENTS) {
        if (kind == KIND_F32) zero_below_f32((float *)x, (int64_t)n, (float)threshold);
        else zero_below_f64((double *)x, (int64_t)n, threshold);
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    if (kind == KIND_F32) zero_below_f32((float *)x, (int64_t)n, (float)threshold);
    else zero_below_f64((double *)x, (int64_t)n, threshold);
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

#define MAX_GUARDED 1024

/* A guarded range [start, end): free while end == 0. Slots are claimed and freed under the GIL; the
 * handler reads them lock-free (atomics), in any thread. */
typedef struct {
    _Atomic uintptr_t start, end;
    atomic_int broken;
} Guarded;

static Guarded guarded[MAX_GUARDED];
static struct sigaction before_guard;
static int guard_installed;
static uintptr_t page_bytes;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    /* si_addr is the faulting address only for a fault the kernel raised (si_code > 0), not for a
     * signal sent with kill or raise. */
    if (info != NULL && info->si_code > 0) {
        const uintptr_t address = (uintptr_t)info->si_addr;
        for (int i = 0; i < MAX_GUARDED; i++) {
            const uintptr_t end = atomic_load(&guarded[i].end);
            if (end == 0 || address >= end || address < atomic_load(&guarded[i].start)) continue;
            void *page = (void *)(address & ~(page_bytes - 1));
            /* mmap is a plain system call here: it takes no lock the interrupted thread may hold. */
            if (mmap(page, page_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
                atomic_store(&guarded[i].broken, 1);
                return; /* the faulting instruction runs again, on the private page */
            }
            break;
        }
    }
    if (before_guard.sa_flags & SA_SIGINFO) {
        if (before_guard.sa_sigaction != NULL) {
            before_guard.sa_sigaction(sig, info, context);
            return;
        }
    } else if (before_guard.sa_handler != SIG_DFL && before_guard.sa_handler != SIG_IGN) {
        before_guard.sa_handler(sig);
        return;
    }
    /* The default action (an ignored SIGBUS from a fault would fault again forever): restore it; the
     * faulting instruction runs again and the process ends as it would have without this handler. */
    signal(SIGBUS, SIG_DFL);
    if (info == NULL || info->si_code <= 0) raise(SIGBUS);
}

PyDoc_STRVAR(guard_doc,
             "guard(address, nbytes) -> int\n\n"
             "Guard [address, address + nbytes) against SIGBUS (a shared memory region's mapping); the slot to\n"
             "pass to guard_broken and unguard. Installs the handler at the first call. Raises OSError when the\n"
             "handler cannot be installed, RuntimeError when every slot is taken.");

static PyObject *guard(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, nbytes;
    if (!PyArg_ParseTuple(args, "KK", &address, &nbytes)) return NULL;
    if (!guard_installed) {
        page_bytes = (uintptr_t)sysconf(_SC_PAGESIZE);
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_sigbus;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&action.sa_mask);
        if (sigaction(SIGBUS, &action, &before_guard) != 0) return PyErr_SetFromErrno(PyExc_OSError);
        guard_installed = 1;
    }
    for (int i = 0; i < MAX_GUARDED; i++) {
        if (atomic_load(&guarded[i].end) != 0) continue;
        atomic_store(&guarded[i].broken, 0);
        atomic_store(&guarded[i].start, (uintptr_t)address);
        atomic_store(&guarded[i].end, (uintptr_t)(address + nbytes));
        return PyLong_FromLong(i);
    }
    PyErr_SetString(PyExc_RuntimeError, "every guarded range is taken");
    return NULL;
}

static int slot_of(PyObject *args, int *slot) {
    if (!PyArg_ParseTuple(args, "i", slot)) return 0;
    if (*slot < 0 || *slot >= MAX_GUARDED) {
        PyErr_SetString(PyExc_ValueError, "no such guarded range");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(guard_broken_doc, "guard_broken(slot) -> bool\n\nWhether a fault in the range was caught since it was guarded.");

static PyObject *guard_broken(PyObject *self, PyObject *args) {
    (void)self;
    int slot;
    if (!slot_of(args, &slot)) return NULL;
    return PyBool_FromLong(atomic_load(&guarded[slot].broken));
}

PyDoc_STRVAR(unguard_doc, "unguard(slot)\n\nStop guarding the range (before its mapping goes).");

static PyObject *unguard(PyObject *self, PyObject *args) {
    (void)self;
    int slot;
    if (!slot_of(args, &slot)) return NULL;
    atomic_store(&guarded[slot].end, 0);
    atomic_store(&guarded[slot].start, 0);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"guard", guard, METH_VARARGS, guard_doc},
    {"guard_broken", guard_broken, METH_VARARGS, guard_broken_doc},
    {"unguard", unguard, METH_VARARGS, unguard_doc},
    {"lerp", lerp, METH_VARARGS, lerp_doc},
    {"weighted_sum", weighted_sum, METH_VARARGS, weighted_sum_doc},
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS, advise_doc},
    {"copy", copy, METH_VARARGS, copy_doc},
    {"start_cpus", start_cpus, METH_VARARGS, start_cpus_doc},
    {"kth_largest_magnitude", kth_largest_magnitude, METH_VARARGS, kth_largest_magnitude_doc},
    {"zero_below", zero_below, METH_VARARGS, zero_below_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "weightavg's native helpers: fused CPU lerp and weighted sum, huge-page advice, streaming copies, SIGBUS guards.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
