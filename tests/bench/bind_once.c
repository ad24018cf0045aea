/* bind_once: what a program run under authbind does once: bind 127.0.0.1:PORT, listen, exit.
 *
 * Dynamically linked (authbind works by LD_PRELOAD: its libauthbind's bind()
 * asks a setuid helper to bind a port below 1024 for a uid that
 * /etc/authbind/byport/PORT lets execute it). The benchmark runs it under
 * `authbind` as an unprivileged uid, once per exec, and alone as root to show
 * what the exec costs without authbind. Exit status 0 when listening, else 1.
 *
 * Usage: bind_once PORT          Build: cc -O2 -o bind_once bind_once.c
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: bind_once PORT\n");
        return 2;
    }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0) {
        perror("bind_once");
        return 1;
    }
    close(fd);
    return 0;
}
