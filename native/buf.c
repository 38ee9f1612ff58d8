/*
 * buf.c — the growable byte buffer (buf.h). Capacity doubles; a failed growth
 * leaves the buffer as it was, so callers can report "no memory" and go on.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

int hs_buf_reserve(hs_buf *b, size_t extra) {
    if (extra > SIZE_MAX - b->len) return -1;
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int hs_buf_put(hs_buf *b, const void *p, size_t n) {
    if (hs_buf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

int hs_buf_set(hs_buf *b, const void *p, size_t n) {
    if (n > b->cap) {
        size_t keep = b->len;
        b->len = 0;
        if (hs_buf_reserve(b, n)) {
            b->len = keep;
            return -1;
        }
    }
    if (n) memmove(b->p, p, n);
    b->len = n;
    return 0;
}

void hs_buf_free(hs_buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}
