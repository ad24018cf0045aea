/* The SOCKET half of privbroker.broker.files._fast: a socket the broker has
 * made for this client before, made again in C.
 *
 * How it works. _fast.c's serve() receives every datagram of a connection;
 * when one is a well-formed SOCKET request (_fastwire.c's decode_socket) it
 * calls serve_socket() here. The request is answered here only when its key,
 * (target text, backlog, v6only, reuse_port) exactly as received, is in the
 * client's table under the current policy: net/service.py records an entry
 * there after the Python broker allowed that very request and made its
 * socket (net/fastsock.py: `entry`, which says which requests qualify: TCP
 * and UDP on a numeric address with no zone). Then this file creates the
 * same socket the way net/sockets.py does, checks it, and sends it. At any
 * step that is not the expected case (the key missing, an entry of the wrong
 * shape, the fd budget, a kernel refusal such as EADDRINUSE, a socket that
 * is not what was asked) it returns NULL with nothing open, and the Python
 * broker serves the request as if this file did not exist, and gives the
 * kernel's errno in its reply.
 *
 * Invariants (docs/security.md), kept here as in net/sockets.py:
 * 1. Only what the policy allowed: the entry exists only for a request
 *    decide_socket() allowed for this client under this policy object
 *    (core/dispatch.py drops every table on a reload).
 * 4. Credentials: _fast.c compared the datagram's SCM_CREDENTIALS with the
 *    connection's before calling here.
 * 5. The fd is closed on every path but a successful send; an unsent
 *    reply's fd goes to the caller, who owns it then.
 * 11. Whatever the table says: TCP or UDP only, over IPv4 or IPv6; the
 *    socket belongs to the client (setfsuid/setfsgid around socket(), this
 *    thread only, restored at once); the options set are SO_BINDTODEVICE,
 *    IPV6_V6ONLY, SO_REUSEPORT and SO_REUSEADDR, nothing else; TCP is sent
 *    listening (SO_ACCEPTCONN read back), never merely bound; the family,
 *    type, protocol, device and bound address are read back and compared.
 * 6. Nothing here blocks: socket(), setsockopt(), bind() and listen() on a
 *    numeric address never wait.
 */
#define _GNU_SOURCE
#include "../files/_fast.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <unistd.h>

/* One table entry (net/fastsock.py, `entry`), read and checked. */
struct sock_entry {
    int family, type, proto;
    union { struct sockaddr_in v4; struct sockaddr_in6 v6; } addr;
    socklen_t addrlen;
    char dev[IFNAMSIZ];
    size_t devlen;
    int backlog, v6only, reuse_port, reuseaddr;
    PyObject *result, *info;  /* borrowed from the entry */
};

#define ENTRY_LEN 12

static int small_int(PyObject *o, long lo, long hi, int *v) {
    if (!PyLong_CheckExact(o)) return -1;
    long x = PyLong_AsLong(o);
    if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
    if (x < lo || x > hi) return -1;
    *v = (int)x;
    return 0;
}

/* (family, type, proto, address bytes, port, device bytes, backlog, v6only,
 * reuse_port, reuseaddr, packed result, audit info): 0, or -1 for anything
 * outside what this file may make. */
static int read_entry(PyObject *v, struct sock_entry *e) {
    if (!PyTuple_CheckExact(v) || PyTuple_GET_SIZE(v) != ENTRY_LEN) return -1;
    PyObject *const *f = &PyTuple_GET_ITEM(v, 0);
    int port;
    if (small_int(f[0], 0, INT_MAX, &e->family) || small_int(f[1], 0, INT_MAX, &e->type) ||
        small_int(f[2], 0, INT_MAX, &e->proto) || small_int(f[4], 1, 65535, &port) ||
        small_int(f[6], -1, cfg.max_backlog, &e->backlog) || small_int(f[7], -1, 1, &e->v6only) ||
        small_int(f[8], 0, 1, &e->reuse_port) || small_int(f[9], 0, 1, &e->reuseaddr))
        return -1;
    if (!PyBytes_CheckExact(f[3]) || !PyBytes_CheckExact(f[5]) || !PyBytes_CheckExact(f[10]))
        return -1;
    /* TCP listening, or UDP bound: nothing else is made here. */
    int tcp = e->type == SOCK_STREAM && e->proto == IPPROTO_TCP;
    int udp = e->type == SOCK_DGRAM && e->proto == IPPROTO_UDP;
    if (!(tcp && e->backlog >= 0 && e->reuseaddr) && !(udp && e->backlog == -1 && !e->reuseaddr))
        return -1;
    const char *a = PyBytes_AS_STRING(f[3]);
    Py_ssize_t alen = PyBytes_GET_SIZE(f[3]);
    memset(&e->addr, 0, sizeof e->addr);
    if (e->family == AF_INET && alen == 4 && e->v6only == -1) {
        e->addr.v4.sin_family = AF_INET;
        e->addr.v4.sin_port = htons((uint16_t)port);
        memcpy(&e->addr.v4.sin_addr, a, 4);
        e->addrlen = sizeof e->addr.v4;
    } else if (e->family == AF_INET6 && alen == 16) {
        e->addr.v6.sin6_family = AF_INET6;
        e->addr.v6.sin6_port = htons((uint16_t)port);
        memcpy(&e->addr.v6.sin6_addr, a, 16);  /* scope id 0: no zone comes here */
        e->addrlen = sizeof e->addr.v6;
    } else {
        return -1;
    }
    e->devlen = (size_t)PyBytes_GET_SIZE(f[5]);
    if (e->devlen >= IFNAMSIZ || memchr(PyBytes_AS_STRING(f[5]), 0, e->devlen)) return -1;
    memcpy(e->dev, PyBytes_AS_STRING(f[5]), e->devlen);
    e->dev[e->devlen] = 0;
    e->result = f[10];
    e->info = f[11];
    return 0;
}

/* socket() with the client's filesystem ids, so the socket is the client's.
 * The fd, or -1 (nothing open); -2 with an exception when this thread's own
 * ids could not be put back (the broker must stop: nothing else would be
 * made as root). */
static int socket_as(const struct sock_entry *e, uid_t uid, gid_t gid) {
    int old_gid = setfsgid(gid);
    if (setfsgid((gid_t)-1) != (int)gid) {
        setfsgid((gid_t)old_gid);
        return -1;
    }
    int old_uid = setfsuid(uid), fd = -1;
    if (setfsuid((uid_t)-1) == (int)uid)
        fd = socket(e->family, e->type | SOCK_CLOEXEC, e->proto);
    setfsuid((uid_t)old_uid);
    setfsgid((gid_t)old_gid);
    if (setfsuid((uid_t)-1) != old_uid || setfsgid((gid_t)-1) != old_gid) {
        if (fd >= 0) close(fd);
        PyErr_SetString(PyExc_RuntimeError, "the filesystem ids could not be restored");
        return -2;
    }
    return fd;
}

static int opt_int(int fd, int level, int name) {
    int v = -1;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, name, &v, &len) || len != sizeof v) return -1;
    return v;
}

/* Whether the kernel made what the entry asks: 0 yes, -1 no. */
static int made_as_asked(int fd, const struct sock_entry *e) {
    if (opt_int(fd, SOL_SOCKET, SO_DOMAIN) != e->family ||
        opt_int(fd, SOL_SOCKET, SO_TYPE) != e->type ||
        opt_int(fd, SOL_SOCKET, SO_PROTOCOL) != e->proto ||
        opt_int(fd, SOL_SOCKET, SO_ACCEPTCONN) != (e->type == SOCK_STREAM))
        return -1;
    char dev[IFNAMSIZ + 1] = { 0 };
    socklen_t dlen = IFNAMSIZ;
    if (getsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, dev, &dlen)) return -1;
    if (strnlen(dev, IFNAMSIZ) != e->devlen || memcmp(dev, e->dev, e->devlen)) return -1;
    struct sockaddr_storage got;
    socklen_t glen = sizeof got;
    if (getsockname(fd, (struct sockaddr *)&got, &glen) || glen != e->addrlen) return -1;
    if (e->family == AF_INET) {
        const struct sockaddr_in *g = (const struct sockaddr_in *)&got;
        return g->sin_port == e->addr.v4.sin_port &&
               !memcmp(&g->sin_addr, &e->addr.v4.sin_addr, 4) ? 0 : -1;
    }
    const struct sockaddr_in6 *g = (const struct sockaddr_in6 *)&got;
    return g->sin6_port == e->addr.v6.sin6_port && g->sin6_scope_id == 0 &&
           !memcmp(&g->sin6_addr, &e->addr.v6.sin6_addr, 16) ? 0 : -1;
}

/* The socket the entry describes, owned by uid:gid, bound (and listening);
 * -1 with nothing open, or -2 with an exception (socket_as). */
static int make(const struct sock_entry *e, uid_t uid, gid_t gid) {
    int fd = socket_as(e, uid, gid), one = 1;
    if (fd < 0) return fd;
    if ((e->devlen && setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, e->dev, (socklen_t)e->devlen)) ||
        (e->v6only >= 0 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &e->v6only, sizeof e->v6only)) ||
        (e->reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) ||
        (e->reuseaddr && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one)) ||
        bind(fd, (const struct sockaddr *)&e->addr, e->addrlen) ||
        (e->type == SOCK_STREAM && listen(fd, e->backlog)) || made_as_asked(fd, e)) {
        close(fd);
        return -1;
    }
    return fd;
}

PyObject *serve_socket(int sock, PyObject *table, const struct sock_req *req, long uid,
                       long gid, long room, long room_if_read) {
    int drained = 0, fd = -1;
    PyObject *key = NULL, *value = NULL, *reply = NULL, *fds = NULL, *out = NULL;
    struct sock_entry e;
    PyObject *target = PyUnicode_DecodeUTF8((const char *)req->target, (Py_ssize_t)req->len, NULL);
    if (!target) goto slow;
    key = Py_BuildValue("(NKOO)", target, (unsigned long long)req->backlog,
                        req->v6only < 0 ? Py_None : req->v6only ? Py_True : Py_False,
                        req->reuse_port ? Py_True : Py_False);
    if (!key) goto slow;
    value = PyDict_GetItemWithError(table, key);
    if (!value) goto slow;
    Py_INCREF(value);  /* ours until the reply is built, whatever the table does */
    if (read_entry(value, &e) || !budget_fits(sock, 1, room, room_if_read, &drained)) goto slow;
    fd = make(&e, (uid_t)uid, (gid_t)gid);
    if (fd == -2) goto error;
    if (fd < 0) goto slow;
    reply = build_one_reply(cfg.op_socket, req->id, e.result);
    if (!reply) goto slow;

    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } rights;
    memset(&rights, 0, sizeof rights);  /* the padding goes to the kernel too */
    struct iovec iov = { PyBytes_AS_STRING(reply), (size_t)PyBytes_GET_SIZE(reply) };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = rights.buf,
                          .msg_controllen = sizeof rights.buf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) == PyBytes_GET_SIZE(reply)) {
        close(fd);
        fd = -1;
        Py_CLEAR(reply);
        Py_INCREF(Py_None);
        reply = Py_None;
        Py_INCREF(Py_None);
        fds = Py_None;
    } else {
        fds = Py_BuildValue("[i]", fd);  /* the caller queues the reply and owns the fd */
        if (!fds) goto error;
    }
    out = Py_BuildValue("(iiNNOi)", 2, 1, reply, fds, e.info, drained);
    reply = fds = NULL;  /* stolen by Py_BuildValue, even when it fails */
    /* Out of memory here, after a send, is as in _fast.c: the exception
     * closes the connection as an internal error (logged and counted), the
     * one way a socket goes out with no allow record. */
    if (!out) goto error;
    Py_DECREF(key);
    Py_DECREF(value);
    return out;

error:
    /* Out of memory, or the ids not restored, before the caller had the fd. */
    if (fd >= 0 && !fds) close(fd);
    Py_XDECREF(fds);
    Py_XDECREF(reply);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return NULL;

slow:
    PyErr_Clear();
    if (fd >= 0) close(fd);
    Py_XDECREF(reply);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return NULL;
}
