/* floor_client: a C client speaking privbroker's real wire protocol.
 *
 * It costs next to nothing per request, so whatever a broker's figure shows
 * is the broker's (privbroker's or floor_broker's), not the client's.
 *
 *   floor_client lat NAME PATH N         N sequential opens on one connection;
 *                                        prints {"n","p50_us","p99_us","mean_us"}
 *   floor_client direct PATH N           N open(2)+close(2) in-process, same output
 *   floor_client load NAME PATH NPROC SECONDS
 *                                        NPROC forked clients, each on its own
 *                                        connection doing sequential opens for
 *                                        SECONDS; prints {"procs","ops","ops_per_s"}
 *   floor_client hold NAME PATH N        open N connections, one open on each,
 *                                        print "ready K" (K < N when the broker
 *                                        stopped serving new ones: K were held),
 *                                        hold them until stdin reaches EOF
 *
 * Every request is [1, 1, id, [[PATH, 1 (read), false]]]; every reply is
 * checked for its id, errno 0 and exactly one fd, which is closed.
 * Build: cc -O2 -o floor_client floor_client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int try_dial(const char *name) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    size_t n = strlen(name);
    memcpy(a.sun_path + 1, name, n);
    int c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    int one = 1;
    if (c < 0)
        return -1;
    /* As client/connection.py does: replies then carry SCM_CREDENTIALS. */
    setsockopt(c, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    if (connect(c, (void *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0) {
        close(c);
        return -1;
    }
    return c;
}

static int dial(const char *name) {
    int c = try_dial(name);
    if (c < 0)
        die("floor_client: connect");
    return c;
}

/* The request [1, 1, id, [[path, 1, false]]] with id as a uint32. */
static size_t encode(uint8_t *w, uint32_t id, const char *path, size_t plen) {
    uint8_t *s = w;
    *w++ = 0x94;
    *w++ = 1;
    *w++ = 1;
    *w++ = 0xce;
    *w++ = id >> 24; *w++ = id >> 16; *w++ = id >> 8; *w++ = id;
    *w++ = 0x91;
    *w++ = 0x93;
    if (plen < 32) *w++ = 0xa0 | plen;
    else if (plen < 256) { *w++ = 0xd9; *w++ = plen; }
    else { *w++ = 0xda; *w++ = plen >> 8; *w++ = plen; }
    memcpy(w, path, plen);
    w += plen;
    *w++ = 1;
    *w++ = 0xc2;
    return w - s;
}

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

static int uint_at(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    if (*p >= end) return -1;
    uint8_t b = *(*p)++;
    if (b < 0x80) { *v = b; return 0; }
    int n = b == 0xcc ? 1 : b == 0xcd ? 2 : b == 0xce ? 4 : b == 0xcf ? 8 : 0;
    if (!n || end - *p < n) return -1;
    *v = be(*p, n);
    *p += n;
    return 0;
}

/* One round trip: 0 on success (the fd received and closed). */
static int round_trip(int c, uint32_t id, const char *path, size_t plen) {
    uint8_t req[4200], rep[4096];
    size_t len = encode(req, id, path, plen);
    if (send(c, req, len, MSG_NOSIGNAL) != (ssize_t)len)
        return -1;
    char cbuf[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct ucred))];
    struct iovec io = { rep, sizeof rep };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1,
                        .msg_control = cbuf, .msg_controllen = sizeof cbuf };
    ssize_t r = recvmsg(c, &m, MSG_CMSG_CLOEXEC);
    if (r <= 0)
        return -1;
    int fd = -1;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
    /* [1, 1, id, [[errno, ...]]] */
    const uint8_t *p = rep, *end = rep + r;
    uint64_t rid = 0, err = 0;
    int ok = r > 3 && p[0] == 0x94 && p[1] == 1 && p[2] == 1;
    p += 3;
    ok = ok && !uint_at(&p, end, &rid) && rid == id && end - p > 2 && p[0] == 0x91 &&
         p[1] == 0x94;
    p += 2;
    ok = ok && !uint_at(&p, end, &err) && err == 0 && fd >= 0;
    if (fd >= 0)
        close(fd);
    if (!ok) {
        fprintf(stderr, "floor_client: bad reply (id %llu, errno %llu, fd %d)\n",
                (unsigned long long)rid, (unsigned long long)err, fd);
        return -1;
    }
    return 0;
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

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: see the comment at the top of floor_client.c\n");
        return 2;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "direct")) {
        const char *path = argv[2];
        int n = atoi(argv[3]);
        int64_t *t = malloc(sizeof *t * n);
        for (int i = 0; i < n; i++) {
            int64_t t0 = now_ns();
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) die("floor_client: open");
            close(fd);
            t[i] = now_ns() - t0;
        }
        report(t, n);
        return 0;
    }
    const char *name = argv[2], *path = argv[3];
    size_t plen = strlen(path);
    if (plen > 4096) return 2;
    if (!strcmp(mode, "lat") && argc > 4) {
        int n = atoi(argv[4]);
        int64_t *t = malloc(sizeof *t * n);
        int c = dial(name);
        for (int i = 0; i < n; i++) {
            int64_t t0 = now_ns();
            if (round_trip(c, i + 1, path, plen)) die("floor_client: round trip");
            t[i] = now_ns() - t0;
        }
        report(t, n);
        return 0;
    }
    if (!strcmp(mode, "load") && argc > 5) {
        int procs = atoi(argv[4]);
        double secs = atof(argv[5]);
        int ready[2], go[2], res[2];
        if (pipe(ready) || pipe(go) || pipe(res)) die("floor_client: pipe");
        for (int k = 0; k < procs; k++) {
            pid_t pid = fork();
            if (pid < 0) die("floor_client: fork");
            if (pid == 0) {
                close(go[1]);
                int c = dial(name);
                if (round_trip(c, 1, path, plen)) _exit(1);  /* connected and admitted */
                char b = 1, x;
                if (write(ready[1], &b, 1) != 1) _exit(1);
                if (read(go[0], &x, 1) != 0) _exit(1);      /* EOF is the start signal */
                int64_t t0 = now_ns(), end = t0 + (int64_t)(secs * 1e9), t;
                uint64_t ops = 0;
                uint32_t id = 2;
                do {
                    if (round_trip(c, id++, path, plen)) _exit(1);
                    ops++;
                } while ((t = now_ns()) < end);
                double rate = ops / ((t - t0) / 1e9);
                if (write(res[1], &rate, sizeof rate) != sizeof rate) _exit(1);
                _exit(0);
            }
        }
        close(ready[1]);
        close(res[1]);
        close(go[0]);
        char b;
        for (int k = 0; k < procs; k++)
            if (read(ready[0], &b, 1) != 1) {
                fprintf(stderr, "floor_client: a load process failed to start\n");
                return 1;
            }
        close(go[1]);
        double total = 0, rate;
        int got = 0;
        while (read(res[0], &rate, sizeof rate) == sizeof rate) {
            total += rate;
            got++;
        }
        int failed = 0, st;
        while (wait(&st) > 0)
            failed += !WIFEXITED(st) || WEXITSTATUS(st);
        if (failed || got != procs) {
            fprintf(stderr, "floor_client: %d of %d load processes failed\n", failed, procs);
            return 1;
        }
        printf("{\"procs\": %d, \"ops_per_s\": %.1f}\n", procs, total);
        return 0;
    }
    if (!strcmp(mode, "hold") && argc > 4) {
        int n = atoi(argv[4]);
        raise_nofile();
        int *cs = malloc(sizeof *cs * n), held = 0;
        /* Stop at the first connection the broker does not serve (out of
           fds, a limit): report how many it did hold. */
        struct timeval tv = { 5, 0 };
        for (; held < n; held++) {
            int c = try_dial(name);
            if (c < 0)
                break;
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            if (round_trip(c, 1, path, plen)) {
                close(c);
                break;
            }
            cs[held] = c;
        }
        printf("ready %d\n", held);
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0)
            ;
        return 0;
    }
    fprintf(stderr, "floor_client: unknown mode or missing arguments\n");
    return 2;
}
