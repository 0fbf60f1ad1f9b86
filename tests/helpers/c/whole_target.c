/*
 * A whole-memory restore target that checks its own invariants and ends on
 * request; its spinning threads are those of cpt_spin.h. It knows nothing of cpcoord.
 *
 *   whole_target STOPFILE SECRET
 *     Prints "ready STATE_ADDR" and runs until the file STOPFILE exists, then exits 0
 *     (after one more round of checks). SECRET (hex) is kept in a register only.
 *       main thread:   a counter kept in a register; every step checks that memory holds
 *                      the same counter and its hash, then advances both;
 *       fp thread:     the same with a double kept in an SSE register;
 *       nap thread:    nanosleep(1 ms) between steps (often frozen inside the call);
 *       wait thread:   pthread_cond_timedwait (futex with a timeout) between steps;
 *       secret thread: holds SECRET in r15 across nanosleep calls (written in assembly,
 *                      so the value never reaches memory) and checks it after each call.
 *     Rolling memory back without the registers (or the registers without the memory)
 *     breaks an invariant: it prints "corrupt ..." on stderr and exits 3.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpt_spin.h"

static const char *stopfile;
static const char *secret_hex;

static void *secret_thread(void *arg) {
    (void)arg;
    static const struct timespec ts = {0, 2000000};
    uint64_t want = strtoull(secret_hex, NULL, 16);
    uint64_t have;
    /* r15 holds the secret; the loop ends only when it no longer does. */
    __asm__ volatile(
        "mov %[v], %%r15\n"
        "1:\n\t"
        "mov $35, %%eax\n\t" /* SYS_nanosleep */
        "mov %[ts], %%rdi\n\t"
        "xor %%esi, %%esi\n\t"
        "syscall\n\t"
        "cmp %[v], %%r15\n\t"
        "je 1b\n\t"
        "mov %%r15, %[have]\n\t"
        : [have] "=m"(have)
        : [v] "r"(want), [ts] "r"(&ts)
        : "rax", "rdi", "rsi", "rcx", "r11", "r15", "memory", "cc");
    corrupt("secret", have, want);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: whole_target STOPFILE SECRET\n");
        return 2;
    }
    stopfile = argv[1];
    secret_hex = argv[2];
    spin_start();
    pthread_t t;
    pthread_create(&t, NULL, secret_thread, NULL);
    printf("ready %p\n", (void *)&st);
    fflush(stdout);
    uint64_t c = 0;
    for (;;) {
        c = spin_step(c);
        if ((c & 0xffff) == 0) {
            if (access(stopfile, F_OK) == 0) {
                struct timespec ts = {0, 20000000}; /* one more round for every thread */
                nanosleep(&ts, NULL);
                if (st.main != c || st.main_sum != cpt_mix(c)) corrupt("main", st.main, c);
                printf("done main=%" PRIu64 "\n", c);
                fflush(stdout);
                return 0;
            }
            breathe(c);
        }
    }
}
