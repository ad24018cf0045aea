/* floor_sock: the floor for privbroker's SOCKET round trip (bind_privileged), in C.
 *
 * The broker side speaks privbroker's SOCKET operation (client/protocol/), so
 * privbroker's own Client and the C client here both talk to it: an abstract
 * SOCK_SEQPACKET socket with SO_PASSCRED, SO_PEERCRED read at accept, every
 * request's SCM_CREDENTIALS compared with it, and for each request
 * socket(2) + bind(2) + listen(2) as root, the fd back with SCM_RIGHTS, then
 * closed. No policy, no setfsuid, no checks of the socket made, no logging:
 * whatever privbroker costs above this is its own cost.
 *
 *   request  [1, 5, id, "tcp:A.B.C.D:PORT", backlog, v6only, reuse_port]
 *   reply    [1, 5, id, [errno, false, reason, nil]] + the fd
 *
 *   floor_sock broker NAME               serve @NAME; "ready" on stdout
 *   floor_sock lat NAME TARGET N WARM    N sequential requests on one connection,
 *                                        each fd received and closed; prints
 *                                        {"n","p50_us","p99_us","mean_us"}
 *   floor_sock direct PORT N WARM        socket+bind(127.0.0.1:PORT)+listen+close
 *                                        in-process, same output
 *   floor_sock spawn N WARM PROG ARG...  posix_spawn PROG N times, waiting for
 *                                        each (exit status 0 required): per exec
 *
 * Build: cc -O2 -o floor_sock floor_sock.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <spawn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAX_CONN 4096

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* ---------------------------------------------------------------- msgpack */

struct rd { const uint8_t *p, *end; };

static int need(struct rd *r, size_t n) { return (size_t)(r->end - r->p) >= n; }

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

static int rd_array(struct rd *r, uint32_t *n) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    if ((b & 0xf0) == 0x90) { *n = b & 0x0f; return 0; }
    if (b == 0xdc && need(r, 2)) { *n = be(r->p, 2); r->p += 2; return 0; }
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
    if ((b & 0xe0) == 0xa0) *len = b & 0x1f;
    else if (b == 0xd9 && need(r, 1)) *len = *r->p++;
    else return -1;
    if (!need(r, *len)) return -1;
    *s = (const char *)r->p;
    r->p += *len;
    return 0;
}

/* nil or a bool */
static int rd_opt_bool(struct rd *r) {
    if (!need(r, 1)) return -1;
    uint8_t b = *r->p++;
    return b == 0xc0 || b == 0xc2 || b == 0xc3 ? 0 : -1;
}

static uint8_t *wr_uint(uint8_t *w, uint64_t v) {
    if (v < 0x80) { *w++ = v; return w; }
    *w++ = 0xcf;
    for (int i = 7; i >= 0; i--) *w++ = v >> (8 * i);
    return w;
}

/* ------------------------------------------------------------- the broker */

/* "tcp:A.B.C.D:PORT" -> an IPv4 address; 0 or an errno. */
static int parse_target(const char *s, uint32_t n, struct sockaddr_in *a) {
    char buf[64];
    if (n < 5 || n >= sizeof buf || memcmp(s, "tcp:", 4)) return EINVAL;
    memcpy(buf, s + 4, n - 4);
    buf[n - 4] = 0;
    char *colon = strrchr(buf, ':');
    if (!colon) return EINVAL;
    *colon = 0;
    int port = atoi(colon + 1);
    if (port < 1 || port > 65535 || inet_pton(AF_INET, buf, &a->sin_addr) != 1) return EINVAL;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    return 0;
}

/* One request: 0 when answered, -1 to close the connection. */
static int serve(int c, const uint8_t *req, size_t len) {
    struct rd r = { req, req + len };
    uint32_t n, tlen;
    uint64_t version, op, id, backlog;
    const char *target;
    if (rd_array(&r, &n) || n != 7 || rd_uint(&r, &version) || version != 1 ||
        rd_uint(&r, &op) || op != 5 || rd_uint(&r, &id) || rd_str(&r, &target, &tlen) ||
        rd_uint(&r, &backlog) || rd_opt_bool(&r) || rd_opt_bool(&r) || r.p != r.end)
        return -1;
    struct sockaddr_in a = { 0 };
    int err = parse_target(target, tlen, &a), fd = -1;
    if (!err) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (void *)&a, sizeof a) < 0 ||
            listen(fd, backlog ? (int)backlog : 65535) < 0) {
            err = errno;
            if (fd >= 0) close(fd);
            fd = -1;
        }
    }
    uint8_t out[128], *w = out;
    *w++ = 0x94;
    *w++ = 1;
    *w++ = 5;
    w = wr_uint(w, id);
    *w++ = 0x94;
    w = wr_uint(w, err);
    *w++ = 0xc2; /* denied: false */
    *w++ = 0xa0; /* reason: "" */
    *w++ = 0xc0; /* rule: nil */
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec io = { out, (size_t)(w - out) };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1 };
    if (fd >= 0) {
        memset(cbuf, 0, sizeof cbuf);
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &fd, sizeof fd);
    }
    sendmsg(c, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (fd >= 0) close(fd);
    return 0;
}

static int broker(const char *name) {
    static struct ucred peers[MAX_CONN];
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    size_t n = strlen(name);
    if (n > sizeof a.sun_path - 2) return 2;
    memcpy(a.sun_path + 1, name, n);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    if (bind(s, (void *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0 ||
        listen(s, 128) < 0)
        die("floor_sock: bind");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = s }, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    printf("ready\n");
    fflush(stdout);
    uint8_t req[4096];
    char cbuf[CMSG_SPACE(sizeof(struct ucred))];
    for (;;) {
        int k = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == s) {
                int c;
                while ((c = accept4(s, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    socklen_t l = sizeof peers[0];
                    if (c >= MAX_CONN || getsockopt(c, SOL_SOCKET, SO_PEERCRED, &peers[c], &l)) {
                        close(c);
                        continue;
                    }
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
                if (r < 0 && errno == EAGAIN) break;
                struct cmsghdr *h = r > 0 ? CMSG_FIRSTHDR(&m) : NULL;
                struct ucred cr;
                if (h && h->cmsg_type == SCM_CREDENTIALS) memcpy(&cr, CMSG_DATA(h), sizeof cr);
                if (!h || h->cmsg_type != SCM_CREDENTIALS || (m.msg_flags & MSG_TRUNC) ||
                    cr.uid != peers[fd].uid || cr.gid != peers[fd].gid || serve(fd, req, r)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                    break;
                }
            }
        }
    }
}

/* ------------------------------------------------------------- the client */

static int dial(const char *name) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    size_t n = strlen(name);
    memcpy(a.sun_path + 1, name, n);
    int c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(c, SOL_SOCKET, SO_PASSCRED, &one, sizeof one); /* as the Client does */
    if (connect(c, (void *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0)
        die("floor_sock: connect");
    return c;
}

/* One round trip: the socket received, checked and closed. */
static void round_trip(int c, uint32_t id, const char *target) {
    uint8_t req[128], rep[1024], *w = req;
    size_t tlen = strlen(target);
    *w++ = 0x97;
    *w++ = 1;
    *w++ = 5;
    *w++ = 0xce;
    *w++ = id >> 24; *w++ = id >> 16; *w++ = id >> 8; *w++ = id;
    *w++ = 0xa0 | tlen;
    memcpy(w, target, tlen);
    w += tlen;
    *w++ = 0;    /* backlog: the system's maximum */
    *w++ = 0xc0; /* v6only: nil */
    *w++ = 0xc2; /* reuse_port: false */
    if (send(c, req, w - req, MSG_NOSIGNAL) != w - req) die("floor_sock: send");
    char cbuf[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct ucred))];
    struct iovec io = { rep, sizeof rep };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1,
                        .msg_control = cbuf, .msg_controllen = sizeof cbuf };
    ssize_t r = recvmsg(c, &m, MSG_CMSG_CLOEXEC);
    if (r <= 0) die("floor_sock: recvmsg");
    int fd = -1;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
    struct rd d = { rep + 3, rep + r };
    uint64_t rid = 0, err = 0;
    uint32_t k;
    int ok = r > 3 && rep[0] == 0x94 && rep[1] == 1 && rep[2] == 5 && !rd_uint(&d, &rid) &&
             rid == id && !rd_array(&d, &k) && k == 4 && !rd_uint(&d, &err) && !err && fd >= 0;
    if (fd >= 0) close(fd);
    if (!ok) {
        fprintf(stderr, "floor_sock: bad reply (id %llu, errno %llu, fd %d)\n",
                (unsigned long long)rid, (unsigned long long)err, fd);
        exit(1);
    }
}

static void direct(const struct sockaddr_in *a) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (const void *)a, sizeof *a) < 0 || listen(fd, 65535) < 0)
        die("floor_sock: direct");
    close(fd);
}

static void spawn(char **argv) {
    pid_t pid;
    int st, e = posix_spawn(&pid, argv[0], NULL, NULL, argv, environ);
    if (e) {
        errno = e;
        die("floor_sock: posix_spawn");
    }
    if (waitpid(pid, &st, 0) < 0) die("floor_sock: waitpid");
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        fprintf(stderr, "floor_sock: %s exited with status %d\n", argv[0], st);
        exit(1);
    }
}

static int cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void report(int64_t *t, int n) {
    double sum = 0;
    for (int i = 0; i < n; i++) sum += t[i];
    qsort(t, n, sizeof *t, cmp);
    printf("{\"n\": %d, \"p50_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f}\n", n,
           t[n / 2] / 1e3, t[(int)(n * 0.99)] / 1e3, sum / n / 1e3);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "broker")) return broker(argv[2]);
    int lat = argc == 6 && !strcmp(argv[1], "lat");
    int dir = argc == 5 && !strcmp(argv[1], "direct");
    int spw = argc >= 5 && !strcmp(argv[1], "spawn");
    if (!lat && !dir && !spw) {
        fprintf(stderr, "usage: see the comment at the top of floor_sock.c\n");
        return 2;
    }
    int n = atoi(argv[lat ? 4 : dir ? 3 : 2]), warm = atoi(argv[lat ? 5 : dir ? 4 : 3]);
    if (n < 1 || warm < 0 || (lat && strlen(argv[3]) > 31)) return 2;
    int c = lat ? dial(argv[2]) : -1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int64_t *t = malloc(sizeof *t * n);
    for (int i = -warm; i < n; i++) {
        int64_t t0 = now_ns();
        if (lat) round_trip(c, i + warm + 1, argv[3]);
        else if (dir) direct(&a);
        else spawn(argv + 4);
        if (i >= 0) t[i] = now_ns() - t0;
    }
    report(t, n);
    return 0;
}
