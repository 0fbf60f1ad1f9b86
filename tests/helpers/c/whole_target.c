/*
 * A whole-memory restore target (issue 5) that checks its own invariants and ends on
 * request; adapted from restore_target.c's spin mode. It knows nothing of cpcoord.
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

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static void corrupt(const char *who, uint64_t have, uint64_t want) {
    fprintf(stderr, "corrupt %s have=%" PRIu64 " want=%" PRIu64 "\n", who, have, want);
    fflush(stderr);
    _exit(3);
}

struct spin_state {
    volatile uint64_t main, main_sum;
    volatile double fp;
    volatile uint64_t fp_n;
    volatile uint64_t naps, naps_sum;
    volatile uint64_t waits, waits_sum;
};
static struct spin_state st;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static const char *stopfile;
static const char *secret_hex;

/* A short sleep now and then keeps the spinning threads from taking whole cores. */
static void breathe(uint64_t n) {
    if ((n & 0xffff) == 0) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
}

static void *fp_thread(void *arg) {
    (void)arg;
    double d = 0.0;
    uint64_t n = 0;
    for (;;) {
        if (st.fp != d || st.fp_n != n) corrupt("fp", (uint64_t)st.fp, (uint64_t)d);
        d += 0.5;
        n++;
        st.fp = d;
        st.fp_n = n;
        breathe(n);
    }
    return NULL;
}

static void *nap_thread(void *arg) {
    (void)arg;
    uint64_t n = 0;
    for (;;) {
        if (st.naps != n || st.naps_sum != mix(n ^ 0x5555)) corrupt("naps", st.naps, n);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        n++;
        st.naps = n;
        st.naps_sum = mix(n ^ 0x5555);
    }
    return NULL;
}

static void *wait_thread(void *arg) {
    (void)arg;
    uint64_t n = 0;
    for (;;) {
        if (st.waits != n || st.waits_sum != mix(n ^ 0xaaaa)) corrupt("waits", st.waits, n);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 3000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&mu);
        pthread_cond_timedwait(&cv, &mu, &ts);
        pthread_mutex_unlock(&mu);
        n++;
        st.waits = n;
        st.waits_sum = mix(n ^ 0xaaaa);
    }
    return NULL;
}

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
    st.main_sum = mix(0);
    st.naps_sum = mix(0x5555);
    st.waits_sum = mix(0xaaaa);
    pthread_t t;
    pthread_create(&t, NULL, fp_thread, NULL);
    pthread_create(&t, NULL, nap_thread, NULL);
    pthread_create(&t, NULL, wait_thread, NULL);
    pthread_create(&t, NULL, secret_thread, NULL);
    printf("ready %p\n", (void *)&st);
    fflush(stdout);
    uint64_t c = 0;
    for (;;) {
        if (st.main != c || st.main_sum != mix(c)) corrupt("main", st.main, c);
        c++;
        st.main = c;
        st.main_sum = mix(c);
        if ((c & 0xffff) == 0) {
            if (access(stopfile, F_OK) == 0) {
                struct timespec ts = {0, 20000000}; /* one more round for every thread */
                nanosleep(&ts, NULL);
                if (st.main != c || st.main_sum != mix(c)) corrupt("main", st.main, c);
                printf("done main=%" PRIu64 "\n", c);
                fflush(stdout);
                return 0;
            }
            breathe(c);
        }
    }
}
