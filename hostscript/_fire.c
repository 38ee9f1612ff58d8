/*
 * _fire.c — the Python entry point of hs_fire, written against the CPython API
 * because cffi always releases the GIL around a call.
 *
 * Releasing the GIL for every short fire makes threads that fire short hooks
 * queue for it on each return (two threads reach ~0.75x of one: the GIL convoy).
 * So a Firer calls hs_fire with the GIL held, and the core calls release_gil()
 * only when a fire runs long (its hook ran long recently on this thread, or the
 * time-limit hook sees it pass the threshold); the GIL is taken back here once
 * hs_fire returns. Long handlers thus run in parallel, short ones never pay for
 * a hand-over.
 *
 * The Firer is engine-agnostic: it is given the address of the engine module's
 * hs_fire and of the host, both taken from cffi.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

typedef int (*fire_fn)(void *host, int hook, void *txn);

static __thread PyThreadState *released; /* set while this thread runs Lua without the GIL */

static void release_gil(void) {
    if (!released) released = PyEval_SaveThread();
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    fire_fn fire;
    void *host;
} Firer;

static PyObject *Firer_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Firer *f = (Firer *)self;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames) {
        PyErr_SetString(PyExc_TypeError, "Firer(hook_index, txn_address)");
        return NULL;
    }
    long hook = PyLong_AsLong(args[0]);
    void *txn = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return NULL;
    int r = f->fire(f->host, (int)hook, txn);
    if (released) {
        PyEval_RestoreThread(released);
        released = NULL;
    }
    return PyLong_FromLong(r);
}

static PyObject *Firer_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *fire, *host;
    if (!PyArg_ParseTuple(args, "OO:Firer", &fire, &host)) return NULL;
    void *fp = PyLong_AsVoidPtr(fire), *hp = PyLong_AsVoidPtr(host);
    if (PyErr_Occurred()) return NULL;
    if (!fp || !hp) {
        PyErr_SetString(PyExc_ValueError, "Firer needs the addresses of hs_fire and of a host");
        return NULL;
    }
    Firer *f = (Firer *)type->tp_alloc(type, 0);
    if (!f) return NULL;
    f->vectorcall = Firer_call;
    f->fire = (fire_fn)fp;
    f->host = hp;
    return (PyObject *)f;
}

static PyTypeObject FirerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript._fire.Firer",
    .tp_basicsize = sizeof(Firer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Firer(hs_fire_address, host_address)(hook_index, txn_address) -> hs_fire's result",
    .tp_new = Firer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Firer, vectorcall),
};

static PyObject *release_address(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromVoidPtr((void *)release_gil);
}

static PyMethodDef methods[] = {
    {"release_address", release_address, METH_NOARGS,
     "Address of the function the core calls to release the GIL while Lua runs long."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostscript._fire", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fire(void) {
    if (PyType_Ready(&FirerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FirerType);
    if (PyModule_AddObject(m, "Firer", (PyObject *)&FirerType) < 0) {
        Py_DECREF(&FirerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
