/*
 * A self-checking program for "a checkpointer leaves no trace": it knows nothing of
 * cpcoord and keeps running while it is armed, captured and released.
 *
 *   detach_target NPAGES
 *     Maps NPAGES private anonymous pages (THP off) and stamps each with a hash of its
 *     number and version; installs a SIGUSR2 handler (SA_SIGINFO|SA_RESTART), a SIGTERM
 *     handler that ends the run, ignores SIGPIPE and blocks SIGUSR1; starts the spinning
 *     threads of cpt_spin.h (values kept in registers and memory, checked at every step:
 *     a register or memory changed behind the program's back is caught). Prints
 *     "ready MAP_ADDR NPAGES STATE_ADDR" (STATE_ADDR: struct spin_state, whose first
 *     field is the main loop's counter: progress), then loops:
 *       - spin_step (counter in memory and in a register agree);
 *       - every 16384 steps (tens a second): rewrites one page with its next version;
 *       - every 8192 steps: checks every page against its version and the signal state
 *         (mask exactly SIGUSR1, handlers and flags, SIGPIPE ignored, nothing pending).
 *     On SIGTERM: checks everything once more, prints "ok STEPS" and exits 0. Any broken
 *     check: "corrupt ..." on stderr, exit 3 (cptest.h).
 */
#include "cpt_spin.h"

#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#define PAGE 4096UL

static volatile sig_atomic_t stopping;
static uint64_t *mem;
static uint32_t *version;
static unsigned long npages;

static void on_usr2(int sig, siginfo_t *si, void *uc) { (void)sig; (void)si; (void)uc; }
static void on_term(int sig) { (void)sig; stopping = 1; }

static void stamp(unsigned long p) {
    uint64_t *w = mem + p * (PAGE / 8);
    uint64_t s = cpt_mix(((uint64_t)p << 32) | version[p]);
    for (unsigned long i = 0; i < PAGE / 8; i++) w[i] = s + i;
}

static void check_pages(void) {
    for (unsigned long p = 0; p < npages; p++) {
        uint64_t *w = mem + p * (PAGE / 8);
        uint64_t s = cpt_mix(((uint64_t)p << 32) | version[p]);
        for (unsigned long i = 0; i < PAGE / 8; i++)
            if (w[i] != s + i) cpt_corrupt("page %lu word %lu", p, i);
    }
}

static void check_signals(void) {
    sigset_t cur, want, pend;
    sigemptyset(&want);
    sigaddset(&want, SIGUSR1);
    sigprocmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP && sigismember(&cur, s) != sigismember(&want, s))
            cpt_corrupt("signal %d blocked=%d", s, sigismember(&cur, s));
    struct sigaction a;
    sigaction(SIGUSR2, NULL, &a);
    if (a.sa_sigaction != on_usr2 || !(a.sa_flags & SA_SIGINFO) || !(a.sa_flags & SA_RESTART))
        cpt_corrupt("SIGUSR2 handler or flags changed (flags %#x)", a.sa_flags);
    sigaction(SIGTERM, NULL, &a);
    if (a.sa_handler != on_term) cpt_corrupt("SIGTERM handler changed");
    sigaction(SIGPIPE, NULL, &a);
    if (a.sa_handler != SIG_IGN) cpt_corrupt("SIGPIPE no longer ignored");
    sigaction(SIGTRAP, NULL, &a);
    if (a.sa_handler != SIG_DFL) cpt_corrupt("SIGTRAP handler changed");
    sigpending(&pend);
    for (int s = 1; s < NSIG; s++)
        if (s != SIGTERM && sigismember(&pend, s)) cpt_corrupt("signal %d pending", s);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: detach_target NPAGES\n");
        return 2;
    }
    npages = strtoul(argv[1], NULL, 0);
    prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
    mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    version = calloc(npages, sizeof *version);
    if (mem == MAP_FAILED || !version) return 2;
    for (unsigned long p = 0; p < npages; p++) stamp(p);
    struct sigaction a;
    memset(&a, 0, sizeof a);
    a.sa_sigaction = on_usr2;
    a.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR2, &a, NULL);
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    sigset_t b;
    sigemptyset(&b);
    sigaddset(&b, SIGUSR1);
    sigprocmask(SIG_BLOCK, &b, NULL);
    /* The nap and wait threads of cpt_spin.h (often frozen inside nanosleep and futex,
     * which must restart correctly); the fp thread would spin a whole core. */
    st.naps_sum = cpt_mix(0x5555);
    st.waits_sum = cpt_mix(0xaaaa);
    st.main_sum = cpt_mix(0);
    pthread_t t;
    (void)spin_start; /* its fp thread would spin a whole core */
    pthread_create(&t, NULL, nap_thread, NULL); /* they inherit the mask */
    pthread_create(&t, NULL, wait_thread, NULL);
    check_signals();
    cpt_ready("%p %lu %p", (void *)mem, npages, (void *)&st);
    uint64_t c = 0;
    while (!stopping) {
        c = spin_step(c);
        if ((c & 16383) == 0) {
            unsigned long p = (c >> 14) % npages;
            version[p]++;
            stamp(p);
        }
        if ((c & 8191) == 0) {
            check_pages();
            check_signals();
        }
        if ((c & 1023) == 0) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    check_pages();
    check_signals();
    printf("ok %" PRIu64 "\n", c);
    fflush(stdout);
    return 0;
}
