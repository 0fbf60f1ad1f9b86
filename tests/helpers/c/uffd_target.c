/*
 * A plain C test target for syscall injection and the uffd-wp tracker. It knows nothing
 * of cpcoord. Built by the tests with gcc into a temporary directory.
 *
 *   uffd_target threads PIPE_FD SLEEP_MS
 *     Starts a reader blocked in read(PIPE_FD), a sleeper in nanosleep(SLEEP_MS), a waiter
 *     in pthread_cond_wait (futex) and a spinner in user space; prints "ready" and the
 *     thread ids; on the stdin line "go" wakes the waiter and stops the spinner, joins
 *     all, prints what each saw and exits with status 7.
 *
 *   uffd_target mem SIZE_PAGES...
 *     Maps one private anonymous region per argument, writes every page, prints
 *     "map ADDR LEN" per region and "ready", then runs commands from stdin, one per line,
 *     each answered by a line starting with "ok":
 *       w ADDR COUNT STRIDE   write one byte into COUNT pages, STRIDE pages apart
 *       x ADDR NPAGES COUNT SEED  write COUNT pages picked at random among NPAGES
 *       m NPAGES              map a new region, write every page: "ok ADDR"
 *       u ADDR NPAGES         munmap
 *       U ADDR NPAGES         munmap, map again at the same address, write every page
 *       d ADDR NPAGES         madvise(MADV_DONTNEED)
 *       r ADDR NPAGES         read one byte of each page
 *       M ADDR NPAGES NEWPAGES  mremap(MREMAP_MAYMOVE): "ok NEWADDR"
 *       o NPAGES              map a new region, write every page, register it with a
 *                             userfaultfd of our own (WP mode, nothing protected): "ok ADDR"
 *       p ADDR                read() 5 bytes from a pipe into ADDR (a kernel-mode write)
 *       c FD                  close(FD)
 *       F MS                  fork a child that writes page 0 of the first region, sleeps
 *                             MS milliseconds and exits: "ok CHILDPID"
 *       h NPAGES              map a 2 MiB-aligned region with MADV_HUGEPAGE, write it
 *                             all: "ok ADDR"
 *       R ADDR NPAGES PER_SEC start a writer thread that writes PER_SEC pages per second
 *                             picked at random among NPAGES (100 batches a second);
 *                             PER_SEC 0 stops it: "ok WRITES" (pages written so far)
 *       q                     exit 0
 *
 *   uffd_target mem-seccomp SIZE_PAGES...
 *     The same after installing a seccomp filter that kills the process on userfaultfd().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static int pipe_fd;
static long sleep_ms;
static volatile int spin_stop;
static volatile unsigned long spins;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int woken;
static char got[64];
static ssize_t got_n;
static double slept_ms;
static pid_t tids[4];

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *reader(void *a)
{
    tids[0] = (pid_t)syscall(SYS_gettid);
    got_n = read(pipe_fd, got, sizeof got - 1);
    return a;
}

static void *sleeper(void *a)
{
    tids[1] = (pid_t)syscall(SYS_gettid);
    struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
    double t0 = now_ms();
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    slept_ms = now_ms() - t0;
    return a;
}

static void *waiter(void *a)
{
    tids[2] = (pid_t)syscall(SYS_gettid);
    pthread_mutex_lock(&mu);
    while (!woken)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return a;
}

static void *spinner(void *a)
{
    tids[3] = (pid_t)syscall(SYS_gettid);
    while (!spin_stop)
        spins++;
    return a;
}

static int threads_mode(void)
{
    pthread_t th[4];
    void *(*fn[4])(void *) = {reader, sleeper, waiter, spinner};
    for (int i = 0; i < 4; i++)
        if (pthread_create(&th[i], NULL, fn[i], NULL))
            return 3;
    while (!tids[0] || !tids[1] || !tids[2] || !tids[3])
        usleep(1000);
    printf("ready %d %d %d %d\n", tids[0], tids[1], tids[2], tids[3]);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "go", 2) != 0)
        ;
    pthread_mutex_lock(&mu);
    woken = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    spin_stop = 1;
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    got[got_n > 0 ? got_n : 0] = 0;
    printf("read %zd %s\nslept %.0f\nspins %s\n", got_n, got, slept_ms, spins ? "yes" : "no");
    fflush(stdout);
    return 7;
}

static char *map_filled(char *at, unsigned long npages)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0);
    char *p = mmap(at, npages * PAGE, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* 4 KiB pages only: the tests count pages exactly (THP would report 2 MiB). */
    madvise(p, npages * PAGE, MADV_NOHUGEPAGE);
    for (unsigned long i = 0; i < npages; i++)
        p[i * PAGE] = (char)(i + 1);
    return p;
}

static int deny_userfaultfd(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

static char *own_uffd_region(unsigned long npages)
{
    char *p = map_filled(NULL, npages);
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* USER_MODE_ONLY */);
    struct uffdio_api api = {UFFD_API, 0, 0};
    struct uffdio_register reg = {{(unsigned long)p, npages * PAGE}, UFFDIO_REGISTER_MODE_WP, 0};
    if (!p || fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg))
        return NULL;
    return p;
}

static char *huge_region(unsigned long npages)
{
    unsigned long len = npages * PAGE, align = 2UL << 20;
    char *raw = mmap(NULL, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    char *p = (char *)(((unsigned long)raw + align - 1) & ~(align - 1));
    madvise(p, len, MADV_HUGEPAGE);
    memset(p, 1, len);
    return p;
}

static char *first_region;

static volatile int rate_run;
static volatile unsigned long rate_writes;
static pthread_t rate_thread;
static char *rate_addr;
static unsigned long rate_pages, rate_per_sec;

static void *rate_writer(void *arg)
{
    (void)arg;
    unsigned long x = 88172645463325252UL, per_tick = rate_per_sec / 100, carry = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (rate_run) {
        carry += rate_per_sec % 100;
        unsigned long n = per_tick + carry / 100;
        carry %= 100;
        for (unsigned long i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            unsigned long *w = (unsigned long *)(rate_addr + (x % rate_pages) * PAGE + 16);
            *w = ++rate_writes;
        }
        next.tv_nsec += 10000000L;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return NULL;
}

static int mem_mode(int argc, char **argv)
{
    static unsigned char counter;
    for (int i = 0; i < argc; i++) {
        unsigned long n = strtoul(argv[i], NULL, 0);
        char *p = map_filled(NULL, n);
        if (!p)
            return 4;
        printf("map %lx %lu\n", (unsigned long)p, n * PAGE);
        if (!first_region)
            first_region = p;
    }
    printf("ready\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char op = line[0];
        unsigned long a = 0, b = 0, c = 0, d = 0;
        sscanf(line + 1, "%lx %lu %lu %lu", &a, &b, &c, &d);
        char *p = (char *)a;
        if (op == 'w') {
            for (unsigned long i = 0; i < b; i++)
                p[i * c * PAGE] = (char)++counter;
            printf("ok\n");
        } else if (op == 'x') {
            srand((unsigned)d);
            for (unsigned long i = 0; i < c; i++)
                p[((unsigned long)rand() % b) * PAGE + 8] = (char)++counter;
            printf("ok\n");
        } else if (op == 'm') {
            sscanf(line + 1, "%lu", &a);
            char *q = map_filled(NULL, a);
            printf("ok %lx\n", (unsigned long)q);
        } else if (op == 'u') {
            printf("ok %d\n", munmap(p, b * PAGE));
        } else if (op == 'U') {
            munmap(p, b * PAGE);
            printf("ok %lx\n", (unsigned long)map_filled(p, b));
        } else if (op == 'd') {
            printf("ok %d\n", madvise(p, b * PAGE, MADV_DONTNEED));
        } else if (op == 'r') {
            unsigned long sum = 0;
            for (unsigned long i = 0; i < b; i++)
                sum += (unsigned char)((volatile char *)p)[i * PAGE];
            printf("ok %lu\n", sum);
        } else if (op == 'M') {
            void *q = mremap(p, b * PAGE, c * PAGE, MREMAP_MAYMOVE);
            printf("ok %lx\n", (unsigned long)q);
        } else if (op == 'o') {
            sscanf(line + 1, "%lu", &a);
            printf("ok %lx\n", (unsigned long)own_uffd_region(a));
        } else if (op == 'p') {
            int fds[2];
            ssize_t n = -1;
            if (pipe(fds) == 0 && write(fds[1], "hello", 5) == 5)
                n = read(fds[0], p, 5);
            close(fds[0]);
            close(fds[1]);
            printf("ok %zd\n", n);
        } else if (op == 'c') {
            sscanf(line + 1, "%lu", &a);
            printf("ok %d\n", close((int)a));
        } else if (op == 'F') {
            sscanf(line + 1, "%lu", &a);
            fflush(stdout);
            pid_t child = fork();
            if (child == 0) {
                first_region[0]++;
                usleep((useconds_t)(a * 1000));
                _exit(0);
            }
            printf("ok %d\n", child);
        } else if (op == 'h') {
            sscanf(line + 1, "%lu", &a);
            printf("ok %lx\n", (unsigned long)huge_region(a));
        } else if (op == 'R') {
            if (rate_run) {
                rate_run = 0;
                pthread_join(rate_thread, NULL);
            }
            if (c) {
                rate_addr = p, rate_pages = b, rate_per_sec = c, rate_run = 1;
                pthread_create(&rate_thread, NULL, rate_writer, NULL);
            }
            printf("ok %lu\n", rate_writes);
        } else if (op == 'q') {
            return 0;
        } else {
            printf("bad %c\n", op);
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "threads") == 0) {
        pipe_fd = atoi(argv[2]);
        sleep_ms = atol(argv[3]);
        return threads_mode();
    }
    if (argc >= 3 && strcmp(argv[1], "mem") == 0)
        return mem_mode(argc - 2, argv + 2);
    if (argc >= 3 && strcmp(argv[1], "mem-seccomp") == 0) {
        if (deny_userfaultfd())
            return 5;
        return mem_mode(argc - 2, argv + 2);
    }
    fprintf(stderr, "usage: uffd_target threads PIPE_FD SLEEP_MS | mem[-seccomp] NPAGES...\n");
    return 2;
}
