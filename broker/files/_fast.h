/* privbroker.broker.files._fast's three parts: _fast.c (serve: receive, open, send),
 * _fastwire.c (the msgpack subset it reads and writes) and broker/net/_fastsock.c
 * (a SOCKET request made and sent). See _fast.c's top. */
#ifndef PRIVBROKER_FAST_H
#define PRIVBROKER_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

/* Set by configure() from client/protocol/, so no limit is written twice. */
struct fast_cfg {
    int ready;
    long version, op_open, op_socket, max_access, max_batch, max_backlog;
    uint64_t max_id;
    size_t max_request, max_reply, max_target;
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

/* [VERSION, SOCKET, id, target, backlog, v6only, reuse_port] and nothing after it. */
struct sock_req {
    uint64_t id, backlog;
    const uint8_t *target;  /* into the datagram, `len` bytes, not NUL-terminated */
    size_t len;
    int v6only;             /* -1 (nil), 0 or 1 */
    int reuse_port;
};
int decode_socket(const uint8_t *buf, size_t size, struct sock_req *req);

/* [VERSION, op, id, result], the result already packed: as msgpack.packb writes it. */
PyObject *build_one_reply(long op, uint64_t id, PyObject *result);

/* Whether `count` more fds fit the connection's budget (core/budget.py):
 * `room` as last known, or `room_if_read` when the client has read every
 * earlier reply (SIOCOUTQ 0: *drained is set then). */
int budget_fits(int sock, long count, long room, long room_if_read, int *drained);

/* broker/net/_fastsock.c: answer a decoded SOCKET request from `table`,
 * or return NULL, with no exception and nothing open, for the slow path
 * (NULL with an exception only when the broker's own ids could not be
 * restored: the caller must not go on). */
PyObject *serve_socket(int sock, PyObject *table, const struct sock_req *req, long uid,
                       long gid, long room, long room_if_read);

PyObject *py_decode_open(PyObject *self, PyObject *arg);
PyObject *py_decode_socket(PyObject *self, PyObject *arg);
PyObject *py_build_reply(PyObject *self, PyObject *args);

#endif
