/*
 * _bridge.c — the hot path from Python into the core, written against the
 * CPython API: Host.fire (HostCore, the C base of hostscript.Host) and the
 * Transaction types (_transaction.c), compiled once for both engines.
 *
 * Why not cffi for these: cffi releases the GIL around every call, and releasing
 * it for every short call makes threads that fire short hooks queue for it on each
 * return (two threads reached ~0.75x of one: the GIL convoy). So fire runs here
 * with the GIL held. The GIL is given up only when Lua runs long: the core calls
 * release_gil() before a hook whose recent fires on this thread ran long, or from
 * the time-limit hook once a fire passes the threshold; it is taken back here when
 * hs_fire returns. Long handlers run in parallel; short ones never pay a hand-over.
 *
 * The engine modules (cffi, hostscript._lua54 / _luajit) hand over the address of
 * their hs_fire; its type comes from native/hostscript.h, so the binding and the
 * core share one ABI.
 */
#include "_bridge.h"

#include <stddef.h>
#include <stdint.h>

typedef __typeof__(hs_fire) *hs_fire_fn;

PyObject *Hs_Error, *Hs_UsageError, *Hs_ArgumentTypeError, *Hs_BusyError, *Hs_ClosedError;

static __thread PyThreadState *released; /* set while this thread runs Lua without the GIL */

static void release_gil(void) {
    if (!released) released = PyEval_SaveThread();
}

/* ---- HostCore: the C half of hostscript.Host ---- */

typedef struct {
    PyObject_HEAD
    hs_fire_fn fire;
    hs_host *host;      /* NULL until bound, and once closed */
    PyObject *hooks;    /* dict: hook name -> index */
    PyObject *out[2];   /* the Outcome objects for HS_CONTINUE, HS_DONE */
    PyObject *finish;   /* (result, hook, txn) -> Outcome: errors and log records */
    Py_ssize_t inflight; /* fires between their call and their return; under the GIL */
} HostCore;

static int undeclared_hook(HostCore *self, PyObject *hook) {
    if (!PyUnicode_Check(hook)) {
        PyErr_Format(Hs_ArgumentTypeError, "a hook name must be str, not %s", Py_TYPE(hook)->tp_name);
        return -1;
    }
    PyObject *sep = PyUnicode_FromString(", ");
    PyObject *names = sep ? PyUnicode_Join(sep, self->hooks) : NULL;
    if (names) PyErr_Format(Hs_UsageError, "undeclared hook %R (declared: %U)", hook, names);
    Py_XDECREF(sep);
    Py_XDECREF(names);
    return -1;
}

/* fire(hook, txn) given with keywords: put them in order in ARGV. */
static int fire_keywords(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **argv) {
    static const char *const names[2] = {"hook", "txn"};
    argv[0] = nargs > 0 ? args[0] : NULL;
    argv[1] = nargs > 1 ? args[1] : NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        int j = PyUnicode_CompareWithASCIIString(k, names[0]) == 0   ? 0
                : PyUnicode_CompareWithASCIIString(k, names[1]) == 0 ? 1
                                                                     : -1;
        if (j < 0 || argv[j]) {
            PyErr_Format(Hs_ArgumentTypeError, "fire() got %s argument %R",
                         j < 0 ? "an unexpected keyword" : "multiple values for", k);
            return -1;
        }
        argv[j] = args[nargs + i];
    }
    return 0;
}

static PyObject *HostCore_fire(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    HostCore *self = (HostCore *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *argv[2];
    if (kwnames && PyTuple_GET_SIZE(kwnames)) {
        if (fire_keywords(args, nargs, kwnames, argv)) return NULL;
        args = argv;
        nargs = (argv[0] != NULL) + (argv[1] != NULL);
    }
    if (nargs != 2) {
        PyErr_Format(Hs_ArgumentTypeError, "fire(hook, txn) takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!self->host) {
        PyErr_SetString(Hs_ClosedError, "the host is closed");
        return NULL;
    }
    if (!PyObject_TypeCheck(args[1], &Hs_TransactionType)) {
        PyErr_Format(Hs_ArgumentTypeError, "fire() needs a hostscript.Transaction, not %s",
                     Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    PyObject *idx = PyUnicode_CheckExact(args[0]) ? PyDict_GetItemWithError(self->hooks, args[0]) : NULL;
    if (!idx) {
        if (!PyErr_Occurred()) undeclared_hook(self, args[0]);
        return NULL;
    }
    int hook = (int)PyLong_AsLong(idx);
    TxnObject *txn = (TxnObject *)args[1];
    if (hs_py_txn_check_free(txn->t)) return NULL;
    if (txn->ctx) {
        /* Sending ctx may run Python code (a subclass's __iter__, a finalizer): the
         * host may be closed and another fire may have started on txn meanwhile. */
        if (hs_py_txn_flush_ctx(txn) || hs_py_txn_check_free(txn->t)) return NULL;
        if (!self->host) {
            PyErr_SetString(Hs_ClosedError, "the host is closed");
            return NULL;
        }
    }
    self->inflight++; /* close() waits for this to drop back (no free under a running fire) */
    int r = self->fire(self->host, hook, txn->t);
    if (released) { /* the core let go of the GIL while Lua ran long */
        PyEval_RestoreThread(released);
        released = NULL;
    }
    if (!(r & (HS_ERROR | (HS_CH_LOGS | HS_CH_PROGRAM) << 2))) {
        self->inflight--;
        PyObject *o = self->out[r & HS_DONE];
        Py_INCREF(o);
        return o;
    }
    /* finish reads this thread's error and log records from the host: the fire is
     * not over for close() until it has */
    PyObject *rr = PyLong_FromLong(r);
    PyObject *fargs[3] = {rr, args[0], args[1]};
    PyObject *res = rr ? PyObject_Vectorcall(self->finish, fargs, 3, NULL) : NULL;
    Py_XDECREF(rr);
    self->inflight--;
    return res;
}

/* _bind(host_address, fire_address, hooks, continue, done, finish) */
static PyObject *HostCore_bind(PyObject *op, PyObject *const *args, Py_ssize_t nargs) {
    HostCore *self = (HostCore *)op;
    if (nargs != 6 || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "_bind(host, fire, hooks: dict, continue, done, finish)");
        return NULL;
    }
    void *host = PyLong_AsVoidPtr(args[0]), *fire = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return NULL;
    self->host = host;
    self->fire = (hs_fire_fn)fire;
    PyObject *keep[4] = {args[2], args[3], args[4], args[5]};
    for (int i = 0; i < 4; i++) Py_INCREF(keep[i]);
    Py_XSETREF(self->hooks, keep[0]);
    Py_XSETREF(self->out[0], keep[1]);
    Py_XSETREF(self->out[1], keep[2]);
    Py_XSETREF(self->finish, keep[3]);
    Py_RETURN_NONE;
}

static PyObject *HostCore_unbind(PyObject *op, PyObject *unused) {
    (void)unused;
    ((HostCore *)op)->host = NULL; /* the host is closing: fire raises ClosedError from now on */
    Py_RETURN_NONE;
}

static PyObject *HostCore_get_inflight(PyObject *op, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(((HostCore *)op)->inflight);
}

static PyGetSetDef HostCore_getset[] = {
    {"_inflight", HostCore_get_inflight, NULL, "fires running now (close waits for them)", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static int HostCore_traverse(PyObject *op, visitproc visit, void *arg) {
    HostCore *self = (HostCore *)op;
    Py_VISIT(self->hooks);
    Py_VISIT(self->out[0]);
    Py_VISIT(self->out[1]);
    Py_VISIT(self->finish);
    return 0;
}

static int HostCore_clear(PyObject *op) {
    HostCore *self = (HostCore *)op;
    self->host = NULL;
    Py_CLEAR(self->hooks);
    Py_CLEAR(self->out[0]);
    Py_CLEAR(self->out[1]);
    Py_CLEAR(self->finish);
    return 0;
}

/* A Python subclass (Host) gets subtype_dealloc, which clears weak references and
 * drops the type's reference before and after this. */
static void HostCore_dealloc(PyObject *op) {
    PyObject_GC_UnTrack(op);
    HostCore_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMethodDef HostCore_methods[] = {
    {"fire", (PyCFunction)(void (*)(void))HostCore_fire, METH_FASTCALL | METH_KEYWORDS,
     "fire($self, hook, txn)\n--\n\n"
     "Run the handlers of HOOK for TXN in the calling thread's own Lua state; returns an "
     "Outcome (CONTINUE, DONE, or ERROR with .error). Raises UsageError for an undeclared "
     "hook, ClosedError once the host is closed, BusyError when a fire already runs on TXN."},
    {"_bind", (PyCFunction)(void (*)(void))HostCore_bind, METH_FASTCALL, NULL},
    {"_unbind", HostCore_unbind, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject HostCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript._bridge.HostCore",
    .tp_basicsize = sizeof(HostCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C half of hostscript.Host: fire().",
    .tp_new = PyType_GenericNew,
    .tp_traverse = HostCore_traverse,
    .tp_clear = HostCore_clear,
    .tp_dealloc = HostCore_dealloc,
    .tp_methods = HostCore_methods,
    .tp_getset = HostCore_getset,
};

/* ---- module ---- */

static PyObject *release_address(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromVoidPtr((void *)release_gil);
}

static PyObject *ctx_decode(PyObject *self, PyObject *data) {
    (void)self;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(Hs_ArgumentTypeError, "ctx_decode needs bytes");
        return NULL;
    }
    return hs_py_ctx_decode(PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
}

static PyMethodDef methods[] = {
    {"release_address", release_address, METH_NOARGS,
     "Address of the function the core calls to release the GIL while Lua runs long."},
    {"ctx_decode", ctx_decode, METH_O, "ctx_decode(data: bytes) -> dict: ctx data as Python (tests)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostscript._bridge", NULL, -1, methods};

static int fetch_errors(void) {
    PyObject *errors = PyImport_ImportModule("hostscript.errors");
    if (!errors) return -1;
    struct { PyObject **slot; const char *name; } want[] = {
        {&Hs_Error, "Error"}, {&Hs_UsageError, "UsageError"},
        {&Hs_ArgumentTypeError, "ArgumentTypeError"}, {&Hs_BusyError, "BusyError"},
        {&Hs_ClosedError, "ClosedError"}};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!(*want[i].slot = PyObject_GetAttrString(errors, want[i].name))) {
            Py_DECREF(errors);
            return -1;
        }
    Py_DECREF(errors);
    return 0;
}

PyMODINIT_FUNC PyInit__bridge(void) {
    if (fetch_errors() < 0 || PyType_Ready(&HostCoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "HostCore", (PyObject *)&HostCoreType) < 0 || hs_py_types_ready(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
