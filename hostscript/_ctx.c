/*
 * _ctx.c — txn.ctx between Python and the core's ctx format (native/ctx.c).
 *
 * Decoding: a table whose keys are exactly 1..n becomes a list, any other table a
 * dict, strings str (bytes when not UTF-8). Lua keeps t[1] and t[true] apart and a
 * dict cannot: the boolean key is then shown as the string "true"/"false" rather
 * than lose a value.
 *
 * Encoding is the reverse for what Python hands in: dict and list/tuple become
 * tables (a list's items get keys 1..n), str (UTF-8) and bytes strings, int
 * (64-bit), float, bool; a None value leaves its key out, as nil would. Anything
 * else is refused with the path to it, before the transaction changes.
 */
#include "_bridge.h"

#include <stdint.h>
#include <string.h>

#define DECODE_DEPTH 40 /* above native/ctx.c's own bound: anything Lua saved reads back */
#define ENCODE_DEPTH 32 /* native/ctx.c's HS_CTX_DEPTH: what Lua could save again */

/* ---- decoding ---- */

typedef struct {
    const unsigned char *p, *end;
} ctx_reader;

static PyObject *ctx_corrupt(void) {
    PyErr_SetString(Hs_UsageError, "corrupt txn.ctx data");
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
    if (PyDict_Check(k) || PyList_Check(k)) { /* Lua can key a table by a table; Python cannot */
        Py_DECREF(k);
        Py_DECREF(v);
        PyErr_SetString(Hs_UsageError, "txn.ctx has a table key, which Python cannot show");
        return -1;
    }
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
            PyErr_SetString(Hs_UsageError, "txn.ctx has keys 1, true and \"true\" (or 0, false "
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
    if (depth > DECODE_DEPTH || ctx_take(r, &tag, 1)) return ctx_corrupt();
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

PyObject *hs_py_ctx_decode(const char *p, size_t len) {
    if (len == 0) return PyDict_New();
    ctx_reader r = {(const unsigned char *)p, (const unsigned char *)p + len};
    PyObject *v = ctx_value(&r, 0);
    if (!v || PyDict_Check(v)) return v;
    if (!PyList_Check(v)) {
        Py_DECREF(v);
        return ctx_corrupt();
    }
    /* a top-level sequence: txn.ctx is a dict, so it keeps its integer keys */
    PyObject *d = PyDict_New();
    for (Py_ssize_t i = 0; d && i < PyList_GET_SIZE(v); i++) {
        PyObject *key = PyLong_FromSsize_t(i + 1);
        if (!key || PyDict_SetItem(d, key, PyList_GET_ITEM(v, i)) < 0) Py_CLEAR(d);
        Py_XDECREF(key);
    }
    Py_DECREF(v);
    return d;
}

/* ---- encoding ---- */

typedef struct {
    hs_buf *out;
    PyObject *path; /* list of keys from the top, for the error message */
} ctx_writer;

static int put(ctx_writer *w, const void *p, size_t n) {
    if (w->out->len + n > HS_CTX_MAX) {
        PyErr_Format(Hs_UsageError, "txn.ctx would be larger than %u MiB", HS_CTX_MAX >> 20);
        return -1;
    }
    if (hs_buf_put(w->out, p, n) == 0) return 0;
    PyErr_NoMemory();
    return -1;
}

static int put_tag_u32(ctx_writer *w, char tag, uint32_t n) {
    return put(w, &tag, 1) || put(w, &n, 4);
}

/* "txn.ctx['a'][1]" for the key path so far, then MSG. */
static int refuse(ctx_writer *w, PyObject *exc, PyObject *obj, const char *msg) {
    PyObject *where = PyUnicode_FromString("txn.ctx");
    for (Py_ssize_t i = 0; where && i < PyList_GET_SIZE(w->path); i++) {
        PyObject *part = PyUnicode_FromFormat("%U[%R]", where, PyList_GET_ITEM(w->path, i));
        Py_SETREF(where, part);
    }
    if (where) {
        PyErr_Format(exc, "%U %s %s; ctx keeps plain data only (None, bool, int, float, str, "
                          "bytes, and dicts and lists of these)", where, msg, Py_TYPE(obj)->tp_name);
        Py_DECREF(where);
    }
    return -1;
}

static int enc_value(ctx_writer *w, PyObject *o, int depth);

static int enc_string(ctx_writer *w, PyObject *o) {
    const char *p;
    Py_ssize_t n;
    if (PyBytes_Check(o)) {
        p = PyBytes_AS_STRING(o);
        n = PyBytes_GET_SIZE(o);
    } else if (!(p = PyUnicode_AsUTF8AndSize(o, &n))) {
        PyErr_Clear();
        return refuse(w, Hs_UsageError, o, "is a string that is not valid UTF-8: a");
    }
    if ((size_t)n > UINT32_MAX) return refuse(w, Hs_UsageError, o, "is too long a");
    return put_tag_u32(w, 's', (uint32_t)n) || put(w, p, (size_t)n);
}

static int enc_number(ctx_writer *w, PyObject *o) {
    if (PyLong_Check(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) return refuse(w, Hs_UsageError, o, "does not fit in 64 bits: an");
        if (v == -1 && PyErr_Occurred()) return -1;
        int64_t i = v;
        return put(w, "i", 1) || put(w, &i, 8);
    }
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    return put(w, "d", 1) || put(w, &d, 8);
}

/* One key/value pair of a table; a None value is left out, as nil. */
static int enc_pair(ctx_writer *w, PyObject *k, PyObject *v, int depth, uint32_t *n) {
    if (v == Py_None) return 0;
    if (PyList_Append(w->path, k) < 0) return -1;
    int rc;
    if (!(PyUnicode_Check(k) || PyBytes_Check(k) || PyLong_Check(k) || PyFloat_Check(k)))
        rc = refuse(w, Hs_ArgumentTypeError, k, "has a key of type");
    else if (PyFloat_Check(k) && PyFloat_AS_DOUBLE(k) != PyFloat_AS_DOUBLE(k))
        rc = refuse(w, Hs_UsageError, k, "has a NaN key, which Lua refuses: a");
    else
        rc = enc_value(w, k, depth) || enc_value(w, v, depth);
    if (rc == 0) {
        (*n)++;
        rc = PySequence_DelItem(w->path, PyList_GET_SIZE(w->path) - 1);
    }
    return rc ? -1 : 0;
}

/* A bytes key and the str it decodes to are one Lua string: refuse the pair rather
 * than keep one of the two values at random. */
static int bytes_key_is_unique(ctx_writer *w, PyObject *dict, PyObject *k) {
    PyObject *twin = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), NULL);
    if (!twin) {
        PyErr_Clear();
        return 0;
    }
    int both = PyDict_Contains(dict, twin);
    Py_DECREF(twin);
    if (both > 0) {
        if (PyList_Append(w->path, k) == 0)
            refuse(w, Hs_UsageError, k, "has both a bytes and a str key for one Lua string: a");
        return -1;
    }
    return both;
}

static int enc_table(ctx_writer *w, PyObject *o, int depth) {
    if (depth >= ENCODE_DEPTH)
        return refuse(w, Hs_UsageError, o, "nests deeper than 32 levels (or contains itself): a");
    size_t countpos = w->out->len + 1;
    uint32_t n = 0;
    if (put_tag_u32(w, 'T', 0)) return -1;
    if (PyDict_Check(o)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(o, &pos, &k, &v)) {
            Py_INCREF(k);
            Py_INCREF(v);
            int rc = PyBytes_Check(k) ? bytes_key_is_unique(w, o, k) : 0;
            if (rc == 0) rc = enc_pair(w, k, v, depth + 1, &n);
            Py_DECREF(k);
            Py_DECREF(v);
            if (rc) return -1;
        }
    } else { /* list or tuple: keys 1..n */
        PyObject *seq = PySequence_Fast(o, "a list");
        if (!seq) return -1;
        int rc = 0;
        for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *k = PyLong_FromSsize_t(i + 1), *v = PySequence_Fast_GET_ITEM(seq, i);
            Py_INCREF(v); /* a finalizer run while encoding may shrink the list */
            rc = k ? enc_pair(w, k, v, depth + 1, &n) : -1;
            Py_XDECREF(k);
            Py_DECREF(v);
        }
        Py_DECREF(seq);
        if (rc) return -1;
    }
    memcpy(w->out->p + countpos, &n, 4);
    return 0;
}

static int enc_value(ctx_writer *w, PyObject *o, int depth) {
    if (o == Py_True || o == Py_False) return put(w, o == Py_True ? "t" : "f", 1);
    if (PyLong_Check(o) || PyFloat_Check(o)) return enc_number(w, o);
    if (PyUnicode_Check(o) || PyBytes_Check(o)) return enc_string(w, o);
    if (PyDict_Check(o) || PyList_Check(o) || PyTuple_Check(o)) return enc_table(w, o, depth);
    return refuse(w, Hs_ArgumentTypeError, o, "holds a value of type");
}

int hs_py_ctx_encode(PyObject *data, hs_buf *out) {
    /* (bounded like the core's encoder: HS_CTX_MAX, checked per value below) */
    if (!PyDict_Check(data)) {
        PyErr_Format(Hs_ArgumentTypeError, "txn.ctx must be a dict, not %s", Py_TYPE(data)->tp_name);
        return -1;
    }
    ctx_writer w = {out, PyList_New(0)};
    if (!w.path) return -1;
    out->len = 0;
    int rc = enc_table(&w, data, 0);
    Py_DECREF(w.path);
    return rc;
}
