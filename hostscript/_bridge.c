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
#include <stdint.h>
#include <string.h>
#include <structmember.h>

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

/* ---- TxnBase: the fields of a Transaction the fast path reads ----
 * hostscript.Transaction derives from it, so HostFire can tell from C whether the
 * transaction is bound to this engine and has nothing to push. */

typedef struct {
    PyObject_HEAD
    unsigned long addr;  /* the C transaction, 0 before the first fire */
    PyObject *engine;    /* the Engine addr belongs to, or NULL */
    unsigned int dirty;  /* HS_CH_* bits Python changed and has not pushed */
    unsigned int stale;  /* HS_CH_* bits Lua changed and Python has not pulled */
} TxnBase;

static PyMemberDef TxnBase_members[] = {
    {"_addr", T_ULONG, offsetof(TxnBase, addr), 0, NULL},
    {"_engine", T_OBJECT, offsetof(TxnBase, engine), 0, NULL},
    {"_dirty", T_UINT, offsetof(TxnBase, dirty), 0, NULL},
    {"_stale", T_UINT, offsetof(TxnBase, stale), 0, NULL},
    {NULL, 0, 0, 0, NULL}};

static void TxnBase_dealloc(PyObject *self) {
    Py_CLEAR(((TxnBase *)self)->engine);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject TxnBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript._bridge.TxnBase",
    .tp_basicsize = sizeof(TxnBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base of hostscript.Transaction: the fields Host.fire reads from C.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = TxnBase_dealloc,
    .tp_members = TxnBase_members,
};

/* ---- HostFire: Host.fire for the common case, in C ----
 * fire(hook, txn) with a declared hook and a transaction that is bound to this
 * engine and has nothing to push: call hs_fire and return the shared Outcome for
 * CONTINUE/DONE. A transaction to push first, a closed host or bad arguments go to
 * Host's Python code (which pushes, then calls back here); errors and log records
 * go to Host._finish. This is the only place hs_fire is called from Python. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    fire_fn fire;
    void *host;         /* NULL once the host is closed */
    PyObject *engine;
    PyObject *hooks;    /* dict: hook name -> index */
    PyObject *out[2];   /* Outcome CONTINUE, DONE */
    PyObject *slow;     /* Python: (hook, txn) -> Outcome */
    PyObject *finish;   /* Python: (result, hook, txn) -> Outcome */
} HostFire;

static PyObject *HostFire_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kw) {
    HostFire *f = (HostFire *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != 2 || kw || !f->host || !PyObject_TypeCheck(args[1], &TxnBaseType))
        return PyObject_Vectorcall(f->slow, args, nargsf, kw);
    TxnBase *t = (TxnBase *)args[1];
    if (t->engine != f->engine || t->dirty) return PyObject_Vectorcall(f->slow, args, nargsf, kw);
    PyObject *idx = PyDict_GetItemWithError(f->hooks, args[0]);
    if (!idx) {
        if (PyErr_Occurred()) return NULL;
        return PyObject_Vectorcall(f->slow, args, nargsf, kw);
    }
    int r = f->fire(f->host, (int)PyLong_AsLong(idx), (void *)t->addr);
    if (released) { /* the core let go of the GIL while Lua ran long */
        PyEval_RestoreThread(released);
        released = NULL;
    }
    if (!(r & 0x202)) { /* neither an error nor log records */
        t->stale |= (unsigned)r >> 2;
        PyObject *o = f->out[r & 1];
        Py_INCREF(o);
        return o;
    }
    PyObject *rr = PyLong_FromLong(r);
    if (!rr) return NULL;
    PyObject *fargs[3] = {rr, args[0], args[1]};
    PyObject *res = PyObject_Vectorcall(f->finish, fargs, 3, NULL);
    Py_DECREF(rr);
    return res;
}

static PyObject *HostFire_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *bridge, *host, *engine, *hooks, *o0, *o1, *slow, *finish;
    (void)kw;
    if (!PyArg_ParseTuple(args, "O!OOO!OOOO:HostFire", &BridgeType, &bridge, &host, &engine,
                          &PyDict_Type, &hooks, &o0, &o1, &slow, &finish))
        return NULL;
    void *hp = PyLong_AsVoidPtr(host);
    if (PyErr_Occurred()) return NULL;
    HostFire *f = (HostFire *)type->tp_alloc(type, 0);
    if (!f) return NULL;
    f->vectorcall = HostFire_call;
    f->fire = ((Bridge *)bridge)->fire;
    f->host = hp;
    Py_INCREF(engine);
    f->engine = engine;
    Py_INCREF(hooks);
    f->hooks = hooks;
    Py_INCREF(o0);
    f->out[0] = o0;
    Py_INCREF(o1);
    f->out[1] = o1;
    Py_INCREF(slow);
    f->slow = slow;
    Py_INCREF(finish);
    f->finish = finish;
    return (PyObject *)f;
}

static int HostFire_traverse(PyObject *self, visitproc visit, void *arg) {
    HostFire *f = (HostFire *)self;
    Py_VISIT(f->engine);
    Py_VISIT(f->hooks);
    Py_VISIT(f->out[0]);
    Py_VISIT(f->out[1]);
    Py_VISIT(f->slow);
    Py_VISIT(f->finish);
    return 0;
}

static int HostFire_clear(PyObject *self) {
    HostFire *f = (HostFire *)self;
    f->host = NULL;
    Py_CLEAR(f->engine);
    Py_CLEAR(f->hooks);
    Py_CLEAR(f->out[0]);
    Py_CLEAR(f->out[1]);
    Py_CLEAR(f->slow);
    Py_CLEAR(f->finish);
    return 0;
}

static void HostFire_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    HostFire_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *HostFire_disable(PyObject *self, PyObject *unused) {
    (void)unused;
    ((HostFire *)self)->host = NULL; /* the host is closing: only the Python path from now on */
    Py_RETURN_NONE;
}

static PyMethodDef HostFire_methods[] = {
    {"disable", HostFire_disable, METH_NOARGS, "Send every call to the Python path (host closed)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject HostFireType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript._bridge.HostFire",
    .tp_basicsize = sizeof(HostFire),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "HostFire(bridge, host, engine, hooks, continue, done, slow, finish)(hook, txn)",
    .tp_new = HostFire_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HostFire, vectorcall),
    .tp_traverse = HostFire_traverse,
    .tp_clear = HostFire_clear,
    .tp_dealloc = HostFire_dealloc,
    .tp_methods = HostFire_methods,
};

/* ---- txn.ctx for Python ----
 * Decodes the core's ctx format (native/ctx.c) into Python objects: a table whose
 * keys are exactly 1..n becomes a list, any other table a dict, strings str (bytes
 * when not UTF-8). Lua keeps t[1] and t[true] apart and a dict cannot: the boolean
 * key is then shown as the string "true"/"false" rather than lose a value. */

#define CTX_DEPTH 40

typedef struct {
    const unsigned char *p, *end;
} ctx_reader;

static PyObject *ctx_corrupt(void) {
    PyErr_SetString(PyExc_ValueError, "corrupt txn.ctx data");
    return NULL;
}

static int ctx_take(ctx_reader *r, void *out, size_t n) {
    if ((size_t)(r->end - r->p) < n) return -1;
    memcpy(out, r->p, n);
    r->p += n;
    return 0;
}

static PyObject *ctx_value(ctx_reader *r, int depth);

/* t[k] = v, keeping a boolean key apart from the number it equals. Steals k, v. */
static int ctx_set(PyObject *t, PyObject *k, PyObject *v) {
    int has = PyDict_Contains(t, k);
    if (has <= 0) {
        int rc = has < 0 ? -1 : PyDict_SetItem(t, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        return rc;
    }
    PyObject *bkey, *bval;
    if (PyBool_Check(k)) {
        bkey = k;
        bval = v;
    } else { /* the boolean is already there under this number: move it aside */
        int one = PyObject_RichCompareBool(k, Py_True, Py_EQ);
        bkey = one ? Py_True : Py_False;
        Py_INCREF(bkey);
        bval = PyDict_GetItemWithError(t, k);
        Py_XINCREF(bval);
        if (!bval || PyDict_DelItem(t, k) < 0 || PyDict_SetItem(t, k, v) < 0) {
            Py_XDECREF(bval);
            Py_DECREF(bkey);
            Py_DECREF(k);
            Py_DECREF(v);
            return -1;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    PyObject *name = PyUnicode_FromString(bkey == Py_True ? "true" : "false");
    int rc = -1;
    if (name) {
        int taken = PyDict_Contains(t, name);
        if (taken > 0)
            PyErr_SetString(PyExc_ValueError, "txn.ctx has keys 1, true and \"true\" (or 0, false "
                                              "and \"false\") in one table; Python cannot show them apart");
        else if (taken == 0)
            rc = PyDict_SetItem(t, name, bval);
        Py_DECREF(name);
    }
    Py_DECREF(bkey);
    Py_DECREF(bval);
    return rc;
}

/* A dict whose keys are exactly the integers 1..n becomes a list. */
static PyObject *ctx_maybe_list(PyObject *t) {
    Py_ssize_t n = PyDict_GET_SIZE(t), pos = 0;
    PyObject *k, *v;
    if (n == 0) return t;
    while (PyDict_Next(t, &pos, &k, &v)) {
        if (!PyLong_CheckExact(k)) return t;
        long long i = PyLong_AsLongLong(k);
        if (i == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return t;
        }
        if (i < 1 || i > n) return t;
    }
    PyObject *list = PyList_New(n);
    if (!list) {
        Py_DECREF(t);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyLong_FromSsize_t(i + 1);
        PyObject *item = key ? PyDict_GetItemWithError(t, key) : NULL;
        Py_XDECREF(key);
        if (!item) {
            Py_DECREF(list);
            Py_DECREF(t);
            return PyErr_Occurred() ? NULL : ctx_corrupt();
        }
        Py_INCREF(item);
        PyList_SET_ITEM(list, i, item);
    }
    Py_DECREF(t);
    return list;
}

static PyObject *ctx_value(ctx_reader *r, int depth) {
    unsigned char tag;
    if (depth > CTX_DEPTH || ctx_take(r, &tag, 1)) return ctx_corrupt();
    switch (tag) {
    case 't': Py_RETURN_TRUE;
    case 'f': Py_RETURN_FALSE;
    case 'i': {
        int64_t i;
        if (ctx_take(r, &i, 8)) return ctx_corrupt();
        return PyLong_FromLongLong(i);
    }
    case 'd': {
        double d;
        if (ctx_take(r, &d, 8)) return ctx_corrupt();
        return PyFloat_FromDouble(d);
    }
    case 's': {
        uint32_t n;
        if (ctx_take(r, &n, 4) || (size_t)(r->end - r->p) < n) return ctx_corrupt();
        const char *p = (const char *)r->p;
        r->p += n;
        PyObject *str = PyUnicode_DecodeUTF8(p, n, NULL);
        if (str) return str;
        PyErr_Clear();
        return PyBytes_FromStringAndSize(p, n);
    }
    case 'T': {
        uint32_t n;
        if (ctx_take(r, &n, 4)) return ctx_corrupt();
        PyObject *t = PyDict_New();
        if (!t) return NULL;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *k = ctx_value(r, depth + 1);
            PyObject *v = k ? ctx_value(r, depth + 1) : NULL;
            if (!v) {
                Py_XDECREF(k);
                Py_DECREF(t);
                return NULL;
            }
            if (ctx_set(t, k, v) < 0) {
                Py_DECREF(t);
                return NULL;
            }
        }
        return ctx_maybe_list(t);
    }
    default:
        return ctx_corrupt();
    }
}

/* ctx_decode(data) -> dict (a top-level sequence keeps its integer keys) */
static PyObject *ctx_decode(PyObject *self, PyObject *data) {
    (void)self;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "ctx_decode needs bytes");
        return NULL;
    }
    if (PyBytes_GET_SIZE(data) == 0) return PyDict_New();
    ctx_reader r = {(const unsigned char *)PyBytes_AS_STRING(data),
                    (const unsigned char *)PyBytes_AS_STRING(data) + PyBytes_GET_SIZE(data)};
    PyObject *v = ctx_value(&r, 0);
    if (!v || PyDict_Check(v)) return v;
    if (!PyList_Check(v)) {
        Py_DECREF(v);
        return ctx_corrupt();
    }
    PyObject *d = PyDict_New();
    for (Py_ssize_t i = 0; d && i < PyList_GET_SIZE(v); i++) {
        PyObject *key = PyLong_FromSsize_t(i + 1);
        if (!key || PyDict_SetItem(d, key, PyList_GET_ITEM(v, i)) < 0) Py_CLEAR(d);
        Py_XDECREF(key);
    }
    Py_DECREF(v);
    return d;
}

static PyObject *release_address(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromVoidPtr((void *)release_gil);
}

static PyMethodDef methods[] = {
    {"release_address", release_address, METH_NOARGS,
     "Address of the function the core calls to release the GIL while Lua runs long."},
    {"ctx_decode", ctx_decode, METH_O, "ctx_decode(data: bytes) -> dict: txn.ctx as Python data"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostscript._bridge", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bridge(void) {
    if (PyType_Ready(&BridgeType) < 0 || PyType_Ready(&TxnBaseType) < 0 ||
        PyType_Ready(&HostFireType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Bridge", (PyObject *)&BridgeType) < 0 ||
        PyModule_AddObjectRef(m, "TxnBase", (PyObject *)&TxnBaseType) < 0 ||
        PyModule_AddObjectRef(m, "HostFire", (PyObject *)&HostFireType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
