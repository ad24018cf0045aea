/* _fastwire.c: the msgpack privbroker.broker.files._fast reads and writes, and a received
 * datagram handed back to Python as socket.recvmsg would have returned it.
 *
 * The reader takes a strict subset of what client/protocol/codec.py accepts (only the
 * encodings msgpack-python writes for an OPEN or a SOCKET request, plus wider ints):
 * a message outside it is not an error here, only not fast, and the Python
 * broker decodes it (tests/files/test_fastpath.py and tests/net/test_fastsock.py
 * compare the two). The writer produces byte for byte what msgpack.packb
 * writes for an OPEN or SOCKET reply, from results that client/protocol/codec.py packed.
 */
#include "_fast.h"

#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------ msgpack in */

struct rd { const uint8_t *p, *end; };

static int rd_u64(struct rd *r, uint64_t *v) {
    if (r->p >= r->end) return -1;
    uint8_t b = *r->p++;
    int n;
    if (b <= 0x7f) { *v = b; return 0; }
    if (b == 0xcc) n = 1;
    else if (b == 0xcd) n = 2;
    else if (b == 0xce) n = 4;
    else if (b == 0xcf) n = 8;
    else return -1;
    if (r->end - r->p < n) return -1;
    *v = 0;
    for (int i = 0; i < n; i++) *v = *v << 8 | r->p[i];
    r->p += n;
    return 0;
}

static int rd_array(struct rd *r, uint32_t *n) {
    if (r->p >= r->end) return -1;
    uint8_t b = *r->p++;
    if ((b & 0xf0) == 0x90) { *n = b & 0x0f; return 0; }
    if (b == 0xdc && r->end - r->p >= 2) { *n = (uint32_t)r->p[0] << 8 | r->p[1]; r->p += 2; return 0; }
    return -1;
}

static int rd_str(struct rd *r, const uint8_t **s, size_t *len) {
    if (r->p >= r->end) return -1;
    uint8_t b = *r->p++;
    size_t n;
    if ((b & 0xe0) == 0xa0) n = b & 0x1f;
    else if (b == 0xd9 && r->end - r->p >= 1) { n = r->p[0]; r->p += 1; }
    else if (b == 0xda && r->end - r->p >= 2) { n = (size_t)r->p[0] << 8 | r->p[1]; r->p += 2; }
    else return -1;
    if ((size_t)(r->end - r->p) < n) return -1;
    *s = r->p;
    *len = n;
    r->p += n;
    return 0;
}

/* [VERSION, OPEN, id, [[path, access, false], ...]] and nothing after it.
 * Fills items[i].path/len (pointing into the datagram) and access. */
int decode_open(const uint8_t *buf, size_t size, uint64_t *id, struct item *items,
                       uint32_t *count, const uint8_t **raw_paths) {
    struct rd r = { buf, buf + size };
    uint32_t n;
    uint64_t v;
    if (rd_array(&r, &n) || n != 4) return -1;
    if (rd_u64(&r, &v) || v != (uint64_t)cfg.version) return -1;
    if (rd_u64(&r, &v) || v != (uint64_t)cfg.op_open) return -1;
    if (rd_u64(&r, id) || *id > cfg.max_id) return -1;
    if (rd_array(&r, count) || *count < 1 || *count > (uint32_t)cfg.max_batch) return -1;
    for (uint32_t i = 0; i < *count; i++) {
        const uint8_t *s;
        size_t len;
        if (rd_array(&r, &n) || n != 3 || rd_str(&r, &s, &len)) return -1;
        if (rd_u64(&r, &v) || v > (uint64_t)cfg.max_access) return -1;
        if (r.p >= r.end || *r.p++ != 0xc2) return -1;  /* exclusive: false only */
        raw_paths[i] = s;
        items[i].len = len;
        items[i].access = (long)v;
    }
    return r.p == r.end ? 0 : -1;
}

/* [VERSION, SOCKET, id, target, backlog, v6only, reuse_port] and nothing after it:
 * the target's bytes point into the datagram; v6only nil, false or true. */
int decode_socket(const uint8_t *buf, size_t size, struct sock_req *req) {
    struct rd r = { buf, buf + size };
    uint32_t n;
    uint64_t v;
    if (rd_array(&r, &n) || n != 7) return -1;
    if (rd_u64(&r, &v) || v != (uint64_t)cfg.version) return -1;
    if (rd_u64(&r, &v) || v != (uint64_t)cfg.op_socket) return -1;
    if (rd_u64(&r, &req->id) || req->id > cfg.max_id) return -1;
    /* At most max_target bytes: a text of more characters has more bytes. */
    if (rd_str(&r, &req->target, &req->len) || req->len < 1 || req->len > cfg.max_target)
        return -1;
    if (rd_u64(&r, &req->backlog) || req->backlog > (uint64_t)cfg.max_backlog) return -1;
    if (r.end - r.p != 2) return -1;
    switch (r.p[0]) {
    case 0xc0: req->v6only = -1; break;
    case 0xc2: req->v6only = 0; break;
    case 0xc3: req->v6only = 1; break;
    default: return -1;
    }
    if (r.p[1] != 0xc2 && r.p[1] != 0xc3) return -1;
    req->reuse_port = r.p[1] == 0xc3;
    return 0;
}

/* ----------------------------------------------------------- msgpack out */

static size_t put_uint(uint8_t *p, uint64_t v) {
    if (v <= 0x7f) { p[0] = (uint8_t)v; return 1; }
    int n; uint8_t tag;
    if (v <= 0xff) { tag = 0xcc; n = 1; }
    else if (v <= 0xffff) { tag = 0xcd; n = 2; }
    else if (v <= 0xffffffffULL) { tag = 0xce; n = 4; }
    else { tag = 0xcf; n = 8; }
    p[0] = tag;
    for (int i = 0; i < n; i++) p[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    return 1 + (size_t)n;
}

/* [VERSION, OPEN, id, [result, ...]], each result already msgpack (the
 * table's bytes, packed by client/protocol/codec.py): as msgpack.packb would write it. */
PyObject *build_reply(uint64_t id, PyObject *const *results, uint32_t count) {
    uint8_t head[32];  /* 1 + 1 + 1 (configure() keeps both < 128) + 9 + 3 */
    size_t h = 0, size;
    head[h++] = 0x94;
    h += put_uint(head + h, (uint64_t)cfg.version);
    h += put_uint(head + h, (uint64_t)cfg.op_open);
    h += put_uint(head + h, id);
    if (count <= 15) head[h++] = (uint8_t)(0x90 | count);
    else { head[h++] = 0xdc; head[h++] = (uint8_t)(count >> 8); head[h++] = (uint8_t)count; }
    size = h;
    for (uint32_t i = 0; i < count; i++) size += (size_t)PyBytes_GET_SIZE(results[i]);
    if (size > cfg.max_reply) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, head, h);
    p += h;
    for (uint32_t i = 0; i < count; i++) {
        memcpy(p, PyBytes_AS_STRING(results[i]), (size_t)PyBytes_GET_SIZE(results[i]));
        p += PyBytes_GET_SIZE(results[i]);
    }
    return out;
}

/* [VERSION, op, id, result], the result already msgpack (a SOCKET reply). */
PyObject *build_one_reply(long op, uint64_t id, PyObject *result) {
    uint8_t head[16];  /* 1 + 1 + 1 (configure() keeps both < 128) + 9 */
    size_t h = 0;
    head[h++] = 0x94;
    h += put_uint(head + h, (uint64_t)cfg.version);
    h += put_uint(head + h, (uint64_t)op);
    h += put_uint(head + h, id);
    size_t size = h + (size_t)PyBytes_GET_SIZE(result);
    if (size > cfg.max_reply) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) return NULL;
    memcpy(PyBytes_AS_STRING(out), head, h);
    memcpy(PyBytes_AS_STRING(out) + h, PyBytes_AS_STRING(result),
           (size_t)PyBytes_GET_SIZE(result));
    return out;
}

/* ------------------------------------------------------------ datagrams */

/* What recvmsg returned, as socket.recvmsg returns it: (0, data, ancdata,
 * flags, remount), `remount` true when the mount table changed (the poll
 * that saw it took the news: the caller must read the table again). */
PyObject *as_received(const uint8_t *data, ssize_t n, struct msghdr *msg, int remount) {
    PyObject *anc = PyList_New(0);
    if (!anc) return NULL;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        size_t len = c->cmsg_len - CMSG_LEN(0);
        PyObject *t = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, CMSG_DATA(c),
                                    (Py_ssize_t)len);
        if (!t || PyList_Append(anc, t)) {
            /* fds that did arrive must not leak: close them before failing */
            Py_XDECREF(t);
            Py_DECREF(anc);
            return NULL;
        }
        Py_DECREF(t);
    }
    return Py_BuildValue("(iy#Nii)", 0, (const char *)data, (Py_ssize_t)n, anc, msg->msg_flags,
                         remount);
}

void close_received_fds(struct msghdr *msg) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) close(((int *)CMSG_DATA(c))[i]);
    }
}

/* ------------------------------------------------------- for the tests */

PyObject *py_decode_open(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE)) return NULL;
    static struct item items[FAST_MAX_ITEMS];
    static const uint8_t *raw[FAST_MAX_ITEMS];
    uint64_t id;
    uint32_t count = 0;
    PyObject *out = NULL;
    if (!cfg.ready || (size_t)b.len > cfg.max_request ||
        decode_open(b.buf, (size_t)b.len, &id, items, &count, raw)) {
        PyBuffer_Release(&b);
        Py_RETURN_NONE;
    }
    /* Paths as serve() reads them: strict UTF-8, or the request is not fast. */
    PyObject *list = PyList_New(count);
    for (uint32_t i = 0; list && i < count; i++) {
        PyObject *path = PyUnicode_DecodeUTF8((const char *)raw[i], (Py_ssize_t)items[i].len, NULL);
        if (!path) {
            PyErr_Clear();
            Py_CLEAR(list);
            PyBuffer_Release(&b);
            Py_RETURN_NONE;
        }
        PyObject *t = Py_BuildValue("(Nl)", path, items[i].access);
        if (!t) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, i, t);
    }
    if (list) out = Py_BuildValue("(KN)", (unsigned long long)id, list);
    PyBuffer_Release(&b);
    return out;
}

PyObject *py_decode_socket(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE)) return NULL;
    struct sock_req req;
    if (!cfg.ready || (size_t)b.len > cfg.max_request || decode_socket(b.buf, (size_t)b.len, &req)) {
        PyBuffer_Release(&b);
        Py_RETURN_NONE;
    }
    /* The key serve() looks up: (target, backlog, v6only, reuse_port). */
    PyObject *target = PyUnicode_DecodeUTF8((const char *)req.target, (Py_ssize_t)req.len, NULL);
    PyBuffer_Release(&b);
    if (!target) { PyErr_Clear(); Py_RETURN_NONE; }
    PyObject *v6 = req.v6only < 0 ? Py_None : req.v6only ? Py_True : Py_False;
    return Py_BuildValue("(K(NKOO))", (unsigned long long)req.id, target,
                         (unsigned long long)req.backlog, v6,
                         req.reuse_port ? Py_True : Py_False);
}

PyObject *py_build_reply(PyObject *self, PyObject *args) {
    unsigned long long id;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "KO!", &id, &PyList_Type, &list)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n < 1 || n > cfg.max_batch) return PyErr_Format(PyExc_ValueError, "1 to max_batch results");
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(list, i)))
            return PyErr_Format(PyExc_TypeError, "results are bytes");
    PyObject *r = build_reply(id, &PyList_GET_ITEM(list, 0), (uint32_t)n);
    if (!r && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "reply over max_reply");
    return r;
}

