/*
 * A C test target for restore that checks its own invariants. It knows nothing
 * of cpcoord. Built by the tests with gcc into a temporary directory.
 *
 *   restore_target spin
 *     Whole-memory mode: threads whose registers must agree with their memory. Prints
 *     "ready STATE_ADDR" (the address of struct spin_state) and runs until killed:
 *       main thread:  a counter kept in a register; every step checks that memory holds
 *                     the same counter and its hash, then advances both;
 *       fp thread:    the same with a double kept in an SSE register;
 *       nap thread:   nanosleep(1 ms) between steps (usually frozen inside the call,
 *                     which must restart correctly);
 *       wait thread:  pthread_cond_timedwait (futex with a timeout) between steps.
 *     Rolling memory back without the registers (or the registers without the memory)
 *     breaks an invariant: it prints "corrupt ..." on stderr and exits 3.
 *
 *   restore_target cmd PAGES
 *     Explicit-region mode: a state region of PAGES pages (mmap, page-aligned; page 0 a
 *     header {seq, steps, sum}, pages 1.. data) updated only on command, and a checker
 *     thread that validates it continuously under a sequence lock. Step s rewrites data
 *     page 1 + (s - 1) % (PAGES - 1), so pages never written are absent. Prints
 *     "ready ADDR PAGES", then answers stdin lines:
 *       step K   -> "ok steps=S sum=X"     K updates (each first checks the sum)
 *       check    -> "ok steps=S sum=X" | "corrupt steps=S sum=X want=Y"
 *       stats    -> "ok checks=N bad=M"    validations by the checker, failures
 *       quit     -> exits 0
 *     A step that finds a bad sum prints "corrupt ..." and exits 3.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "cpt_spin.h"

/* ---- spin mode (the threads: cpt_spin.h) ------------------------------------------- */

static int spin(void) {
    spin_start();
    printf("ready %p\n", (void *)&st);
    fflush(stdout);
    uint64_t c = 0;
    for (;;) {
        c = spin_step(c);
        breathe(c);
    }
    return 0;
}

/* ---- cmd mode ----------------------------------------------------------------------- */

struct header {
    uint64_t seq; /* odd while an update is in progress */
    uint64_t steps;
    uint64_t sum;
};
static volatile uint64_t *region;
static long npages;
static const long W = 4096 / 8;
static volatile uint64_t checks, bad;

static uint64_t checksum(uint64_t steps) {
    uint64_t h = cpt_mix(steps + 1);
    for (long i = W; i < npages * W; i++) h = (h ^ region[i]) * 0x100000001b3ULL;
    return h;
}

static void *checker(void *arg) {
    (void)arg;
    struct header *hd = (struct header *)region;
    for (;;) {
        uint64_t s1 = __atomic_load_n(&hd->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1) continue;
        uint64_t steps = ((volatile struct header *)hd)->steps;
        uint64_t sum = ((volatile struct header *)hd)->sum;
        uint64_t want = checksum(steps);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&hd->seq, __ATOMIC_RELAXED) != s1) continue;
        if (sum != want) bad++;
        checks++;
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void step(void) {
    struct header *hd = (struct header *)region;
    if (hd->sum != checksum(hd->steps)) corrupt("step", hd->sum, checksum(hd->steps));
    __atomic_store_n(&hd->seq, hd->seq + 1, __ATOMIC_RELEASE);
    uint64_t s = hd->steps + 1;
    volatile uint64_t *page = region + (1 + (s - 1) % (npages - 1)) * W;
    for (long i = 0; i < W; i++) page[i] = s * 0x9E3779B97F4A7C15ULL + (uint64_t)i;
    hd->steps = s;
    hd->sum = checksum(s);
    __atomic_store_n(&hd->seq, hd->seq + 1, __ATOMIC_RELEASE);
}

static int cmd(long pages) {
    npages = pages;
    void *p = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) return 1;
    region = p;
    struct header *hd = (struct header *)region;
    hd->sum = checksum(0);
    pthread_t t;
    pthread_create(&t, NULL, checker, NULL);
    printf("ready %p %ld\n", p, pages);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        long k;
        if (sscanf(line, "step %ld", &k) == 1) {
            for (long i = 0; i < k; i++) step();
            printf("ok steps=%" PRIu64 " sum=%" PRIu64 "\n", hd->steps, hd->sum);
        } else if (strncmp(line, "check", 5) == 0) {
            uint64_t want = checksum(hd->steps);
            if (hd->sum == want)
                printf("ok steps=%" PRIu64 " sum=%" PRIu64 "\n", hd->steps, hd->sum);
            else
                printf("corrupt steps=%" PRIu64 " sum=%" PRIu64 " want=%" PRIu64 "\n",
                       hd->steps, hd->sum, want);
        } else if (strncmp(line, "stats", 5) == 0) {
            printf("ok checks=%" PRIu64 " bad=%" PRIu64 "\n", checks, bad);
        } else if (strncmp(line, "quit", 4) == 0) {
            return 0;
        } else {
            printf("error unknown command\n");
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "spin") == 0) return spin();
    if (argc >= 3 && strcmp(argv[1], "cmd") == 0) return cmd(atol(argv[2]));
    fprintf(stderr, "usage: restore_target spin | cmd PAGES\n");
    return 2;
}
