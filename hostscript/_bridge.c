/*
 * _bridge.c — the hot-path calls from Python into the core, written against the
 * CPython API because cffi releases the GIL around every call.
 *
 * Releasing the GIL for every short call makes threads that fire short hooks queue
 * for it on each return (two threads reached ~0.75x of one: the GIL convoy). So
 * fire, and the transaction calls a request makes around it (create, load, read
 * a field), run here with the GIL held. The GIL is given up only when Lua runs
 * long: the core calls release_gil() before a hook whose recent fires on this
 * thread ran long, or from the time-limit hook once a fire passes the threshold;
 * it is taken back here when hs_fire returns. Long handlers run in parallel; short
 * ones never pay for a hand-over.
 *
 * A Bridge holds the addresses of one engine module's functions (taken from cffi),
 * so this module is built once and serves both engines.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

typedef int (*fire_fn)(void *host, int hook, void *txn);
typedef void *(*txn_new_fn)(void);
typedef void (*txn_free_fn)(void *txn);
typedef int (*txn_load_fn)(void *t, unsigned what, const char *method, size_t mlen,
                           const char *uri, size_t ulen, int status, const char *body, size_t blen,
                           const char *req, size_t reqlen, const char *resp, size_t resplen,
                           const char *ctx, size_t ctxlen);
typedef const char *(*txn_field_fn)(void *t, int field, size_t *len);
typedef int (*txn_status_fn)(const void *t);

static __thread PyThreadState *released; /* set while this thread runs Lua without the GIL */

static void release_gil(void) {
    if (!released) released = PyEval_SaveThread();
}

typedef struct {
    PyObject_HEAD
    fire_fn fire;
    txn_new_fn txn_new;
    txn_free_fn txn_free;
    txn_load_fn txn_load;
    txn_field_fn txn_field;
    txn_status_fn txn_status;
} Bridge;

static int check_args(Py_ssize_t n, Py_ssize_t want, const char *sig) {
    if (n == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", sig, want, n);
    return -1;
}

/* fire(host_address, hook_index, txn_address) -> hs_fire's result */
static PyObject *Bridge_fire(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    Bridge *b = (Bridge *)self;
    if (check_args(n, 3, "fire(host, hook, txn)")) return NULL;
    void *host = PyLong_AsVoidPtr(args[0]);
    long hook = PyLong_AsLong(args[1]);
    void *txn = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred()) return NULL;
    int r = b->fire(host, (int)hook, txn);
    if (released) {
        PyEval_RestoreThread(released);
        released = NULL;
    }
    return PyLong_FromLong(r);
}

static PyObject *Bridge_txn_new(PyObject *self, PyObject *unused) {
    (void)unused;
    void *t = ((Bridge *)self)->txn_new();
    if (!t) return PyErr_NoMemory();
    return PyLong_FromVoidPtr(t);
}

static PyObject *Bridge_txn_free(PyObject *self, PyObject *addr) {
    void *t = PyLong_AsVoidPtr(addr);
    if (PyErr_Occurred()) return NULL;
    if (t) ((Bridge *)self)->txn_free(t);
    Py_RETURN_NONE;
}

/* bytes or None -> pointer and length */
static int as_bytes(PyObject *o, const char **p, Py_ssize_t *n) {
    if (o == Py_None) {
        *p = "";
        *n = 0;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "transaction fields cross as bytes");
        return -1;
    }
    *p = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

/* txn_load(txn, what, method, uri, status, body, req_headers, resp_headers, ctx) */
static PyObject *Bridge_txn_load(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (check_args(n, 9, "txn_load(txn, what, method, uri, status, body, req, resp, ctx)")) return NULL;
    void *t = PyLong_AsVoidPtr(args[0]);
    unsigned long what = PyLong_AsUnsignedLong(args[1]);
    long status = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    const char *m, *u, *body, *req, *resp, *ctx;
    Py_ssize_t ml, ul, bl, rql, rsl, cl;
    if (as_bytes(args[2], &m, &ml) || as_bytes(args[3], &u, &ul) || as_bytes(args[5], &body, &bl) ||
        as_bytes(args[6], &req, &rql) || as_bytes(args[7], &resp, &rsl) || as_bytes(args[8], &ctx, &cl))
        return NULL;
    if (((Bridge *)self)->txn_load(t, (unsigned)what, m, (size_t)ml, u, (size_t)ul, (int)status, body,
                                   (size_t)bl, req, (size_t)rql, resp, (size_t)rsl, ctx, (size_t)cl))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* txn_field(txn, HS_T_*) -> bytes */
static PyObject *Bridge_txn_field(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (check_args(n, 2, "txn_field(txn, field)")) return NULL;
    void *t = PyLong_AsVoidPtr(args[0]);
    long field = PyLong_AsLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    size_t len = 0;
    const char *p = ((Bridge *)self)->txn_field(t, (int)field, &len);
    return PyBytes_FromStringAndSize(p, (Py_ssize_t)len);
}

static PyObject *Bridge_txn_status(PyObject *self, PyObject *addr) {
    void *t = PyLong_AsVoidPtr(addr);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLong(((Bridge *)self)->txn_status(t));
}

static PyMethodDef Bridge_methods[] = {
    {"fire", (PyCFunction)(void (*)(void))Bridge_fire, METH_FASTCALL,
     "fire(host_address, hook_index, txn_address) -> hs_fire's result (GIL kept unless Lua runs long)"},
    {"txn_new", Bridge_txn_new, METH_NOARGS, "txn_new() -> address of a new transaction"},
    {"txn_free", Bridge_txn_free, METH_O, "txn_free(address)"},
    {"txn_load", (PyCFunction)(void (*)(void))Bridge_txn_load, METH_FASTCALL,
     "txn_load(txn, what, method, uri, status, body, req_headers, resp_headers, ctx)"},
    {"txn_field", (PyCFunction)(void (*)(void))Bridge_txn_field, METH_FASTCALL,
     "txn_field(txn, field) -> bytes"},
    {"txn_status", Bridge_txn_status, METH_O, "txn_status(txn) -> int"},
    {NULL, NULL, 0, NULL}};

static PyObject *Bridge_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *o[6];
    (void)kw;
    if (!PyArg_ParseTuple(args, "(OOOOOO):Bridge", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5]))
        return NULL;
    void *p[6];
    for (int i = 0; i < 6; i++) {
        p[i] = PyLong_AsVoidPtr(o[i]);
        if (PyErr_Occurred()) return NULL;
        if (!p[i]) {
            PyErr_SetString(PyExc_ValueError, "Bridge needs six function addresses");
            return NULL;
        }
    }
    Bridge *b = (Bridge *)type->tp_alloc(type, 0);
    if (!b) return NULL;
    b->fire = (fire_fn)p[0];
    b->txn_new = (txn_new_fn)p[1];
    b->txn_free = (txn_free_fn)p[2];
    b->txn_load = (txn_load_fn)p[3];
    b->txn_field = (txn_field_fn)p[4];
    b->txn_status = (txn_status_fn)p[5];
    return (PyObject *)b;
}

static PyTypeObject BridgeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript._bridge.Bridge",
    .tp_basicsize = sizeof(Bridge),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bridge((hs_fire, hs_txn_new, hs_txn_free, hs_txn_load, hs_txn_field, hs_txn_status))",
    .tp_new = Bridge_new,
    .tp_methods = Bridge_methods,
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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostscript._bridge", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bridge(void) {
    if (PyType_Ready(&BridgeType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&BridgeType);
    if (PyModule_AddObject(m, "Bridge", (PyObject *)&BridgeType) < 0) {
        Py_DECREF(&BridgeType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
