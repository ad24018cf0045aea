/* spawn_helper: the alternative to a broker, one process per open.
 *
 * What a program would do without privbroker: fork+exec a tiny (setuid-root,
 * in real life) helper for every privileged open. The helper opens PATH and
 * passes the fd back over the socket it was given as fd 3 (one end of a
 * socketpair), with SCM_RIGHTS, then exits. No policy: the cheapest such
 * helper there is. The benchmark runs it as root, so no setuid bit is needed.
 *
 * Usage: spawn_helper PATH [FD]    (FD, default 3: a connected AF_UNIX socket)
 * Build: cc -O2 -o spawn_helper spawn_helper.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3)
        return 2;
    int sock = argc == 3 ? atoi(argv[2]) : 3;
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW);
    int err = fd < 0 ? errno : 0;
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec io = { &err, sizeof err };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1 };
    if (fd >= 0) {
        memset(cbuf, 0, sizeof cbuf);
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &fd, sizeof(int));
    }
    return sendmsg(sock, &m, MSG_NOSIGNAL) == sizeof err ? (err != 0) : 1;
}
