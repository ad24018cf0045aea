/* opener_steps: what each step of privbroker's open costs, in C, with no
 * Python: the syscalls broker/files/_fast.c makes for one file, timed one by one,
 * against a plain open(2)+close(2). The difference is the price of the
 * security model's checks (docs/security.md, invariants 1 and 2: resolve with
 * openat2 to an O_PATH fd, check on that fd, reopen that very inode).
 *
 * Build: cc -O2 -o opener_steps opener_steps.c
 * Run:   taskset -c 0 ./opener_steps /path/to/a/small/file [N]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif

struct open_how_v0 { uint64_t flags, mode, resolve; };

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [N]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int n = argc > 2 ? atoi(argv[2]) : 200000;
    double t[7] = { 0 };
    char name[16], real[4096];
    int procfd = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    struct statx sx;
    for (int i = 0; i < n; i++) {
        double a = now_ns();
        struct open_how_v0 how = { O_PATH | O_CLOEXEC, 0, 0x02 | 0x04 | 0x20 };
        int pfd = (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
        double b = now_ns();
        statx(pfd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC,
              STATX_TYPE | STATX_NLINK | STATX_INO | STATX_MNT_ID, &sx);
        double c = now_ns();
        snprintf(name, sizeof name, "%d", pfd);
        if (readlinkat(procfd, name, real, sizeof real) < 0) return 1;
        double d = now_ns();
        int fd = openat(procfd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        double e = now_ns();
        statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_INO, &sx);
        fcntl(fd, F_SETFL, 0);
        double f = now_ns();
        close(pfd);
        close(fd);
        double g = now_ns();
        close(open(path, O_RDONLY | O_CLOEXEC));
        double h = now_ns();
        t[0] += b - a, t[1] += c - b, t[2] += d - c, t[3] += e - d;
        t[4] += f - e, t[5] += g - f, t[6] += h - g;
    }
    const char *step[] = { "openat2 O_PATH", "statx (mount, type, links)", "readlinkat /proc/self/fd/N",
                           "reopen through it", "statx + fcntl", "close both",
                           "plain open + close (the floor's)" };
    double sum = 0;
    for (int i = 0; i < 6; i++) sum += t[i];
    for (int i = 0; i < 7; i++) printf("%-34s %6.2f us\n", step[i], t[i] / n / 1000);
    printf("%-34s %6.2f us\n", "privbroker's steps together", sum / n / 1000);
    return 0;
}
