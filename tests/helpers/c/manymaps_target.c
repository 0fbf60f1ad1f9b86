/*
 * A self-checking program with tens of thousands of mappings; it knows nothing of cpcoord.
 *
 *   manymaps_target N PAGES holes|guards
 *     Maps N private anonymous read-write mappings of PAGES pages each, one page apart:
 *     `holes` leaves the page between two mappings unmapped, `guards` fills it with a
 *     PROT_NONE mapping (as thread stacks and allocators do), so the kernel cannot merge
 *     neighbours and the process has N (or 2N) mappings more. Every page is written with
 *     a pattern of (mapping, page, counter); the counters live in a table of the
 *     program's own. Prints "ready BASE STRIDE" (addresses in hex: mapping I starts at
 *     BASE + I * STRIDE) and then answers commands from stdin, one per line:
 *       w I P C     write counter C into page P of mapping I: "ok"
 *       W K C       write counter C into page 0 of every K-th mapping: "ok COUNT"
 *       c           check every page against the table: "ok PAGES" (or corrupt, exit 3)
 *       q           check, then exit 0
 *     A page holds its pattern word at every 512th word (cheap to check, sensitive to a
 *     page restored from the wrong place or time).
 */
#include "cptest.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static unsigned long n, pages, stride;
static char *base;
static uint32_t *counters; /* n * pages */

static uint64_t word(unsigned long i, unsigned long p, uint32_t c, unsigned long k)
{
    return cpt_mix(((uint64_t)i << 40) ^ ((uint64_t)p << 24) ^ ((uint64_t)c << 4) ^ k);
}

static uint64_t *page_at(unsigned long i, unsigned long p)
{
    return (uint64_t *)(base + i * stride + p * PAGE);
}

static void fill(unsigned long i, unsigned long p, uint32_t c)
{
    uint64_t *w = page_at(i, p);
    for (unsigned long k = 0; k < WORDS; k += 64)
        w[k] = word(i, p, c, k);
    counters[i * pages + p] = c;
}

static unsigned long check(void)
{
    for (unsigned long i = 0; i < n; i++)
        for (unsigned long p = 0; p < pages; p++) {
            uint64_t *w = page_at(i, p);
            uint32_t c = counters[i * pages + p];
            for (unsigned long k = 0; k < WORDS; k += 64)
                if (w[k] != word(i, p, c, k))
                    cpt_corrupt("mapping %lu page %lu word %lu: counter %u expected", i, p, k,
                                c);
        }
    return n * pages;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[3], "holes") && strcmp(argv[3], "guards"))) {
        fprintf(stderr, "usage: %s N PAGES holes|guards\n", argv[0]);
        return 2;
    }
    n = strtoul(argv[1], NULL, 0);
    pages = strtoul(argv[2], NULL, 0);
    stride = (pages + 1) * PAGE;
    int guards = !strcmp(argv[3], "guards");
    counters = calloc(n * pages, sizeof *counters);
    base = mmap(NULL, n * stride, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!counters || base == MAP_FAILED)
        cpt_corrupt("reserve: %s", strerror(errno));
    for (unsigned long i = 0; i < n; i++) {
        char *at = base + i * stride;
        if (mmap(at, pages * PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != at)
            cpt_corrupt("mmap %lu: %s", i, strerror(errno));
        if (!guards && munmap(at + pages * PAGE, PAGE) != 0)
            cpt_corrupt("munmap %lu: %s", i, strerror(errno));
        for (unsigned long p = 0; p < pages; p++)
            fill(i, p, 1);
    }
    check();
    cpt_ready("%lx %lx", (unsigned long)base, stride);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long i, p, k;
        unsigned c;
        if (sscanf(line, "w %lu %lu %u", &i, &p, &c) == 3 && i < n && p < pages) {
            fill(i, p, c);
            puts("ok");
        } else if (sscanf(line, "W %lu %u", &k, &c) == 2 && k > 0) {
            unsigned long count = 0;
            for (i = 0; i < n; i += k, count++)
                fill(i, 0, c);
            printf("ok %lu\n", count);
        } else if (line[0] == 'c') {
            printf("ok %lu\n", check());
        } else if (line[0] == 'q') {
            check();
            return 0;
        } else {
            printf("error %s", line);
        }
        fflush(stdout);
    }
    check();
    return 0;
}
