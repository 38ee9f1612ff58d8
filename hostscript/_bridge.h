/*
 * _bridge.h — what the C files of hostscript._bridge share: the Transaction
 * object (a Python type owning a C hs_txn), the package's exception classes, and
 * the Python side of the ctx codec. The core's own headers come first: the
 * binding and the core speak one ABI (native/hostscript.h, native/txn.h).
 */
#ifndef HS_BRIDGE_H
#define HS_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "hostscript.h"
#include "txn.h"

/* hostscript.Transaction: owns its C transaction, the only copy of the request. */
typedef struct {
    PyObject_HEAD
    hs_txn *t;
    PyObject *ctx;      /* the dict txn.ctx handed out or was given; sent with the next fire */
    PyObject *ctx_orig; /* the bytes ctx was decoded from (NULL when it was assigned) */
    PyObject *weakrefs;
} TxnObject;

extern PyTypeObject Hs_TransactionType, Hs_RequestType, Hs_ResponseType, Hs_HeadersType;

/* hostscript.errors classes, fetched when the module is initialised. */
extern PyObject *Hs_Error, *Hs_UsageError, *Hs_ArgumentTypeError, *Hs_BusyError, *Hs_ClosedError;

int hs_py_types_ready(PyObject *module); /* _transaction.c */
/* Before a fire: send a ctx dict Python assigned, or read and changed, to the C
 * transaction and let go of it (Lua may change ctx). 0 ok, -1 with an exception.
 * May run Python code: the caller checks its host and transaction again after. */
int hs_py_txn_flush_ctx(TxnObject *txn);
/* Raise BusyError when a fire runs on T in another thread; 0 when it is free. */
int hs_py_txn_check_free(const hs_txn *t);

/* _ctx.c: the core's ctx format (native/ctx.c) from and to Python data. */
PyObject *hs_py_ctx_decode(const char *p, size_t len);   /* new dict, or NULL */
int hs_py_ctx_encode(PyObject *data, hs_buf *out);       /* 0, or -1 with an exception */

#endif
