/*
 * For the layout targets (layout_*.c): a run loop that ends when a stop file exists,
 * a progress counter the Python driver reads (struct cpt_run, printed by "ready"), and
 * checks of the program's own mappings read from /proc/self/maps without malloc (the brk
 * target moves the heap itself). Call cpt_read_maps once before "ready" (it opens the
 * maps file then, never again). A mismatch prints "corrupt ..." and exits 3 (cptest.h).
 */
#ifndef CPT_LAYOUT_H
#define CPT_LAYOUT_H

#include "cptest.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PG 4096UL

/* What the driver reads at the printed address: steps done, a program's own word, and
 * a word only the driver writes (after a cut: a rollback puts it back to 0). */
struct cpt_run {
    volatile uint64_t steps;
    volatile uint64_t mark;
    volatile uint64_t poke;
};
static struct cpt_run run;

struct cpt_vma {
    uintptr_t start, end;
    char perms[5];
};
static struct cpt_vma cpt_vmas[4096];
static int cpt_nvma;
static char cpt_mapsbuf[1 << 18];

static int cpt_maps_fd = -1;

/* One fd for the whole run, read with pread from offset 0: a rollback puts the program
 * back to the cut's registers and memory, not the kernel's fd table or file offsets,
 * so opening and closing (or seeking) in the loop could meet another fd state. */
static inline void cpt_read_maps(void) {
    if (cpt_maps_fd < 0) cpt_maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (cpt_maps_fd < 0) cpt_corrupt("cannot open /proc/self/maps");
    size_t len = 0;
    for (;;) {
        ssize_t n = pread(cpt_maps_fd, cpt_mapsbuf + len, sizeof cpt_mapsbuf - 1 - len,
                          (off_t)len);
        if (n < 0) cpt_corrupt("cannot read /proc/self/maps");
        if (n == 0) break;
        len += (size_t)n;
    }
    cpt_mapsbuf[len] = 0;
    cpt_nvma = 0;
    char *p = cpt_mapsbuf;
    while (*p && cpt_nvma < 4096) {
        struct cpt_vma *v = &cpt_vmas[cpt_nvma++];
        v->start = strtoul(p, &p, 16);
        v->end = strtoul(p + 1, &p, 16);
        memcpy(v->perms, p + 1, 4);
        v->perms[4] = 0;
        char *nl = strchr(p, '\n');
        if (!nl) break;
        p = nl + 1;
    }
}

/* Every byte of [a, a+len) is mapped with `perms` ("rw-p"), or unmapped when perms is
 * NULL; read the maps first (cpt_read_maps). */
static inline void cpt_expect(const char *what, uintptr_t a, size_t len, const char *perms) {
    uintptr_t at = a, end = a + len;
    for (int i = 0; i < cpt_nvma && at < end; i++) {
        struct cpt_vma *v = &cpt_vmas[i];
        if (v->end <= at || v->start >= end) continue;
        if (!perms) cpt_corrupt("%s: 0x%lx-0x%lx should be unmapped, 0x%lx-0x%lx is %s", what,
                                (unsigned long)a, (unsigned long)end, (unsigned long)v->start,
                                (unsigned long)v->end, v->perms);
        if (v->start > at) break;
        if (strcmp(v->perms, perms))
            cpt_corrupt("%s: 0x%lx is %s, want %s", what, (unsigned long)at, v->perms, perms);
        at = v->end;
    }
    if (perms && at < end)
        cpt_corrupt("%s: 0x%lx-0x%lx should be %s, 0x%lx is unmapped", what, (unsigned long)a,
                    (unsigned long)end, perms, (unsigned long)at);
}

static inline uint64_t cpt_word(uint64_t seed, uint64_t i) { return cpt_mix(seed * 0x100000001b3ULL + i); }

/* Stamp / check the first 64 words of each of `pages` pages at p with `seed`. */
static inline void cpt_stamp(void *p, size_t pages, uint64_t seed) {
    for (size_t k = 0; k < pages; k++)
        for (size_t i = 0; i < 64; i++)
            ((volatile uint64_t *)((char *)p + k * PG))[i] = cpt_word(seed, k * 64 + i);
}

static inline void cpt_check_stamp(const char *what, const void *p, size_t pages, uint64_t seed) {
    for (size_t k = 0; k < pages; k++)
        for (size_t i = 0; i < 64; i++) {
            uint64_t have = ((const volatile uint64_t *)((const char *)p + k * PG))[i];
            if (have != cpt_word(seed, k * 64 + i))
                cpt_corrupt("%s: page %zu word %zu is %016" PRIx64 ", seed %" PRIu64, what, k,
                            i, have, seed);
        }
}

/* Free address space for `len` bytes (mapped, then unmapped again). */
static inline uintptr_t cpt_hole(size_t len) {
    void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) cpt_corrupt("no address space");
    munmap(p, len);
    return (uintptr_t)p;
}

static inline int cpt_stop(const char *stopfile) { return access(stopfile, F_OK) == 0; }

static inline void cpt_nap(void) {
    struct timespec ts = {0, 300000};
    nanosleep(&ts, NULL);
}

#endif
