/*
 * buf.h — a growable byte buffer on malloc: the one container of the core.
 * A leaf: depends on nothing, so the transaction storage and bindings use it
 * without Lua.
 */
#ifndef HS_BUF_H
#define HS_BUF_H

#include <stddef.h>

typedef struct hs_buf {
    char *p;
    size_t len, cap;
} hs_buf;

int hs_buf_reserve(hs_buf *b, size_t extra); /* 0 ok, -1 no memory (b unchanged) */
int hs_buf_put(hs_buf *b, const void *p, size_t n);
int hs_buf_set(hs_buf *b, const void *p, size_t n); /* replace the contents */
void hs_buf_free(hs_buf *b);

#endif
