/* floor_broker: privbroker's round trip with nothing else, in C.
 *
 * Speaks privbroker's wire protocol (client/protocol/), so the project's
 * own client, the C load generator and a plain Python client can all talk to
 * it: an abstract SOCK_SEQPACKET socket with SO_PASSCRED, SO_PEERCRED read at
 * accept, every request's SCM_CREDENTIALS compared with it, the msgpack
 * request decoded, open(2) of each path, a msgpack reply with the fds as
 * SCM_RIGHTS. No policy, no path checks, no logging: whatever privbroker costs
 * above this is its own cost (refbroker.c in ../shared/bench is the same idea
 * with a bare path-in, errno-out protocol).
 *
 *   request  [1, 1, id, [[path, access, exclusive], ...]]   (1..250 items)
 *   reply    [1, 1, id, [[errno, denied, reason, rule], ...]] + fds
 *
 * Build: cc -O2 -o floor_broker floor_broker.c     Run: ./floor_broker NAME
 * Prints "ready" on stdout once listening. A malformed request closes the
 * connection, as privbroker does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_BATCH 250
#define MAX_REQ (128 * 1024)
#define MAX_REPLY (200 * 1024)

struct peer { int uid, gid; };
static struct peer *peers;
static int npeers;

/* ---------------------------------------------------------- msgpack read */

struct rd { const uint8_t *p, *end; };

static int need(struct rd *r, size_t n) { return (size_t)(r->end - r->p) >= n; }

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

static int rd_array(struct rd *r, uint32_t *n) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    if ((b & 0xf0) == 0x90) { *n = b & 0x0f; return 0; }
    if (b == 0xdc && need(r, 2)) { *n = be(r->p, 2); r->p += 2; return 0; }
    if (b == 0xdd && need(r, 4)) { *n = be(r->p, 4); r->p += 4; return 0; }
    return -1;
}

static int rd_uint(struct rd *r, uint64_t *v) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    if (b < 0x80) { *v = b; return 0; }
    int n = b == 0xcc ? 1 : b == 0xcd ? 2 : b == 0xce ? 4 : b == 0xcf ? 8 : 0;
    if (!n || !need(r, n)) return -1;
    *v = be(r->p, n);
    r->p += n;
    return 0;
}

static int rd_str(struct rd *r, const char **s, uint32_t *len) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    int n = 0;
    if ((b & 0xe0) == 0xa0) *len = b & 0x1f;
    else if (b == 0xd9) n = 1;
    else if (b == 0xda) n = 2;
    else if (b == 0xdb) n = 4;
    else return -1;
    if (n) {
        if (!need(r, n)) return -1;
        *len = be(r->p, n);
        r->p += n;
    }
    if (!need(r, *len)) return -1;
    *s = (const char *)r->p;
    r->p += *len;
    return 0;
}

static int rd_bool(struct rd *r, int *v) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    if (b != 0xc2 && b != 0xc3) return -1;
    *v = b == 0xc3;
    return 0;
}

/* --------------------------------------------------------- msgpack write */

static uint8_t *wr_uint(uint8_t *w, uint64_t v) {
    if (v < 0x80) { *w++ = v; return w; }
    if (v <= 0xff) { *w++ = 0xcc; *w++ = v; return w; }
    if (v <= 0xffff) { *w++ = 0xcd; *w++ = v >> 8; *w++ = v; return w; }
    if (v <= 0xffffffffu) {
        *w++ = 0xce;
        for (int i = 3; i >= 0; i--) *w++ = v >> (8 * i);
        return w;
    }
    *w++ = 0xcf;
    for (int i = 7; i >= 0; i--) *w++ = v >> (8 * i);
    return w;
}

static uint8_t *wr_array(uint8_t *w, uint32_t n) {
    if (n < 16) { *w++ = 0x90 | n; return w; }
    *w++ = 0xdc; *w++ = n >> 8; *w++ = n;
    return w;
}

static uint8_t *wr_str(uint8_t *w, const char *s, uint32_t n) {
    if (n < 32) *w++ = 0xa0 | n;
    else { *w++ = 0xd9; *w++ = n; }  /* our reasons are short */
    memcpy(w, s, n);
    return w + n;
}

/* ------------------------------------------------------------ the broker */

static int open_flags(uint64_t access) {
    int f = (access & 6) ? ((access & 1) ? O_RDWR : O_WRONLY) : O_RDONLY;
    if (access & 4) f |= O_APPEND;
    return f | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW;
}

static void drop(int ep, int c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL);
    close(c);
}

/* One request: 0 when answered, -1 to close the connection. */
static int serve(int c, const uint8_t *req, size_t len) {
    static uint8_t out[MAX_REPLY];
    static char path[4097];
    int fds[MAX_BATCH], nfd = 0;
    struct rd r = { req, req + len };
    uint32_t n, items;
    uint64_t version, op, id;
    if (rd_array(&r, &n) || n != 4 || rd_uint(&r, &version) || version != 1 ||
        rd_uint(&r, &op) || op != 1 || rd_uint(&r, &id) || rd_array(&r, &items) ||
        items < 1 || items > MAX_BATCH)
        return -1;
    uint8_t *w = out;
    w = wr_array(w, 4);
    w = wr_uint(w, 1);
    w = wr_uint(w, 1);
    w = wr_uint(w, id);
    w = wr_array(w, items);
    int bad = 0;
    for (uint32_t i = 0; i < items; i++) {
        uint32_t k, plen;
        const char *p;
        uint64_t access;
        int excl;
        if (rd_array(&r, &k) || k != 3 || rd_str(&r, &p, &plen) || plen > 4096 ||
            rd_uint(&r, &access) || rd_bool(&r, &excl)) {
            bad = 1;
            break;
        }
        memcpy(path, p, plen);
        path[plen] = 0;
        int fd = open(path, open_flags(access));
        w = wr_array(w, 4);
        if (fd >= 0) {
            fds[nfd++] = fd;
            w = wr_uint(w, 0);
            *w++ = 0xc2;          /* denied: false */
            w = wr_str(w, "", 0); /* reason */
            *w++ = 0xc0;          /* rule: nil */
        } else {
            const char *why = strerror(errno);
            w = wr_uint(w, errno);
            *w++ = 0xc2;
            w = wr_str(w, why, strlen(why) > 200 ? 200 : strlen(why));
            *w++ = 0xc0;
        }
    }
    if (!bad && r.p == r.end) {
        char cbuf[CMSG_SPACE(sizeof(int) * MAX_BATCH)];
        struct iovec io = { out, (size_t)(w - out) };
        struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1 };
        if (nfd) {
            memset(cbuf, 0, CMSG_SPACE(sizeof(int) * nfd));
            m.msg_control = cbuf;
            m.msg_controllen = CMSG_SPACE(sizeof(int) * nfd);
            struct cmsghdr *h = CMSG_FIRSTHDR(&m);
            h->cmsg_level = SOL_SOCKET;
            h->cmsg_type = SCM_RIGHTS;
            h->cmsg_len = CMSG_LEN(sizeof(int) * nfd);
            memcpy(CMSG_DATA(h), fds, sizeof(int) * nfd);
        }
        /* A client that does not read its replies loses them (privbroker
           queues instead); the load generators always read. */
        sendmsg(c, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    for (int i = 0; i < nfd; i++)
        close(fds[i]);
    return bad || r.p != r.end ? -1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: floor_broker NAME\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    npeers = rl.rlim_cur > 1 << 20 ? 1 << 20 : (int)rl.rlim_cur;
    peers = calloc(npeers, sizeof *peers);
    const char *name = argv[1];
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    size_t n = strlen(name);
    memcpy(a.sun_path + 1, name, n);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    if (bind(s, (void *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0 ||
        listen(s, 4096) < 0) {
        perror("floor_broker: bind");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = s }, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    printf("ready\n");
    fflush(stdout);
    static uint8_t req[MAX_REQ + 1];
    char cbuf[CMSG_SPACE(sizeof(struct ucred))];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == s) {
                int c;
                while ((c = accept4(s, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct ucred cr;
                    socklen_t l = sizeof cr;
                    if (c >= npeers || getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &l) < 0) {
                        close(c);
                        continue;
                    }
                    peers[c].uid = cr.uid;
                    peers[c].gid = cr.gid;
                    struct epoll_event e = { .events = EPOLLIN, .data.fd = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
                }
                continue;
            }
            for (;;) {
                struct iovec io = { req, sizeof req };
                struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1,
                                    .msg_control = cbuf, .msg_controllen = sizeof cbuf };
                ssize_t r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
                if (r < 0 && errno == EAGAIN)
                    break;
                if (r <= 0 || (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
                    drop(ep, fd);
                    break;
                }
                struct cmsghdr *h = CMSG_FIRSTHDR(&m);
                struct ucred cr;
                if (!h || h->cmsg_type != SCM_CREDENTIALS) {
                    drop(ep, fd);
                    break;
                }
                memcpy(&cr, CMSG_DATA(h), sizeof cr);
                if ((int)cr.uid != peers[fd].uid || (int)cr.gid != peers[fd].gid ||
                    serve(fd, req, r) < 0) {
                    drop(ep, fd);
                    break;
                }
            }
        }
    }
}
