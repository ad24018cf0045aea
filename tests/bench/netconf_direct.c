/* netconf_direct: add_address + del_address in-process, in C, as root (bench_netconf.py).
 *
 *   netconf_direct A.B.C.D PREFIXLEN N WARM
 *
 * Opens a tun device of its own (TUNSETIFF, IFF_TUN|IFF_NO_PI, non-persistent), sets it
 * up, then times N pairs (after WARM untimed ones) of RTM_NEWADDR (NLM_F_CREATE|NLM_F_EXCL)
 * and RTM_DELADDR on one NETLINK_ROUTE socket, each with NLM_F_ACK and its ACK read
 * back: the message privbroker's broker builds (ifaddrmsg, IFA_LOCAL and IFA_ADDRESS both
 * the address), with no Python. Prints {"n", "p50_us", "p99_us", "mean_us", "cpu_us"}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

struct addr_req {
    struct nlmsghdr nh;
    struct ifaddrmsg ifa;
    char attrs[64];
};

static int nl;
static unsigned seq;

static void add_attr(struct nlmsghdr *nh, int type, const void *data, int len) {
    struct rtattr *rta = (struct rtattr *)((char *)nh + NLMSG_ALIGN(nh->nlmsg_len));
    rta->rta_type = type;
    rta->rta_len = RTA_LENGTH(len);
    memcpy(RTA_DATA(rta), data, len);
    nh->nlmsg_len = NLMSG_ALIGN(nh->nlmsg_len) + RTA_ALIGN(rta->rta_len);
}

static void request(int type, int flags, int ifindex, struct in_addr a, int plen) {
    struct addr_req r;
    memset(&r, 0, sizeof r);
    r.nh.nlmsg_len = NLMSG_LENGTH(sizeof r.ifa);
    r.nh.nlmsg_type = type;
    r.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    r.nh.nlmsg_seq = ++seq;
    r.ifa.ifa_family = AF_INET;
    r.ifa.ifa_prefixlen = plen;
    r.ifa.ifa_index = ifindex;
    add_attr(&r.nh, IFA_LOCAL, &a, 4);
    add_attr(&r.nh, IFA_ADDRESS, &a, 4);
    if (send(nl, &r, r.nh.nlmsg_len, 0) < 0) die("send");
    char buf[8192];
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0) die("recv");
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq || h->nlmsg_type != NLMSG_ERROR) continue;
            int err = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (err) {
                fprintf(stderr, "rtnetlink: %s\n", strerror(-err));
                exit(1);
            }
            return;
        }
    }
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static double cpu_s(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s A.B.C.D PREFIXLEN N WARM\n", argv[0]);
        return 2;
    }
    struct in_addr a;
    if (inet_pton(AF_INET, argv[1], &a) != 1) die("address");
    int plen = atoi(argv[2]), n = atoi(argv[3]), warm = atoi(argv[4]);

    int tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "benchc%d");
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    if (ioctl(tun, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    int ctl = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (ctl < 0 || ioctl(ctl, SIOCGIFFLAGS, &ifr) < 0) die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(ctl, SIOCSIFFLAGS, &ifr) < 0) die("SIOCSIFFLAGS");
    int ifindex = if_nametoindex(ifr.ifr_name);
    if (!ifindex) die("if_nametoindex");

    nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (nl < 0) die("socket(NETLINK_ROUTE)");
    int one = 1;
    setsockopt(nl, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
    setsockopt(nl, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (bind(nl, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");

    double *ns = malloc(sizeof *ns * (n ? n : 1)), sum = 0, cpu0 = 0;
    for (int i = 0; i < warm + n; i++) {
        if (i == warm) cpu0 = cpu_s();
        double t0 = now_ns();
        request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, ifindex, a, plen);
        request(RTM_DELADDR, 0, ifindex, a, plen);
        double dt = now_ns() - t0;
        if (i >= warm) ns[i - warm] = dt, sum += dt;
    }
    double cpu = cpu_s() - cpu0;
    qsort(ns, n, sizeof *ns, cmp);
    int p99 = (int)(n * 0.99);
    if (p99 > n - 1) p99 = n - 1;
    printf("{\"n\": %d, \"p50_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, \"cpu_us\": %.3f}\n",
           n, ns[n / 2] / 1e3, ns[p99] / 1e3, sum / n / 1e3, cpu / n * 1e6);
    return 0;
}
