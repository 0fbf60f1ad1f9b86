/*
 * Grows and shrinks its heap with brk in a loop (restore in place must put brk back:
 * issue 15). No malloc after start: the heap is the program's own.
 *
 *   layout_brk STOPFILE
 *     Prints "ready RUN" and loops until STOPFILE exists, then exits 0. Each step moves
 *     the program break to a new number of pages (0..22) above where it started, stamping
 *     pages it gains with the step's seed. Every step checks the kernel's break (brk(0),
 *     not glibc's cached one), that the pages below it are mapped read-write and stamped
 *     as recorded, and that nothing is mapped just above it.
 */
#include <sys/syscall.h>

#include "cpt_layout.h"

#define MAXP 24

static uintptr_t base;
static uint64_t cur, page_seed[MAXP];

static uintptr_t kernel_brk(void) { return (uintptr_t)syscall(SYS_brk, 0); }

static void check(void) {
    uintptr_t have = kernel_brk();
    if (have != base + cur * PG)
        cpt_corrupt("brk is 0x%lx, want 0x%lx", (unsigned long)have,
                    (unsigned long)(base + cur * PG));
    cpt_read_maps();
    if (cur) cpt_expect("heap", base, cur * PG, "rw-p");
    cpt_expect("above the heap", base + cur * PG, PG, NULL);
    for (uint64_t i = 0; i < cur; i++)
        cpt_check_stamp("heap page", (void *)(base + i * PG), 1, page_seed[i]);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    base = kernel_brk();
    if (base % PG) {
        fprintf(stderr, "brk 0x%lx not page-aligned\n", (unsigned long)base);
        return 2;
    }
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        check(); /* first: a rollback resumes in the nap below */
        uint64_t want = (n * 7) % 23;
        if (syscall(SYS_brk, base + want * PG) != (long)(base + want * PG))
            cpt_corrupt("brk to %" PRIu64 " pages failed", want);
        for (uint64_t i = cur; i < want; i++) {
            cpt_stamp((void *)(base + i * PG), 1, n * 100 + i);
            page_seed[i] = n * 100 + i;
        }
        cur = want;
        check();
        run.steps = n;
        if (cpt_stop(argv[1])) {
            check();
            return 0;
        }
        cpt_nap();
    }
}
