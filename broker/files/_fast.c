/* privbroker.broker.files._fast: the broker's hot path, for requests it has answered before.
 *
 * How it works. broker/files/fastpath.py calls serve() when a connection is
 * readable. serve() receives one datagram and looks at it. It answers it
 * here, wholly in C, only when every part of it is the common case the
 * Python broker has already judged: a well-formed version-1 OPEN request,
 * its credentials the connection's, every item a (path, access) pair found in
 * the `table` the Python broker filled for this client under the current
 * policy (dispatch.py, from opens it made itself), and every open meeting,
 * on the file it actually opened, the conditions under which that answer
 * holds. Anything else, at any step, and the datagram goes back to Python
 * exactly as recvmsg() returned it, having opened nothing, and the Python
 * broker (the reference, which knows every other case) serves it. A
 * well-formed SOCKET request goes to broker/net/_fastsock.c instead, which
 * answers it on the same terms (its own top says how).
 *
 * Invariants (docs/security.md), and how the fast path keeps them:
 * 1. Nothing is opened unless the policy allowed it: a table entry exists
 *    only for a (path, access) that decide() allowed both as named and as a
 *    regular file at that real path with the access the fd really gives, for
 *    this client and this policy object (dispatch.py drops the tables on a
 *    reload). Here the opened file must be a regular file whose real path
 *    (readlink of /proc/self/fd/N) is the requested path itself, with one
 *    link unless the rule allows hard links.
 * 2. openat2 with RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS: a symlink or
 *    magic link anywhere on the path fails here and goes to Python.
 * 3. The flags come from the table (opener's open_flags(access)), O_NONBLOCK
 *    added for the open and cleared after, as the opener does.
 * 5. Every fd opened here is closed on every path but a successful send;
 *    an unsent reply's fds are handed to the caller, who owns them then.
 * 6. No step may block: RESOLVE_CACHED (a cold path goes to Python, which
 *    sends it to a worker), and only files on mounts listed in `mount_ids`
 *    (local filesystems the broker knows, never procfs or overlayfs), which
 *    the mount id from statx(AT_STATX_DONT_SYNC) tells without asking the
 *    filesystem. Mount ids are reused: the list is trusted only if
 *    /proc/self/mountinfo has not changed since it was read, checked after
 *    every item is resolved (the O_PATH fds pin their mounts, and their ids).
 * The decoder (_fastwire.c) accepts a strict subset of what client/protocol/codec.py
 * accepts (a test compares them on random input); a message outside it is
 * simply slow.
 *
 * Not thread-safe: one event loop calls serve(), holding the GIL throughout
 * (every syscall here is on a local, cached path and cannot block).
 */
#define _GNU_SOURCE
#include "_fast.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_NO_SYMLINKS 0x04
#define RESOLVE_CACHED 0x20

struct open_how_v0 { uint64_t flags, mode, resolve; };

struct fast_cfg cfg;

/* One request at a time (see the top): its datagram, its paths as C strings. */
static uint8_t *rbuf;
static char *paths;
/* /proc/PID/fd of this process, held: "N" under it costs a third less to
 * look up than "/proc/self/fd/N" from the root. A forked child forgets its
 * parent's (its copy is left open: it names the parent's fds, and closing a
 * number the child may have reused would be worse) and opens its own. */
static int procfd = -1;

static void forget_procfd(void) { procfd = -1; }

static int hold_procfd(void) {
    if (procfd >= 0) return 0;
    procfd = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    return procfd < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------ open */

static int in_set(const long *ids, size_t n, uint64_t id) {
    for (size_t i = 0; i < n; i++)
        if ((uint64_t)ids[i] == id) return 1;
    return 0;
}

/* Resolve one item to an O_PATH fd (it->pfd) and read what the VFS knows
 * of it without asking the filesystem; -1 when it is not the case the
 * table's answer is for (it->pfd may be open: the caller closes it). */
static int resolve_item(struct item *it) {
    struct open_how_v0 how = {
        .flags = O_PATH | O_CLOEXEC,
        .resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_CACHED,
    };
    struct statx sx;
    const unsigned want = STATX_TYPE | STATX_NLINK | STATX_INO | STATX_MNT_ID;
    it->pfd = (int)syscall(SYS_openat2, AT_FDCWD, it->path, &how, sizeof how);
    if (it->pfd < 0) return -1;
    if (statx(it->pfd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, want, &sx) ||
        (sx.stx_mask & want) != want)
        return -1;
    if (!S_ISREG(sx.stx_mode) || sx.stx_nlink == 0) return -1;
    if (sx.stx_nlink > 1 && !it->nlink_any) return -1;
    it->ino = sx.stx_ino;
    it->mnt = sx.stx_mnt_id;
    it->dev_major = sx.stx_dev_major;
    it->dev_minor = sx.stx_dev_minor;
    return 0;
}

/* Open a resolved item (on a mount the caller found local) through its
 * O_PATH fd, or return -1 (nothing more open). */
static int open_item(const struct item *it) {
    char name[16], real[PATH_MAX];
    struct statx now;
    snprintf(name, sizeof name, "%d", it->pfd);
    ssize_t n = readlinkat(procfd, name, real, sizeof real);
    if (n < 0 || (size_t)n != it->len || memcmp(real, it->path, it->len) != 0) return -1;
    int fd = openat(procfd, name, it->flags | O_NONBLOCK);  /* the O_PATH reopen: this inode */
    if (fd < 0) return -1;
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_INO, &now) ||
        now.stx_ino != it->ino || now.stx_dev_major != it->dev_major ||
        now.stx_dev_minor != it->dev_minor || fcntl(fd, F_SETFL, it->flags & O_APPEND) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int mounts_changed(int mountinfo) {
    struct pollfd p = { .fd = mountinfo, .events = POLLPRI };
    return poll(&p, 1, 0) != 0;
}

/* ----------------------------------------------------------------- serve */

int budget_fits(int sock, long count, long room, long room_if_read, int *drained) {
    *drained = 0;
    if (count <= room) return 1;
    /* Over the fd budget as last known (core/budget.py); but if the client
     * has read every earlier reply (nothing queued: SIOCOUTQ 0), what this
     * connection was charged is free again, as FdBudget.fits finds. */
    int queued = -1;
    if (count > room_if_read || ioctl(sock, SIOCOUTQ, &queued) || queued != 0) return 0;
    *drained = 1;
    return 1;
}

/* The table's answer for one item: (flags, nlink_any, packed result, rule). */
static int look_up(PyObject *table, struct item *it, const uint8_t *raw) {
    PyObject *path = PyUnicode_DecodeUTF8((const char *)raw, (Py_ssize_t)it->len, NULL);
    if (!path) { PyErr_Clear(); return -1; }
    it->key = Py_BuildValue("(Nl)", path, it->access);
    if (!it->key) { PyErr_Clear(); return -1; }
    PyObject *v = PyDict_GetItemWithError(table, it->key);
    if (!v) { PyErr_Clear(); return -1; }
    if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(v, 2)))
        return -1;
    /* Invariant 3 here too, whatever the table says: an access mode and
     * O_APPEND at most, O_CLOEXEC | O_NOCTTY always, nothing else. */
    it->flags = ((int)PyLong_AsLong(PyTuple_GET_ITEM(v, 0)) & (O_ACCMODE | O_APPEND)) |
                O_CLOEXEC | O_NOCTTY;
    it->nlink_any = PyObject_IsTrue(PyTuple_GET_ITEM(v, 1)) == 1;
    if (PyErr_Occurred()) { PyErr_Clear(); return -1; }
    Py_INCREF(v);  /* ours until the request is done, whatever the table does */
    it->value = v;
    return 0;
}

/* Close what an item still holds, drop its references. */
static void forget(struct item *it) {
    if (it->pfd >= 0) close(it->pfd);
    if (it->fd >= 0) close(it->fd);
    it->pfd = it->fd = -1;
    Py_CLEAR(it->key);
    Py_CLEAR(it->value);
}

/* An int argument in [lo, hi], or -1 with an exception. */
static int int_arg(PyObject *o, long lo, long hi, long *v) {
    *v = PyLong_AsLong(o);
    if (*v == -1 && PyErr_Occurred()) return -1;
    if (*v < lo || *v > hi) {
        PyErr_SetString(PyExc_ValueError, "argument out of range");
        return -1;
    }
    return 0;
}

/* Called for every request: the arguments come as a vector (METH_FASTCALL),
 * not packed into a tuple and parsed from a format. */
static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long sock, uid, gid, mountinfo, room, room_if_read;
    if (nargs != 9) return PyErr_Format(PyExc_TypeError, "serve() takes 9 arguments");
    PyObject *table = args[3], *mountset = args[4];
    if (int_arg(args[0], 0, INT_MAX, &sock) || int_arg(args[1], 0, UINT32_MAX, &uid) ||
        int_arg(args[2], 0, UINT32_MAX, &gid) || int_arg(args[5], 0, INT_MAX, &mountinfo) ||
        int_arg(args[6], LONG_MIN, LONG_MAX, &room) ||
        int_arg(args[7], LONG_MIN, LONG_MAX, &room_if_read))
        return NULL;
    if (!PyDict_CheckExact(table) || !PyTuple_CheckExact(mountset))
        return PyErr_Format(PyExc_TypeError, "serve(): table is a dict, mount_ids a tuple");
    int want_items = PyObject_IsTrue(args[8]);
    if (want_items < 0) return NULL;
    if (!cfg.ready) return PyErr_Format(PyExc_RuntimeError, "configure() was not called");

    /* Control buffers are unions with cmsghdr: aligned as CMSG_* expect. */
    union { char buf[CMSG_SPACE(sizeof(struct ucred))]; struct cmsghdr align; } control;
    struct iovec iov = { rbuf, cfg.max_request + 1 };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = control.buf, .msg_controllen = sizeof control.buf };
    ssize_t got = recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    static struct item items[FAST_MAX_ITEMS];
    static const uint8_t *raw[FAST_MAX_ITEMS];
    static PyObject *results[FAST_MAX_ITEMS];
    uint64_t id;
    uint32_t count = 0;
    int drained = 0, remount = 0;
    PyObject *reply = NULL, *out = NULL;

    /* The common case only: one SCM_CREDENTIALS, the connection's, nothing cut. */
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (got == 0 || (size_t)got > cfg.max_request || msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC) ||
        !c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_CREDENTIALS ||
        c->cmsg_len != CMSG_LEN(sizeof(struct ucred)) || CMSG_NXTHDR(&msg, c))
        goto slow;
    struct ucred cred;
    memcpy(&cred, CMSG_DATA(c), sizeof cred);
    if ((long)cred.uid != uid || (long)cred.gid != gid) goto slow;
    if (decode_open(rbuf, (size_t)got, &id, items, &count, raw)) {
        count = 0;
        struct sock_req sr;
        if (decode_socket(rbuf, (size_t)got, &sr)) goto slow;
        out = serve_socket(sock, table, &sr, uid, gid, room, room_if_read);
        if (out || PyErr_Occurred()) return out;  /* answered, or the broker must stop */
        goto slow;
    }
    for (uint32_t i = 0; i < count; i++) {
        items[i].key = items[i].value = NULL;
        items[i].pfd = items[i].fd = -1;
    }
    if (!budget_fits(sock, (long)count, room, room_if_read, &drained)) goto slow;
    if (hold_procfd()) goto slow;

    long mounts[256];
    size_t nmounts = (size_t)PyTuple_GET_SIZE(mountset);
    if (nmounts > 256) goto slow;
    for (size_t i = 0; i < nmounts; i++) {
        mounts[i] = PyLong_AsLong(PyTuple_GET_ITEM(mountset, i));
        if (mounts[i] == -1 && PyErr_Occurred()) { PyErr_Clear(); goto slow; }
    }
    char *p = paths;
    for (uint32_t i = 0; i < count; i++) {
        if (memchr(raw[i], 0, items[i].len)) goto slow;
        memcpy(p, raw[i], items[i].len);
        p[items[i].len] = 0;
        items[i].path = p;
        p += items[i].len + 1;
        if (look_up(table, &items[i], raw[i])) goto slow;
        results[i] = PyTuple_GET_ITEM(items[i].value, 2);
    }
    for (uint32_t i = 0; i < count; i++)
        if (resolve_item(&items[i])) goto slow;
    /* Which filesystem a mount id is (the table) is known only as of the
     * last read of /proc/self/mountinfo, and ids are reused. But each O_PATH
     * fd pins its mount, and so its id: if the table has not changed since
     * it was read, now that every item is resolved, it is right for them. */
    if ((remount = mounts_changed(mountinfo))) goto slow;
    for (uint32_t i = 0; i < count; i++) {
        if (!in_set(mounts, nmounts, items[i].mnt)) goto slow;
        items[i].fd = open_item(&items[i]);
        if (items[i].fd < 0) goto slow;
        close(items[i].pfd);
        items[i].pfd = -1;
    }
    reply = build_reply(id, results, count);
    if (!reply) { PyErr_Clear(); goto slow; }

    /* Send with the fds; on failure the caller queues the reply and owns them. */
    union { char buf[CMSG_SPACE(sizeof(int) * FAST_MAX_ITEMS)]; struct cmsghdr align; } rights;
    struct iovec oiov = { PyBytes_AS_STRING(reply), (size_t)PyBytes_GET_SIZE(reply) };
    struct msghdr out_msg = { .msg_iov = &oiov, .msg_iovlen = 1, .msg_control = rights.buf,
                              .msg_controllen = CMSG_SPACE(sizeof(int) * count) };
    struct cmsghdr *oc = CMSG_FIRSTHDR(&out_msg);
    oc->cmsg_level = SOL_SOCKET;
    oc->cmsg_type = SCM_RIGHTS;
    oc->cmsg_len = CMSG_LEN(sizeof(int) * count);
    for (uint32_t i = 0; i < count; i++) ((int *)CMSG_DATA(oc))[i] = items[i].fd;
    ssize_t sent = sendmsg(sock, &out_msg, MSG_DONTWAIT | MSG_NOSIGNAL);

    PyObject *fds = Py_None, *listed = Py_None;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (sent == PyBytes_GET_SIZE(reply)) {
        for (uint32_t i = 0; i < count; i++) { close(items[i].fd); items[i].fd = -1; }
        Py_CLEAR(reply);
        reply = Py_None;
        Py_INCREF(Py_None);
    } else {
        Py_DECREF(fds);
        fds = PyList_New(count);
        if (!fds) goto error;
        for (uint32_t i = 0; i < count; i++) {
            PyObject *f = PyLong_FromLong(items[i].fd);
            if (!f) goto error;
            PyList_SET_ITEM(fds, i, f);
        }
    }
    if (want_items) {
        Py_DECREF(listed);
        listed = PyList_New(count);
        if (!listed) goto error;
        for (uint32_t i = 0; i < count; i++) {
            PyObject *t = PyTuple_Pack(2, items[i].key, PyTuple_GET_ITEM(items[i].value, 3));
            if (!t) goto error;
            PyList_SET_ITEM(listed, i, t);
        }
    }
    out = Py_BuildValue("(iINNNi)", 1, count, reply, fds, listed, drained);
    reply = fds = listed = NULL;  /* stolen by Py_BuildValue, even when it fails */
    if (!out) goto error;
    for (uint32_t i = 0; i < count; i++) {
        items[i].fd = -1;  /* sent and closed, or the caller's now */
        forget(&items[i]);
    }
    return out;

error:
    /* Out of memory before the caller was given the fds: close them. */
    Py_XDECREF(reply);
    Py_XDECREF(fds);
    Py_XDECREF(listed);
    for (uint32_t i = 0; i < count; i++) forget(&items[i]);
    return NULL;

slow:
    Py_XDECREF(reply);
    for (uint32_t i = 0; i < count; i++) forget(&items[i]);
    out = as_received(rbuf, got, &msg, remount);
    if (!out) close_received_fds(&msg);
    return out;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    struct fast_cfg c = { 0 };
    unsigned long long max_id;
    Py_ssize_t max_request, max_reply;
    Py_ssize_t max_target;
    if (!PyArg_ParseTuple(args, "lllKllnnnl", &c.version, &c.op_open, &c.op_socket, &max_id,
                          &c.max_access, &c.max_batch, &max_request, &max_reply, &max_target,
                          &c.max_backlog))
        return NULL;
    /* Checked before anything is kept: the arrays hold FAST_MAX_ITEMS, and
     * the reply head has room for small version and op numbers only. */
    if (c.max_batch < 1 || c.max_batch > FAST_MAX_ITEMS || max_request < 1 || max_reply < 1 ||
        c.version < 0 || c.version > 127 || c.op_open < 0 || c.op_open > 127 ||
        c.op_socket < 0 || c.op_socket > 127 || c.op_socket == c.op_open || c.max_access < 0 ||
        max_target < 1 || max_target > 4096 || c.max_backlog < 0 || c.max_backlog > INT_MAX)
        return PyErr_Format(PyExc_ValueError, "limits out of range");
    if (rbuf && ((size_t)max_request != cfg.max_request || c.max_batch != cfg.max_batch))
        return PyErr_Format(PyExc_ValueError, "configure() with other limits");
    if (!rbuf) {
        rbuf = PyMem_RawMalloc((size_t)max_request + 1);
        paths = PyMem_RawMalloc((size_t)max_request + (size_t)c.max_batch + 1);
        if (!rbuf || !paths) return PyErr_NoMemory();
    }
    static int at_fork;
    if (!at_fork && pthread_atfork(NULL, NULL, forget_procfd) == 0) at_fork = 1;
    if (!at_fork) return PyErr_Format(PyExc_OSError, "pthread_atfork failed");
    if (hold_procfd()) return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/fd");
    c.max_id = max_id;
    c.max_request = (size_t)max_request;
    c.max_reply = (size_t)max_reply;
    c.max_target = (size_t)max_target;
    c.ready = 1;
    cfg = c;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(version, op_open, op_socket, max_id, max_access, max_batch, max_request, "
     "max_reply, max_target, max_backlog)"},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(sock, uid, gid, table, mount_ids, mountinfo_fd, room, room_if_read, want_items): "
     "None (nothing to read), (0, data, ancdata, flags, remount) for Python to serve, "
     "(1, count, reply, fds, items, drained) for opens, or (2, 1, reply, fds, info, drained) "
     "for a socket (info: the table entry's last element)"},
    {"decode_socket", py_decode_socket, METH_O,
     "The fast SOCKET decoder alone: (id, (target, backlog, v6only, reuse_port)) or None"},
    {"decode_open", py_decode_open, METH_O, "The fast decoder alone (as serve() reads a request): (id, [(path, access)]) or None"},
    {"build_reply", py_build_reply, METH_VARARGS, "The reply encoder alone"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "privbroker.broker.files._fast",
    "privbroker's native hot path (see fastpath.py)", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void) { return PyModule_Create(&module); }
