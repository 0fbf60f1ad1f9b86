/*
 * A self-checking program that owns its signal state and its file descriptors; it knows
 * nothing of cpcoord. A checkpointer must leave both exactly as they were.
 *
 *   sigstate_target sigtrap MS
 *     Installs a SIGTRAP handler, blocks SIGTRAP (and SIGUSR2), ignores SIGPIPE, maps and
 *     writes 64 pages (something to capture), prints "ready MAP_ADDR" and then, every
 *     millisecond until MS milliseconds have passed:
 *       - checks its blocked mask still holds exactly SIGTRAP and SIGUSR2 (sigprocmask),
 *         that SIGTRAP's handler and flags and SIGPIPE's SIG_IGN are unchanged
 *         (sigaction) and that nothing is pending (sigpending);
 *       - every 20th round: raises SIGTRAP (it stays pending while blocked), unblocks it
 *         (the handler must run exactly once), blocks it again;
 *       - writes one of its pages.
 *     At the end it checks everything once more, prints "ok HANDLED" and exits 0.
 *     Any broken check: "corrupt ..." on stderr, exit 3. Killed by SIGTRAP: a
 *     checkpointer reset the handler or unblocked the signal.
 *
 *   sigstate_target ebadf MS
 *     Opens /dev/null twice (fds 3, 4), then closes 3 (and keeps 4), so 3 is the lowest
 *     free number. Prints "ready MAP_ADDR", then every millisecond until MS have passed:
 *       - fcntl(3, F_GETFD) and read(3) must fail with EBADF (never EINVAL or another
 *         file: nothing may take the number it closed);
 *       - open("/dev/null") must return 3 again (the lowest free number is still 3), and
 *         is closed at once; fd 4 is still /dev/null (fstat);
 *       - writes one of its pages.
 *     Exit as above.
 *
 *   In these two modes a line on stdin ends the loop early (then the final checks).
 *
 *   sigstate_target siginfo MS
 *     A SA_SIGINFO handler of SIGUSR1 prints "got SI_PID SI_CODE" once per signal; the
 *     program naps until MS milliseconds have passed. A checkpointer that takes a signal
 *     off the queue and sends it again in its own name shows as its own pid here.
 *
 *   sigstate_target sigsuspend MS
 *     Blocks SIGUSR1 and SIGTRAP and waits for SIGUSR1 in sigsuspend() (which unblocks
 *     everything while it waits), counting the handler's runs, until MS milliseconds
 *     have passed. After every return of sigsuspend its mask must be the blocked one
 *     again (the kernel puts it back; a checkpointer that changes the mask of a thread
 *     interrupted in sigsuspend can make it keep the temporary one). Prints "ok COUNT".
 */
#include "cptest.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#define PAGE 4096UL
#define NPAGES 64

static volatile sig_atomic_t handled;
static char *mem;

static void on_trap(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    (void)uc;
    if (sig == SIGTRAP)
        handled++;
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void nap(void)
{
    struct timespec ts = {0, 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Whether MS have passed since `start`, or a line came on stdin (the driver's "quit"). */
static int done(double end)
{
    struct pollfd p = {0, POLLIN, 0};
    return now_ms() >= end || poll(&p, 1, 0) > 0;
}

static void touch(unsigned long round)
{
    mem[(round % NPAGES) * PAGE + (round / NPAGES) % PAGE] = (char)round;
}

static sigset_t want_blocked(void)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGTRAP);
    sigaddset(&s, SIGUSR2);
    return s;
}

static void check_signals(const char *when)
{
    sigset_t cur, want = want_blocked(), pend;
    if (sigprocmask(SIG_BLOCK, NULL, &cur) != 0)
        cpt_corrupt("%s: sigprocmask: %s", when, strerror(errno));
    for (int s = 1; s < NSIG; s++) {
        if (s == 32 || s == 33)
            continue; /* glibc-internal real-time signals */
        if (sigismember(&cur, s) != sigismember(&want, s))
            cpt_corrupt("%s: signal %d is %s", when, s,
                        sigismember(&cur, s) ? "blocked" : "not blocked");
    }
    struct sigaction sa;
    if (sigaction(SIGTRAP, NULL, &sa) != 0)
        cpt_corrupt("%s: sigaction: %s", when, strerror(errno));
    if (!(sa.sa_flags & SA_SIGINFO) || sa.sa_sigaction != on_trap)
        cpt_corrupt("%s: SIGTRAP handler replaced (flags 0x%x)", when, sa.sa_flags);
    if (!(sa.sa_flags & SA_RESTART) || !sigismember(&sa.sa_mask, SIGUSR1))
        cpt_corrupt("%s: SIGTRAP sigaction flags or mask changed (flags 0x%x)", when,
                    sa.sa_flags);
    if (sigaction(SIGPIPE, NULL, &sa) != 0 || sa.sa_handler != SIG_IGN)
        cpt_corrupt("%s: SIGPIPE no longer ignored", when);
    if (sigpending(&pend) != 0)
        cpt_corrupt("%s: sigpending: %s", when, strerror(errno));
    for (int s = 1; s < NSIG; s++)
        if (sigismember(&pend, s) == 1)
            cpt_corrupt("%s: signal %d pending", when, s);
}

static void trap_round(void)
{
    sigset_t t;
    sigemptyset(&t);
    sigaddset(&t, SIGTRAP);
    sig_atomic_t before = handled;
    raise(SIGTRAP); /* blocked: stays pending */
    sigset_t pend;
    sigpending(&pend);
    if (!sigismember(&pend, SIGTRAP))
        cpt_corrupt("raised SIGTRAP is not pending");
    if (handled != before)
        cpt_corrupt("SIGTRAP handled while blocked");
    sigprocmask(SIG_UNBLOCK, &t, NULL); /* delivered here */
    if (handled != before + 1)
        cpt_corrupt("SIGTRAP handled %d times, not once", (int)(handled - before));
    sigprocmask(SIG_BLOCK, &t, NULL);
}

static int sigtrap_main(double ms)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR1);
    if (sigaction(SIGTRAP, &sa, NULL) != 0)
        cpt_corrupt("sigaction: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
    sigset_t b = want_blocked();
    sigprocmask(SIG_SETMASK, &b, NULL);
    check_signals("start");
    cpt_ready("%p", (void *)mem);
    double end = now_ms() + ms;
    unsigned long round = 0;
    for (; !done(end); round++) {
        check_signals("running");
        if (round % 20 == 0)
            trap_round();
        touch(round);
        nap();
    }
    check_signals("exit");
    printf("ok %d\n", (int)handled);
    return 0;
}

static void check_fds(const char *when, const struct stat *null)
{
    errno = 0;
    if (fcntl(3, F_GETFD) != -1 || errno != EBADF)
        cpt_corrupt("%s: fcntl(3) of a closed fd: errno %d (%s)", when, errno, strerror(errno));
    char c;
    errno = 0;
    if (read(3, &c, 1) != -1 || errno != EBADF)
        cpt_corrupt("%s: read(3) of a closed fd: errno %d (%s)", when, errno, strerror(errno));
    int fd = open("/dev/null", O_RDONLY);
    if (fd != 3)
        cpt_corrupt("%s: open() returned fd %d, the lowest free is 3", when, fd);
    close(fd);
    struct stat st;
    if (fstat(4, &st) != 0 || st.st_ino != null->st_ino || st.st_dev != null->st_dev)
        cpt_corrupt("%s: fd 4 is no longer /dev/null", when);
}

static int ebadf_main(double ms)
{
    int a = open("/dev/null", O_RDONLY), b = open("/dev/null", O_RDONLY);
    if (a != 3 || b != 4)
        cpt_corrupt("start: fds 0-2 must be open and 3-4 free (got %d %d)", a, b);
    close(3);
    struct stat null;
    if (fstat(4, &null) != 0)
        cpt_corrupt("fstat(4): %s", strerror(errno));
    check_fds("start", &null);
    cpt_ready("%p", (void *)mem);
    double end = now_ms() + ms;
    unsigned long round = 0;
    for (; !done(end); round++) {
        check_fds("running", &null);
        touch(round);
        nap();
    }
    check_fds("exit", &null);
    printf("ok %lu\n", round);
    return 0;
}

static volatile sig_atomic_t usr1;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (sig != SIGUSR1)
        return;
    usr1++;
    char line[64];
    int n = snprintf(line, sizeof line, "got %d %d\n", (int)si->si_pid, si->si_code);
    if (write(1, line, (size_t)n) != n)
        _exit(4);
}

static void handle_usr1(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        cpt_corrupt("sigaction: %s", strerror(errno));
}

static int siginfo_main(double ms)
{
    handle_usr1();
    cpt_ready("%p", (void *)mem);
    double end = now_ms() + ms;
    for (unsigned long round = 0; now_ms() < end; round++) {
        touch(round);
        nap();
    }
    printf("ok %d\n", (int)usr1);
    return 0;
}

static int sigsuspend_main(double ms)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR1);
    sigaction(SIGTRAP, &sa, NULL);
    handle_usr1();
    sigset_t blocked, empty, cur;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGUSR1);
    sigaddset(&blocked, SIGTRAP);
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &blocked, NULL);
    cpt_ready("%p", (void *)mem);
    double end = now_ms() + ms;
    while (now_ms() < end) {
        sigsuspend(&empty); /* returns -1 EINTR after a handler ran */
        sigprocmask(SIG_BLOCK, NULL, &cur);
        for (int s = 1; s < NSIG; s++) {
            if (s == 32 || s == 33)
                continue;
            if (sigismember(&cur, s) != sigismember(&blocked, s))
                cpt_corrupt("after sigsuspend: signal %d is %s", s,
                            sigismember(&cur, s) ? "blocked" : "not blocked");
        }
    }
    printf("ok %d\n", (int)usr1);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s sigtrap|ebadf|siginfo|sigsuspend MS\n", argv[0]);
        return 2;
    }
    mem = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        cpt_corrupt("mmap: %s", strerror(errno));
    for (unsigned long i = 0; i < NPAGES; i++)
        memset(mem + i * PAGE, (int)i + 1, PAGE);
    double ms = atof(argv[2]);
    if (!strcmp(argv[1], "sigtrap"))
        return sigtrap_main(ms);
    if (!strcmp(argv[1], "ebadf"))
        return ebadf_main(ms);
    if (!strcmp(argv[1], "siginfo"))
        return siginfo_main(ms);
    if (!strcmp(argv[1], "sigsuspend"))
        return sigsuspend_main(ms);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
