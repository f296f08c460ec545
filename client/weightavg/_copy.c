/* weightavg._copy: the client's one compiled helper, optional (setup.py builds it where a C compiler
 * is found; _shm.py copies with numpy otherwise, the same bytes).
 *
 * copy: an upload's copies into the client's shared memory region with streaming stores
 * (_stream_bytes.h), on the calling thread, without the GIL. _shm.write hands each of its copy threads
 * its share of the runs; the threads stay Python's (one pool a process, started once), so that no
 * thread of this module starts on its creator's CPU and waits there (docs/perf.md, "Threads that
 * started on their creator's CPU"). A 256 MB upload of a model's 16 MB tensors was copied in 22-25 ms
 * with numpy on the project's 2-vCPU VM, 13-16 ms this way (docs/perf.md, "Streaming stores in the
 * client"). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_stream_bytes.h"

/* Copies under this many bytes take memcpy: their lines may still be read from the cache, and a
 * streamed copy pays for its unaligned ends. */
#define STREAM_MIN_BYTES ((Py_ssize_t)1 << 18)

/* The address or size at `i` of a tuple of ints, into *out: 0 with an exception set when it is not
 * a non-negative int that fits. */
static int read_size(PyObject *tuple, Py_ssize_t i, const char *what, uintptr_t *out) {
    PyObject *item = PyTuple_GET_ITEM(tuple, i);
    if (!PyLong_Check(item)) {
        PyErr_Format(PyExc_TypeError, "%s %zd is not an int", what, i);
        return 0;
    }
    const unsigned long long value = PyLong_AsUnsignedLongLong(item);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s %zd is negative or too large", what, i);
        return 0;
    }
    if (value > (unsigned long long)UINTPTR_MAX || value > (unsigned long long)PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError, "%s %zd is too large", what, i);
        return 0;
    }
    *out = (uintptr_t)value;
    return 1;
}

PyDoc_STRVAR(copy_doc,
             "copy(target_addresses, source_addresses, sizes, /) -> None\n\n"
             "Copy sizes[i] bytes from source_addresses[i] to target_addresses[i] for every i, on this thread,\n"
             "without the GIL; streaming stores for copies of 256 KiB or more. The caller holds the memory for\n"
             "the call and vouches that no target overlaps another or any source.");

static PyObject *copy(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *targets, *sources, *sizes;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyTuple_Type, &targets, &PyTuple_Type, &sources, &PyTuple_Type, &sizes))
        return NULL;
    const Py_ssize_t count = PyTuple_GET_SIZE(targets);
    if (PyTuple_GET_SIZE(sources) != count || PyTuple_GET_SIZE(sizes) != count)
        return PyErr_Format(PyExc_ValueError, "copy: need as many source addresses and sizes as target addresses");
    uintptr_t *memory = PyMem_Malloc(sizeof(uintptr_t) * 3 * (size_t)(count ? count : 1));
    if (memory == NULL) return PyErr_NoMemory();
    uintptr_t *target = memory, *source = memory + count, *size = memory + 2 * count;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!read_size(targets, i, "target address", &target[i]) || !read_size(sources, i, "source address", &source[i]) ||
            !read_size(sizes, i, "size", &size[i])) {
            PyMem_Free(memory);
            return NULL;
        }
        if (size[i] != 0 && (target[i] == 0 || source[i] == 0)) {
            PyMem_Free(memory);
            return PyErr_Format(PyExc_ValueError, "copy %zd of %zu bytes has a null address", i, (size_t)size[i]);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        if ((Py_ssize_t)size[i] >= STREAM_MIN_BYTES)
            weightavg_stream_bytes((char *)target[i], (const char *)source[i], (size_t)size[i]);
        else
            memcpy((void *)target[i], (const void *)source[i], (size_t)size[i]);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(memory);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS, copy_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copy", "weightavg's client-side copies into shared memory, with streaming stores.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copy(void) { return PyModule_Create(&module); }
