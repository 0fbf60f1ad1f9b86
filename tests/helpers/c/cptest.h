/*
 * Shared by the C test programs in this directory (self-checking targets that know nothing
 * of cpcoord): a hash to stamp memory with, a failure exit that says what broke, and the
 * "ready" line the Python drivers (tests/helpers/restore_c.py) wait for. The spinning
 * threads of the whole-memory restore targets build on it: cpt_spin.h.
 *
 * Convention: a program prints one line "ready ..." on stdout when it is set up, exits 0
 * when its own checks held to the end, and 3 (after "corrupt ..." on stderr) the moment
 * one failed. Any other exit or a signal means it was harmed some other way.
 */
#ifndef CPTEST_H
#define CPTEST_H

#define _GNU_SOURCE
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define CPTEST_CORRUPT 3

static inline uint64_t cpt_mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Report a broken invariant and exit CPTEST_CORRUPT at once (no atexit handlers). */
static inline void cpt_corrupt(const char *fmt, ...) {
    va_list ap;
    fputs("corrupt ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    _exit(CPTEST_CORRUPT);
}

/* Print the ready line (printf format after "ready ") and flush it. */
static inline void cpt_ready(const char *fmt, ...) {
    va_list ap;
    fputs("ready", stdout);
    if (fmt && *fmt) {
        fputc(' ', stdout);
        va_start(ap, fmt);
        vfprintf(stdout, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stdout);
    fflush(stdout);
}

#endif
