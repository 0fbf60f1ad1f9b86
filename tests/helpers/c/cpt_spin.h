/*
 * The spinning threads of the whole-memory restore targets (restore_target.c in spin
 * mode, whole_target.c). Each keeps a value in a register and its copy, with a hash, in
 * memory (struct spin_state, whose address the program prints), checks at every step
 * that they agree, then advances both:
 *   main thread:  a counter (the program's own loop, with cpt_spin_check/cpt_spin_step);
 *   fp thread:    the same with a double kept in an SSE register;
 *   nap thread:   nanosleep(1 ms) between steps (often frozen inside the call, which must
 *                 restart correctly);
 *   wait thread:  pthread_cond_timedwait (futex with a timeout) between steps.
 * Rolling memory back without the registers (or the registers without the memory)
 * breaks an invariant: "corrupt WHO have=H want=W" on stderr and exit 3 (cptest.h).
 * tests/helpers/restore_c.py reads the struct's fields in this order (SPIN_FIELDS).
 */
#ifndef CPT_SPIN_H
#define CPT_SPIN_H

#include <pthread.h>
#include <time.h>

#include "cptest.h"

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

static void corrupt(const char *who, uint64_t have, uint64_t want) {
    cpt_corrupt("%s have=%" PRIu64 " want=%" PRIu64, who, have, want);
}

/* A short sleep now and then keeps the spinning threads from taking whole cores on a
 * shared machine; they still spend most of their time in user mode. */
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
        if (st.naps != n || st.naps_sum != cpt_mix(n ^ 0x5555)) corrupt("naps", st.naps, n);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        n++;
        st.naps = n;
        st.naps_sum = cpt_mix(n ^ 0x5555);
    }
    return NULL;
}

static void *wait_thread(void *arg) {
    (void)arg;
    uint64_t n = 0;
    for (;;) {
        if (st.waits != n || st.waits_sum != cpt_mix(n ^ 0xaaaa)) corrupt("waits", st.waits, n);
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
        st.waits_sum = cpt_mix(n ^ 0xaaaa);
    }
    return NULL;
}

/* The hashes of step 0, then the fp, nap and wait threads. */
static void spin_start(void) {
    st.main_sum = cpt_mix(0);
    st.naps_sum = cpt_mix(0x5555);
    st.waits_sum = cpt_mix(0xaaaa);
    pthread_t t;
    pthread_create(&t, NULL, fp_thread, NULL);
    pthread_create(&t, NULL, nap_thread, NULL);
    pthread_create(&t, NULL, wait_thread, NULL);
}

/* The main thread's step: check that memory holds counter c, then advance it. */
static uint64_t spin_step(uint64_t c) {
    if (st.main != c || st.main_sum != cpt_mix(c)) corrupt("main", st.main, c);
    c++;
    st.main = c;
    st.main_sum = cpt_mix(c);
    return c;
}

#endif
