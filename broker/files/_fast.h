/* privbroker.broker.files._fast's two halves: _fast.c (serve: receive, open, send) and
 * _fastwire.c (the msgpack subset it reads and writes). See _fast.c's top. */
#ifndef PRIVBROKER_FAST_H
#define PRIVBROKER_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

/* Set by configure() from client/protocol/, so no limit is written twice. */
struct fast_cfg {
    int ready;
    long version, op_open, max_access, max_batch;
    uint64_t max_id;
    size_t max_request, max_reply;
};
extern struct fast_cfg cfg;

/* The most items a request may have, whatever configure() says (arrays). */
#define FAST_MAX_ITEMS 1024

struct item {
    const char *path;     /* NUL-terminated copy, in `paths` */
    size_t len;
    long access;
    int flags, nlink_any;
    PyObject *key;        /* (path, access), a new reference */
    PyObject *value;      /* the table's answer, a new reference */
    int pfd, fd;          /* the O_PATH fd (pins the file and its mount), the fd */
    uint64_t ino, mnt;
    uint32_t dev_major, dev_minor;
};

/* [VERSION, OPEN, id, [[path, access, false], ...]] and nothing after it:
 * 0, with each item's len and access, and its path's bytes in raw_paths
 * (pointing into buf); -1 for anything else (the caller's slow path). */
int decode_open(const uint8_t *buf, size_t size, uint64_t *id, struct item *items,
                uint32_t *count, const uint8_t **raw_paths);

/* [VERSION, OPEN, id, [result, ...]], each result already packed (bytes):
 * as msgpack.packb writes it; NULL (no exception) if over max_reply. */
PyObject *build_reply(uint64_t id, PyObject *const *results, uint32_t count);

/* What recvmsg returned, as socket.recvmsg returns it, for the slow path:
 * (0, data, ancdata, flags, remount). close_received_fds: any SCM_RIGHTS
 * that came with it (when that tuple cannot be built). */
struct msghdr;
PyObject *as_received(const uint8_t *data, ssize_t n, struct msghdr *msg, int remount);
void close_received_fds(struct msghdr *msg);

PyObject *py_decode_open(PyObject *self, PyObject *arg);
PyObject *py_build_reply(PyObject *self, PyObject *args);

#endif
