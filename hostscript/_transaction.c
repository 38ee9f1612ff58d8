/*
 * _transaction.c — hostscript.Transaction and its views, as CPython types over
 * the core's C transaction (native/txn.h).
 *
 * The C transaction is the only copy of a request: Request, Response and Headers
 * are views that read and write its storage directly, so there is nothing to push
 * before a fire, nothing to pull after it, and no reference cycle (a view holds
 * its transaction; the transaction holds no view). Creating a transaction from
 * header pairs, a raw header block or an email.message.Message is one call here,
 * validated once, by the core's own rules (txn.c).
 *
 * Text crosses as latin-1 (HTTP's bytes, as WSGI and http.server decode them);
 * bytes are taken as they are. A transaction that a fire is running on in another
 * thread (which then runs without the GIL) refuses every access with BusyError.
 *
 * txn.ctx is a dict decoded from the C transaction when first read; what Python
 * changes in it (or assigns) is encoded back just before the next fire, which
 * then lets go of the dict: read txn.ctx again to see what the handlers did.
 */
#include "_bridge.h"

#include <stdatomic.h>
#include <string.h>

/* ---- text in and out ---- */

/* The bytes of a str (latin-1) or bytes argument; WHAT names it in errors. */
static int text_arg(PyObject *o, const char **p, Py_ssize_t *n, const char *what) {
    if (PyUnicode_Check(o)) {
        if (PyUnicode_KIND(o) != PyUnicode_1BYTE_KIND) {
            PyErr_Format(Hs_UsageError, "%s must be latin-1 text (HTTP bytes), not %.80R", what, o);
            return -1;
        }
        *p = (const char *)PyUnicode_1BYTE_DATA(o);
        *n = PyUnicode_GET_LENGTH(o);
        return 0;
    }
    if (PyBytes_Check(o)) {
        *p = PyBytes_AS_STRING(o);
        *n = PyBytes_GET_SIZE(o);
        return 0;
    }
    PyErr_Format(Hs_ArgumentTypeError, "%s must be str or bytes, not %s", what, Py_TYPE(o)->tp_name);
    return -1;
}

static PyObject *text_out(const char *p, size_t n) { return PyUnicode_DecodeLatin1(p, (Py_ssize_t)n, NULL); }

int hs_py_txn_check_free(const hs_txn *t) {
    if (!atomic_load_explicit(&((hs_txn *)t)->busy, memory_order_acquire)) return 0;
    PyErr_SetString(Hs_BusyError, "the transaction is in use: a fire is running on it in another thread");
    return -1;
}

static int bad_header(int rc, PyObject *name, PyObject *value) {
    if (rc == HS_TXN_NOMEM) PyErr_NoMemory();
    else if (rc == HS_TXN_BAD_NAME)
        PyErr_Format(Hs_UsageError, "invalid header name %.80R (a token: letters, digits and "
                                    "!#$%%&'*+-.^_`|~)", name);
    else
        PyErr_Format(Hs_UsageError, "invalid value for header %.80R: control characters (CR, LF, "
                                    "NUL...; a tab is fine) are not allowed (%.80R)", name, value);
    return -1;
}

/* Append NAME: VALUE (str or bytes) to HS, validated. */
static int add_header(hs_hdrs *hs, PyObject *name, PyObject *value) {
    const char *k, *v;
    Py_ssize_t kn, vn;
    if (text_arg(name, &k, &kn, "a header name") || text_arg(value, &v, &vn, "a header value"))
        return -1;
    int rc = hs_hdrs_add_checked(hs, k, (size_t)kn, v, (size_t)vn);
    return rc == HS_TXN_OK ? 0 : bad_header(rc, name, value);
}

/* ---- filling headers from what a Python server has ---- */

static PyObject *message_class; /* email.message.Message, imported on first use */

static int is_message(PyObject *o) {
    if (!message_class) {
        PyObject *mod = PyImport_ImportModule("email.message");
        if (!mod) return -1;
        message_class = PyObject_GetAttrString(mod, "Message");
        Py_DECREF(mod);
        if (!message_class) return -1;
    }
    return PyObject_IsInstance(o, message_class);
}

static int fill_from_pairs(hs_hdrs *hs, PyObject *seq) {
    PyObject *fast = PySequence_Fast(seq, "");
    if (!fast) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(Hs_ArgumentTypeError, "headers must be (name, value) pairs, a raw header "
                                               "block (bytes) or a Message, not %s", Py_TYPE(seq)->tp_name);
        }
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!(PyTuple_Check(item) || PyList_Check(item)) || PySequence_Fast_GET_SIZE(item) != 2) {
            PyErr_Format(Hs_ArgumentTypeError, "headers must be (name, value) pairs, not %.80R", item);
            Py_DECREF(fast);
            return -1;
        }
        if (add_header(hs, PySequence_Fast_GET_ITEM(item, 0), PySequence_Fast_GET_ITEM(item, 1))) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* Replace HS (of transaction T) with SRC: pairs, a raw header block (bytes), a
 * Headers view, an email.message.Message, or a mapping. HS is unchanged when SRC is
 * refused. Reading SRC may run Python code (a subclass's __iter__, items()), which
 * may start a fire on T in another thread: so the new fields are built aside and
 * T is checked again just before they are moved in, with no Python code between. */
static int fill_headers(hs_txn *t, hs_hdrs *hs, PyObject *src) {
    hs_hdrs out = {0};
    int rc = 0;
    if (src == Py_None) {
    } else if (PyBytes_Check(src) || PyByteArray_Check(src) || PyMemoryView_Check(src)) {
        Py_buffer view;
        if (PyObject_GetBuffer(src, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_SetString(Hs_ArgumentTypeError, "a raw header block must be contiguous bytes");
            return -1;
        }
        char why[160];
        rc = hs_hdrs_parse(&out, view.buf, (size_t)view.len, why, sizeof why);
        PyBuffer_Release(&view);
        if (rc) PyErr_SetString(Hs_UsageError, why);
    } else if (Py_TYPE(src) == &Hs_HeadersType) {
        PyObject *items = PyObject_CallMethod(src, "items", NULL);
        rc = items ? fill_from_pairs(&out, items) : -1;
        Py_XDECREF(items);
    } else if (PyList_Check(src) || PyTuple_Check(src)) {
        rc = fill_from_pairs(&out, src);
    } else if (PyUnicode_Check(src)) {
        PyErr_SetString(Hs_ArgumentTypeError, "headers must be (name, value) pairs or a raw header "
                                              "block as bytes, not str");
        rc = -1;
    } else {
        int msg = is_message(src);
        PyObject *items = NULL;
        if (msg > 0) { /* the parsed fields as received; items() would re-parse each one */
            items = PyObject_GetAttrString(src, "_headers");
            if (items && !PyList_Check(items)) Py_CLEAR(items);
            if (!items) PyErr_Clear();
        }
        if (msg >= 0 && !items)
            items = PyObject_HasAttrString(src, "items") ? PyObject_CallMethod(src, "items", NULL)
                                                         : (Py_INCREF(src), src);
        rc = items ? fill_from_pairs(&out, items) : -1;
        Py_XDECREF(items);
    }
    if (rc || hs_py_txn_check_free(t)) {
        hs_hdrs_free(&out);
        return -1;
    }
    hs_hdrs_move(hs, &out);
    return 0;
}

/* ---- views: Headers, Request and Response hold their transaction and nothing else ---- */

typedef struct {
    PyObject_HEAD
    TxnObject *txn;
} PartObject; /* Request, Response */

typedef struct {
    PyObject_HEAD
    TxnObject *txn; /* first, as in PartObject: view_traverse and view_dealloc serve both */
    int which;
} HeadersObject;

/* Views are GC objects: a view stored in its own transaction's ctx is a cycle. */
static int view_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((PartObject *)self)->txn);
    return 0;
}

static void view_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    Py_DECREF(((PartObject *)self)->txn);
    PyObject_GC_Del(self);
}

/* ---- Headers: a view of one direction's header fields ---- */

static hs_hdrs *hdrs_of(HeadersObject *h) {
    if (hs_py_txn_check_free(h->txn->t)) return NULL;
    return &h->txn->t->hdr[h->which];
}

static PyObject *headers_new(TxnObject *txn, int which) {
    HeadersObject *h = PyObject_GC_New(HeadersObject, &Hs_HeadersType);
    if (!h) return NULL;
    Py_INCREF(txn);
    h->txn = txn;
    h->which = which;
    PyObject_GC_Track(h);
    return (PyObject *)h;
}



/* Index of the first NAME at or after FROM; -1 absent; -2 with an exception. */
static long headers_find(hs_hdrs *hs, PyObject *name, size_t from) {
    const char *k;
    Py_ssize_t kn;
    if (text_arg(name, &k, &kn, "a header name")) return -2;
    return hs_hdrs_find(hs, k, (size_t)kn, from);
}

static PyObject *headers_value(hs_hdrs *hs, long i) { return text_out(hs_hdr_value(hs, (size_t)i), hs->e[i].vlen); }

static PyObject *headers_getitem(PyObject *self, PyObject *name) {
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    long i = headers_find(hs, name, 0);
    if (i == -2) return NULL;
    if (i < 0) {
        PyErr_SetObject(PyExc_KeyError, name);
        return NULL;
    }
    return headers_value(hs, i);
}

static PyObject *headers_get(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n < 1 || n > 2) {
        PyErr_SetString(Hs_ArgumentTypeError, "get(name, default=None)");
        return NULL;
    }
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    long i = headers_find(hs, args[0], 0);
    if (i == -2) return NULL;
    if (i >= 0) return headers_value(hs, i);
    PyObject *dflt = n == 2 ? args[1] : Py_None;
    Py_INCREF(dflt);
    return dflt;
}

static PyObject *headers_get_all(PyObject *self, PyObject *name) {
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (long i = headers_find(hs, name, 0); i != -1; i = headers_find(hs, name, (size_t)i + 1)) {
        PyObject *v = i == -2 ? NULL : headers_value(hs, i);
        if (!v || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static int headers_contains(PyObject *self, PyObject *name) {
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return -1;
    if (!PyUnicode_Check(name) && !PyBytes_Check(name)) return 0;
    long i = headers_find(hs, name, 0);
    if (i == -2) { /* a str that is not latin-1 names no header */
        PyErr_Clear();
        return 0;
    }
    return i >= 0;
}

/* h[name] = value | [values] | None (removes): replace every NAME, validated first. */
static int headers_assign(HeadersObject *self, PyObject *name, PyObject *value) {
    hs_hdrs *hs = hdrs_of(self);
    if (!hs) return -1;
    const char *k;
    Py_ssize_t kn;
    if (text_arg(name, &k, &kn, "a header name")) return -1;
    if (!hs_valid_token(k, (size_t)kn)) return bad_header(HS_TXN_BAD_NAME, name, value);
    if (value == Py_None) {
        hs_hdrs_remove(hs, k, (size_t)kn);
        return 0;
    }
    if (!(PyList_Check(value) || PyTuple_Check(value))) {
        const char *v;
        Py_ssize_t vn;
        if (text_arg(value, &v, &vn, "a header value")) return -1;
        if (!hs_valid_field_value(v, (size_t)vn)) return bad_header(HS_TXN_BAD_VALUE, name, value);
        return hs_hdrs_set(hs, k, (size_t)kn, v, (size_t)vn) ? (PyErr_NoMemory(), -1) : 0;
    }
    /* several values: build the new field list aside, then swap it in */
    PyObject *values = PySequence_Fast(value, "header values");
    if (!values) return -1;
    if (hs_py_txn_check_free(self->txn->t)) { /* iterating a subclass ran Python code */
        Py_DECREF(values);
        return -1;
    }
    value = values;
    hs_hdrs out = {0};
    int kept_place = 0, rc = 0;
    for (size_t i = 0; rc == 0 && i < hs->n; i++) {
        int same = hs->e[i].nlen == (size_t)kn && hs_name_eq(hs_hdr_name(hs, i), k, (size_t)kn);
        if (!same) {
            rc = hs_hdrs_add(&out, hs_hdr_name(hs, i), hs->e[i].nlen, hs_hdr_value(hs, i), hs->e[i].vlen)
                     ? (PyErr_NoMemory(), -1) : 0;
            continue;
        }
        if (kept_place++) continue;
        for (Py_ssize_t j = 0; rc == 0 && j < PySequence_Fast_GET_SIZE(value); j++)
            rc = add_header(&out, name, PySequence_Fast_GET_ITEM(value, j));
    }
    for (Py_ssize_t j = 0; rc == 0 && !kept_place && j < PySequence_Fast_GET_SIZE(value); j++)
        rc = add_header(&out, name, PySequence_Fast_GET_ITEM(value, j));
    Py_DECREF(values);
    if (rc) {
        hs_hdrs_free(&out);
        return -1;
    }
    hs_hdrs_move(hs, &out);
    return 0;
}

static int headers_setitem(PyObject *self, PyObject *name, PyObject *value) {
    if (value) return headers_assign((HeadersObject *)self, name, value);
    int has = headers_contains(self, name);
    if (has <= 0) {
        if (has == 0) PyErr_SetObject(PyExc_KeyError, name);
        return -1;
    }
    return headers_assign((HeadersObject *)self, name, Py_None);
}

static PyObject *headers_add(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(Hs_ArgumentTypeError, "add(name, value)");
        return NULL;
    }
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs || add_header(hs, args[0], args[1])) return NULL;
    Py_RETURN_NONE;
}

static PyObject *headers_remove(PyObject *self, PyObject *name) {
    if (!PyUnicode_Check(name) && !PyBytes_Check(name)) {
        PyErr_Format(Hs_ArgumentTypeError, "a header name must be str or bytes, not %s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    const char *k;
    Py_ssize_t kn;
    if (text_arg(name, &k, &kn, "a header name")) {
        PyErr_Clear(); /* not latin-1: no such header to remove */
        Py_RETURN_NONE;
    }
    hs_hdrs_remove(hs, k, (size_t)kn);
    Py_RETURN_NONE;
}

static PyObject *headers_clear(PyObject *self, PyObject *unused) {
    (void)unused;
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    hs_hdrs_clear(hs);
    Py_RETURN_NONE;
}

/* The fields as [(name, value), ...]. Every string is made before any tuple or list:
 * allocating those may run the cyclic GC, whose finalizers may change the headers,
 * and by then nothing here reads them any more. */
static PyObject *headers_items(PyObject *self, PyObject *unused) {
    (void)unused;
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    if (!hs) return NULL;
    size_t n = hs->n;
    PyObject *small[64], **str = n * 2 <= 64 ? small : PyMem_Malloc(n * 2 * sizeof *str);
    if (!str) return PyErr_NoMemory();
    size_t made = 0;
    for (; made < n * 2; made++) {
        size_t i = made / 2;
        str[made] = made % 2 ? text_out(hs_hdr_value(hs, i), hs->e[i].vlen)
                             : text_out(hs_hdr_name(hs, i), hs->e[i].nlen);
        if (!str[made]) break;
    }
    PyObject *out = made == n * 2 ? PyList_New((Py_ssize_t)n) : NULL;
    size_t used = 0;
    for (; out && used < n; used++) {
        PyObject *pair = PyTuple_Pack(2, str[2 * used], str[2 * used + 1]);
        if (!pair) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)used, pair);
    }
    for (size_t i = 0; i < made; i++) Py_DECREF(str[i]);
    if (str != small) PyMem_Free(str);
    return out;
}

static PyObject *headers_iter(PyObject *self) {
    PyObject *items = headers_items(self, NULL);
    if (!items) return NULL;
    PyObject *it = PyObject_GetIter(items);
    Py_DECREF(items);
    return it;
}

static Py_ssize_t headers_len(PyObject *self) {
    hs_hdrs *hs = hdrs_of((HeadersObject *)self);
    return hs ? (Py_ssize_t)hs->n : -1;
}

static PyObject *headers_richcompare(PyObject *self, PyObject *other, int op) {
    if ((op != Py_EQ && op != Py_NE) ||
        !(Py_TYPE(other) == &Hs_HeadersType || PyList_Check(other) || PyTuple_Check(other)))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *mine = headers_items(self, NULL), *theirs = NULL;
    if (!mine) return NULL;
    if (Py_TYPE(other) == &Hs_HeadersType) {
        theirs = headers_items(other, NULL);
    } else { /* a list of pairs: compare as tuples */
        theirs = PyList_New(0);
        PyObject *it = theirs ? PyObject_GetIter(other) : NULL, *item;
        while (it && (item = PyIter_Next(it))) {
            PyObject *t = PySequence_Tuple(item);
            Py_DECREF(item);
            if (!t || PyList_Append(theirs, t) < 0) {
                Py_XDECREF(t);
                Py_CLEAR(theirs);
                break;
            }
            Py_DECREF(t);
        }
        Py_XDECREF(it);
        if (theirs && PyErr_Occurred()) Py_CLEAR(theirs);
        if (!theirs && PyErr_ExceptionMatches(PyExc_TypeError)) { /* items that are not pairs */
            PyErr_Clear();
            Py_DECREF(mine);
            return PyBool_FromLong(op == Py_NE);
        }
    }
    PyObject *res = theirs ? PyObject_RichCompare(mine, theirs, op) : NULL;
    Py_DECREF(mine);
    Py_XDECREF(theirs);
    return res;
}

static PyObject *headers_repr(PyObject *self) {
    PyObject *items = headers_items(self, NULL);
    if (!items) return NULL;
    PyObject *r = PyUnicode_FromFormat("Headers(%R)", items);
    Py_DECREF(items);
    return r;
}

static PyObject *txn_alloc(PyTypeObject *type);

/* Headers(items): a free-standing multi-map, kept in a transaction of its own. */
static PyObject *headers_tp_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *items = Py_None;
    static char *kwlist[] = {"items", NULL};
    (void)type;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:Headers", kwlist, &items)) return NULL;
    TxnObject *own = (TxnObject *)txn_alloc(&Hs_TransactionType);
    if (!own) return NULL;
    PyObject *h = fill_headers(own->t, &own->t->hdr[HS_REQ], items) ? NULL : headers_new(own, HS_REQ);
    Py_DECREF(own);
    return h;
}

static PyMethodDef headers_methods[] = {
    {"get", (PyCFunction)(void (*)(void))headers_get, METH_FASTCALL,
     "get(name, default=None): the first value of NAME (case-insensitive), or DEFAULT"},
    {"get_all", headers_get_all, METH_O, "get_all(name) -> every value of NAME, in order"},
    {"add", (PyCFunction)(void (*)(void))headers_add, METH_FASTCALL,
     "add(name, value): append another field"},
    {"remove", headers_remove, METH_O, "remove(name): drop every field NAME (absent: nothing)"},
    {"clear", headers_clear, METH_NOARGS, "clear(): drop every field"},
    {"items", headers_items, METH_NOARGS, "items() -> [(name, value), ...] in order"},
    {NULL, NULL, 0, NULL}};

static PyMappingMethods headers_as_mapping = {headers_len, headers_getitem, headers_setitem};
static PySequenceMethods headers_as_sequence = {.sq_contains = headers_contains};

PyTypeObject Hs_HeadersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript.Headers",
    .tp_basicsize = sizeof(HeadersObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = view_traverse,
    .tp_doc = "The header fields of a request or response: a case-insensitive multi-map, in "
              "order, stored in the C transaction.\n\n"
              "h[name] is the first value (KeyError when absent); h[name] = value replaces "
              "every field NAME (a list sets several, None removes); del h[name] removes "
              "(KeyError when absent); add(name, value) appends. Iteration yields "
              "(name, value) pairs. Names and values are latin-1 str (bytes are accepted).\n\n"
              "Headers(items) makes one that belongs to no transaction, from what "
              "Transaction(headers=...) takes.",
    .tp_new = headers_tp_new,
    .tp_dealloc = view_dealloc,
    .tp_repr = headers_repr,
    .tp_as_mapping = &headers_as_mapping,
    .tp_as_sequence = &headers_as_sequence,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_richcompare = headers_richcompare,
    .tp_iter = headers_iter,
    .tp_methods = headers_methods,
};

/* ---- Request and Response: views of the transaction's two halves ---- */

static PyObject *part_new(TxnObject *txn, PyTypeObject *type) {
    PartObject *p = PyObject_GC_New(PartObject, type);
    if (!p) return NULL;
    Py_INCREF(txn);
    p->txn = txn;
    PyObject_GC_Track(p);
    return (PyObject *)p;
}

/* The transaction of a view, NULL (BusyError) while a fire runs on it. */
static hs_txn *txn_of(PyObject *part) {
    hs_txn *t = ((PartObject *)part)->txn->t;
    return hs_py_txn_check_free(t) ? NULL : t;
}

static PyObject *field_get(PyObject *self, int f) {
    hs_txn *t = txn_of(self);
    if (!t) return NULL;
    size_t n;
    const char *p = hs_txn_get(t, f, &n);
    return f == HS_F_BODY ? PyBytes_FromStringAndSize(p, (Py_ssize_t)n) : text_out(p, n);
}

static int no_delete(PyObject *value, const char *what) {
    if (value) return 0;
    PyErr_Format(Hs_ArgumentTypeError, "%s cannot be deleted", what);
    return -1;
}

static int store_method_or_uri(hs_txn *t, PyObject *value, int f) {
    const char *what = f == HS_F_METHOD ? "the method" : "the uri";
    const char *p;
    Py_ssize_t n;
    if (no_delete(value, what) || text_arg(value, &p, &n, what)) return -1;
    if (f == HS_F_METHOD ? !hs_valid_token(p, (size_t)n) : !hs_valid_uri(p, (size_t)n)) {
        PyErr_Format(Hs_UsageError, f == HS_F_METHOD
                                        ? "invalid method %.80R (an HTTP token: letters, digits and "
                                          "!#$%%&'*+-.^_`|~)"
                                        : "invalid uri %.80R (empty, or a space or control character)",
                     value);
        return -1;
    }
    return hs_buf_set(f == HS_F_METHOD ? &t->method : &t->uri, p, (size_t)n) ? (PyErr_NoMemory(), -1) : 0;
}

static int set_method_or_uri(PyObject *self, PyObject *value, int f) {
    hs_txn *t = txn_of(self);
    return t ? store_method_or_uri(t, value, f) : -1;
}

static PyObject *request_method(PyObject *self, void *c) { (void)c; return field_get(self, HS_F_METHOD); }
static PyObject *request_uri(PyObject *self, void *c) { (void)c; return field_get(self, HS_F_URI); }
static int request_set_method(PyObject *self, PyObject *v, void *c) { (void)c; return set_method_or_uri(self, v, HS_F_METHOD); }
static int request_set_uri(PyObject *self, PyObject *v, void *c) { (void)c; return set_method_or_uri(self, v, HS_F_URI); }

static PyObject *part_headers(PyObject *self, void *which) {
    if (!txn_of(self)) return NULL;
    return headers_new(((PartObject *)self)->txn, (int)(intptr_t)which);
}

static int part_set_headers(PyObject *self, PyObject *value, void *which) {
    hs_txn *t = txn_of(self);
    if (!t || no_delete(value, "headers")) return -1;
    return fill_headers(t, &t->hdr[(int)(intptr_t)which], value);
}

/* A status is None (not set) or an int from 100 to 999. */
static int status_arg(PyObject *value, int *status) {
    if (value == Py_None) {
        *status = 0;
        return 0;
    }
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        PyErr_Format(Hs_ArgumentTypeError, "status must be an int or None, not %s", Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow;
    long v = PyLong_AsLongAndOverflow(value, &overflow);
    if (overflow || v < 100 || v > 999) {
        PyErr_Format(Hs_UsageError, "status must be from 100 to 999, not %R", value);
        return -1;
    }
    *status = (int)v;
    return 0;
}

/* A body is bytes-like, or str (sent as UTF-8). Fills a Py_buffer to release. */
static int body_arg(PyObject *value, Py_buffer *view, PyObject **tmp, const char *what) {
    *tmp = NULL;
    if (PyUnicode_Check(value)) {
        if (!(*tmp = PyUnicode_AsUTF8String(value))) {
            PyErr_Clear();
            PyErr_Format(Hs_UsageError, "a str %s must encode as UTF-8", what);
            return -1;
        }
        value = *tmp;
    }
    if (PyObject_GetBuffer(value, view, PyBUF_SIMPLE) == 0) return 0;
    PyErr_Clear();
    PyErr_Format(Hs_ArgumentTypeError, "%s must be bytes or str, not %s", what, Py_TYPE(value)->tp_name);
    Py_CLEAR(*tmp);
    return -1;
}

static int set_body(hs_txn *t, PyObject *value) {
    Py_buffer view;
    PyObject *tmp;
    if (body_arg(value, &view, &tmp, "body")) return -1;
    if (hs_py_txn_check_free(t)) { /* a __buffer__ method may have run Python code */
        PyBuffer_Release(&view);
        Py_XDECREF(tmp);
        return -1;
    }
    int rc = hs_buf_set(&t->body, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    Py_XDECREF(tmp);
    return rc ? (PyErr_NoMemory(), -1) : 0;
}

static PyObject *response_status(PyObject *self, void *c) {
    (void)c;
    hs_txn *t = txn_of(self);
    if (!t) return NULL;
    if (!t->status) Py_RETURN_NONE;
    return PyLong_FromLong(t->status);
}

static int response_set_status(PyObject *self, PyObject *value, void *c) {
    (void)c;
    hs_txn *t = txn_of(self);
    int status;
    if (!t || no_delete(value, "status") || status_arg(value, &status)) return -1;
    t->status = status;
    return 0;
}

static PyObject *response_body(PyObject *self, void *c) { (void)c; return field_get(self, HS_F_BODY); }

static int response_set_body(PyObject *self, PyObject *value, void *c) {
    (void)c;
    hs_txn *t = txn_of(self);
    if (!t || no_delete(value, "body")) return -1;
    return set_body(t, value);
}

static PyObject *request_repr(PyObject *self) {
    PyObject *m = request_method(self, NULL), *u = m ? request_uri(self, NULL) : NULL;
    PyObject *h = u ? part_headers(self, (void *)(intptr_t)HS_REQ) : NULL;
    PyObject *r = h ? PyUnicode_FromFormat("Request(%R, %R, %R)", m, u, h) : NULL;
    Py_XDECREF(m);
    Py_XDECREF(u);
    Py_XDECREF(h);
    return r;
}

static PyObject *response_repr(PyObject *self) {
    PyObject *s = response_status(self, NULL), *b = s ? response_body(self, NULL) : NULL;
    PyObject *h = b ? part_headers(self, (void *)(intptr_t)HS_RESP) : NULL;
    PyObject *r = h ? PyUnicode_FromFormat("Response(%R, %R, %R)", s, h, b) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(b);
    Py_XDECREF(h);
    return r;
}

static PyGetSetDef request_getset[] = {
    {"method", request_method, request_set_method, "the method, a token (str)", NULL},
    {"uri", request_uri, request_set_uri, "the request target (str)", NULL},
    {"headers", part_headers, part_set_headers, "the request's header fields (Headers); "
     "assign pairs, a raw block or a Message to replace them", (void *)(intptr_t)HS_REQ},
    {NULL, NULL, NULL, NULL, NULL}};

static PyGetSetDef response_getset[] = {
    {"status", response_status, response_set_status, "the status (int), None until set", NULL},
    {"body", response_body, response_set_body, "the body (bytes; a str is stored as UTF-8)", NULL},
    {"headers", part_headers, part_set_headers, "the response's header fields (Headers)",
     (void *)(intptr_t)HS_RESP},
    {NULL, NULL, NULL, NULL, NULL}};

PyTypeObject Hs_RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript.Request",
    .tp_basicsize = sizeof(PartObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = view_traverse,
    .tp_doc = "The request as handlers see it: method, uri, headers (a view of the transaction).",
    .tp_dealloc = view_dealloc,
    .tp_repr = request_repr,
    .tp_getset = request_getset,
};

PyTypeObject Hs_ResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript.Response",
    .tp_basicsize = sizeof(PartObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = view_traverse,
    .tp_doc = "The response: status (None until set), headers, body (a view of the transaction).",
    .tp_dealloc = view_dealloc,
    .tp_repr = response_repr,
    .tp_getset = response_getset,
};

/* ---- Transaction ---- */

/* The constructor's arguments, in order: method, uri, headers (positional or
 * keyword), then keyword-only status, response_headers, body. */
enum { A_METHOD, A_URI, A_HEADERS, A_STATUS, A_RESP_HEADERS, A_BODY, A_COUNT };
static const char *const arg_names[A_COUNT] = {"method", "uri", "headers", "status",
                                                "response_headers", "body"};
static PyObject *arg_strs[A_COUNT]; /* interned */

static int fill(TxnObject *self, PyObject *const a[A_COUNT]) {
    hs_txn *t = self->t;
    if (hs_txn_set(t, HS_F_METHOD, "GET", 3) || hs_txn_set(t, HS_F_URI, "/", 1)) {
        PyErr_NoMemory();
        return -1;
    }
    if ((a[A_METHOD] && store_method_or_uri(t, a[A_METHOD], HS_F_METHOD)) ||
        (a[A_URI] && store_method_or_uri(t, a[A_URI], HS_F_URI)) ||
        (a[A_HEADERS] && fill_headers(t, &t->hdr[HS_REQ], a[A_HEADERS])) ||
        (a[A_RESP_HEADERS] && fill_headers(t, &t->hdr[HS_RESP], a[A_RESP_HEADERS])) ||
        (a[A_STATUS] && status_arg(a[A_STATUS], &t->status)) ||
        (a[A_BODY] && set_body(t, a[A_BODY])))
        return -1;
    return 0;
}

static PyObject *txn_alloc(PyTypeObject *type) {
    TxnObject *self = (TxnObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    if (!(self->t = hs_txn_new())) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

/* Sort the constructor's arguments into A; KW is the keywords' values, in the order
 * of KWNAMES. */
static int txn_args(PyObject *const *args, Py_ssize_t n, PyObject *kwnames, PyObject *const *kw,
                    PyObject *a[A_COUNT]) {
    if (n > 3) {
        PyErr_Format(Hs_ArgumentTypeError, "Transaction() takes at most 3 positional arguments "
                                           "(method, uri, headers), %zd given", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) a[i] = args[i];
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        int j = 0;
        while (j < A_COUNT && k != arg_strs[j]) j++;
        if (j == A_COUNT) /* not interned the same way: compare by value */
            for (j = 0; j < A_COUNT && PyUnicode_CompareWithASCIIString(k, arg_names[j]) != 0; j++) {
            }
        if (j == A_COUNT || a[j]) {
            PyErr_Format(Hs_ArgumentTypeError, j == A_COUNT ? "Transaction() got an unexpected "
                                                              "keyword argument %R"
                                                            : "Transaction() got multiple values "
                                                              "for argument %R", k);
            return -1;
        }
        a[j] = kw[i];
    }
    return 0;
}

static PyObject *txn_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    PyObject *a[A_COUNT] = {0};
    if (txn_args(args, n, kwnames, args + n, a)) return NULL;
    PyObject *self = txn_alloc((PyTypeObject *)type);
    if (self && fill((TxnObject *)self, a)) Py_CLEAR(self);
    return self;
}

/* Transaction.__new__ and subclasses: the same parsing as the fast path. */
static PyObject *txn_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *a[A_COUNT] = {0}, *names = NULL, *values[A_COUNT + 1] = {0};
    Py_ssize_t nk = kw ? PyDict_GET_SIZE(kw) : 0, pos = 0, i = 0;
    if (nk > A_COUNT) {
        PyErr_SetString(Hs_ArgumentTypeError, "Transaction() got too many keyword arguments");
        return NULL;
    }
    if (nk && !(names = PyTuple_New(nk))) return NULL;
    PyObject *k, *v;
    while (kw && PyDict_Next(kw, &pos, &k, &v)) {
        Py_INCREF(k);
        PyTuple_SET_ITEM(names, i, k);
        values[i++] = v;
    }
    int rc = txn_args(&PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), names, values, a);
    PyObject *self = rc ? NULL : txn_alloc(type);
    if (self && fill((TxnObject *)self, a)) Py_CLEAR(self);
    Py_XDECREF(names);
    return self;
}

static int txn_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((TxnObject *)self)->ctx);
    return 0;
}

static int txn_clear(PyObject *self) {
    Py_CLEAR(((TxnObject *)self)->ctx);
    Py_CLEAR(((TxnObject *)self)->ctx_orig);
    return 0;
}

static void txn_dealloc(PyObject *self) {
    TxnObject *x = (TxnObject *)self;
    PyObject_GC_UnTrack(self);
    if (x->weakrefs) PyObject_ClearWeakRefs(self);
    txn_clear(self);
    hs_txn_free(x->t);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *txn_request(PyObject *self, void *c) {
    (void)c;
    return part_new((TxnObject *)self, &Hs_RequestType);
}

static PyObject *txn_response(PyObject *self, void *c) {
    (void)c;
    return part_new((TxnObject *)self, &Hs_ResponseType);
}

/* txn.ctx: decoded when first read, from a copy of the bytes (making dicts may run
 * the cyclic GC, and a finalizer may assign txn.ctx meanwhile). The copy is kept:
 * the next fire sends the dict back only if it no longer equals what was read, so
 * merely reading txn.ctx never changes what Lua sees. */
static PyObject *txn_ctx(PyObject *self, void *c) {
    (void)c;
    TxnObject *x = (TxnObject *)self;
    if (hs_py_txn_check_free(x->t)) return NULL;
    if (!x->ctx) {
        PyObject *orig = PyBytes_FromStringAndSize(x->t->ctx.p ? x->t->ctx.p : "", (Py_ssize_t)x->t->ctx.len);
        PyObject *d = orig ? hs_py_ctx_decode(PyBytes_AS_STRING(orig), (size_t)PyBytes_GET_SIZE(orig)) : NULL;
        if (!d) {
            Py_XDECREF(orig);
            return NULL;
        }
        Py_XSETREF(x->ctx_orig, orig);
        Py_XSETREF(x->ctx, d);
    }
    Py_INCREF(x->ctx);
    return x->ctx;
}

/* Encode DATA as the transaction's ctx, built aside and swapped in only if no fire
 * started on it while encoding ran (a list subclass's __iter__ is Python code). */
static int store_ctx(hs_txn *t, PyObject *data) {
    hs_buf enc = {0};
    if (hs_py_ctx_encode(data, &enc) || hs_py_txn_check_free(t)) {
        hs_buf_free(&enc);
        return -1;
    }
    hs_buf_free(&t->ctx);
    t->ctx = enc;
    return 0;
}

static int txn_set_ctx(PyObject *self, PyObject *value, void *c) {
    (void)c;
    TxnObject *x = (TxnObject *)self;
    if (hs_py_txn_check_free(x->t) || no_delete(value, "txn.ctx")) return -1;
    Py_INCREF(value);
    int rc = store_ctx(x->t, value);
    if (rc == 0) {
        Py_CLEAR(x->ctx_orig); /* assigned: always sent */
        Py_XSETREF(x->ctx, value);
    } else {
        Py_DECREF(value);
    }
    return rc;
}

int hs_py_txn_flush_ctx(TxnObject *x) {
    PyObject *d = x->ctx, *orig = x->ctx_orig;
    Py_INCREF(d);
    Py_XINCREF(orig);
    int rc = 0, changed = 1;
    if (orig) { /* read, maybe changed: compare with a fresh decoding of what was read */
        PyObject *was = hs_py_ctx_decode(PyBytes_AS_STRING(orig), (size_t)PyBytes_GET_SIZE(orig));
        changed = was ? PyObject_RichCompareBool(d, was, Py_NE) : -1;
        Py_XDECREF(was);
        rc = changed < 0 ? -1 : 0;
    }
    if (rc == 0 && changed) rc = store_ctx(x->t, d);
    if (rc == 0 && x->ctx == d) { /* (Python code above may have assigned another one) */
        Py_CLEAR(x->ctx);
        Py_CLEAR(x->ctx_orig);
    }
    Py_DECREF(d);
    Py_XDECREF(orig);
    return rc;
}

/* txn.cache_key: the secondary cache key a handler set (bytes, b"" when none). */
static PyObject *txn_cache_key(PyObject *self, void *c) {
    (void)c;
    hs_txn *t = ((TxnObject *)self)->t;
    if (hs_py_txn_check_free(t)) return NULL;
    return PyBytes_FromStringAndSize(t->cache_key.p ? t->cache_key.p : "", (Py_ssize_t)t->cache_key.len);
}

static int txn_set_cache_key(PyObject *self, PyObject *value, void *c) {
    (void)c;
    hs_txn *t = ((TxnObject *)self)->t;
    Py_buffer view;
    PyObject *tmp;
    if (hs_py_txn_check_free(t) || no_delete(value, "cache_key") || body_arg(value, &view, &tmp, "cache_key")) return -1;
    int rc = 0;
    if (hs_py_txn_check_free(t)) {
        rc = -1;
    } else if ((size_t)view.len > HS_CACHE_KEY_MAX) {
        PyErr_Format(Hs_UsageError, "cache_key is %zd bytes, more than %d", view.len, HS_CACHE_KEY_MAX);
        rc = -1;
    } else if (hs_buf_set(&t->cache_key, view.buf, (size_t)view.len)) {
        PyErr_NoMemory();
        rc = -1;
    }
    PyBuffer_Release(&view);
    Py_XDECREF(tmp);
    return rc;
}

static PyObject *txn_repr(PyObject *self) {
    PyObject *q = txn_request(self, NULL), *s = q ? txn_response(self, NULL) : NULL;
    PyObject *r = s ? PyUnicode_FromFormat("Transaction(%R, %R)", q, s) : NULL;
    Py_XDECREF(q);
    Py_XDECREF(s);
    return r;
}

static PyGetSetDef txn_getset[] = {
    {"request", txn_request, NULL, "the request (method, uri, headers)", NULL},
    {"response", txn_response, NULL, "the response (status, headers, body)", NULL},
    {"ctx", txn_ctx, txn_set_ctx,
     "the handlers' txn.ctx as a dict (sequences become lists). Changes made here, or a dict "
     "assigned, reach Lua at the next fire; read it again after a fire to see the handlers' ctx.",
     NULL},
    {"cache_key", txn_cache_key, txn_set_cache_key,
     "the secondary cache key handlers set with txn:set_cache_key (bytes; b'' when none)", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyTypeObject Hs_TransactionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostscript.Transaction",
    .tp_basicsize = sizeof(TxnObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Transaction(method='GET', uri='/', headers=(), *, status=None, "
              "response_headers=(), body=b'')\n--\n\n"
              "One request passing through the host's hooks, stored in C. Fire its hooks from "
              "any thread, one fire at a time; ctx follows it across threads and engines.\n\n"
              "headers (and response_headers) may be (name, value) pairs, a raw header block as "
              "bytes, an email.message.Message (what http.server gives a handler) or a mapping. "
              "Everything is validated here: a bad name, value, method, uri or status raises "
              "hostscript.UsageError.",
    .tp_dealloc = txn_dealloc,
    .tp_traverse = txn_traverse,
    .tp_clear = txn_clear,
    .tp_repr = txn_repr,
    .tp_getset = txn_getset,
    .tp_new = txn_new,
    .tp_vectorcall = txn_vectorcall,
    .tp_weaklistoffset = offsetof(TxnObject, weakrefs),
};

int hs_py_types_ready(PyObject *module) {
    for (int i = 0; i < A_COUNT; i++)
        if (!(arg_strs[i] = PyUnicode_InternFromString(arg_names[i]))) return -1;
    PyTypeObject *types[] = {&Hs_TransactionType, &Hs_RequestType, &Hs_ResponseType, &Hs_HeadersType};
    const char *names[] = {"Transaction", "Request", "Response", "Headers"};
    for (int i = 0; i < 4; i++)
        if (PyType_Ready(types[i]) < 0 || PyModule_AddObjectRef(module, names[i], (PyObject *)types[i]) < 0)
            return -1;
    return 0;
}
