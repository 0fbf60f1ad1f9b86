/*
 * Maps and unmaps in a loop (restore in place must put the layout back: issue 15).
 *
 *   layout_mapunmap STOPFILE
 *     Prints "ready RUN" (the address of its struct cpt_run) and loops until STOPFILE
 *     exists, then exits 0. Slot k of 16 (16 pages apart) is, step after step, unmapped
 *     or mapped read-write with 1..8 pages stamped with the step's seed. Every step checks
 *     every slot: mapped exactly as its state says (and nothing after it), stamped right;
 *     unmapped slots unmapped. A rollback of memory without the layout breaks this.
 */
#include "cpt_layout.h"

#define SLOTS 16
#define SPACING (16 * PG)

static uintptr_t base;
static uint64_t mapped[SLOTS], pages[SLOTS], seed[SLOTS];

static void check(void) {
    cpt_read_maps();
    for (int k = 0; k < SLOTS; k++) {
        uintptr_t a = base + k * SPACING;
        if (mapped[k]) {
            cpt_expect("mapped slot", a, pages[k] * PG, "rw-p");
            cpt_expect("after a slot", a + pages[k] * PG, SPACING - pages[k] * PG, NULL);
            cpt_check_stamp("slot", (void *)a, pages[k], seed[k]);
        } else {
            cpt_expect("unmapped slot", a, SPACING, NULL);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    base = cpt_hole(SLOTS * SPACING + SPACING);
    base = (base + SPACING - 1) / SPACING * SPACING;
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        check(); /* first: a rollback resumes in the nap below */
        int k = (int)(n % SLOTS);
        uintptr_t a = base + k * SPACING;
        if (mapped[k]) {
            if (munmap((void *)a, pages[k] * PG)) cpt_corrupt("munmap failed");
            mapped[k] = 0;
        } else {
            uint64_t np = 1 + (n * 7 + (uint64_t)k) % 8;
            void *p = mmap((void *)a, np * PG, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (p != (void *)a) cpt_corrupt("mmap slot %d failed (%p)", k, p);
            cpt_stamp(p, np, n);
            pages[k] = np;
            seed[k] = n;
            mapped[k] = 1;
        }
        check();
        run.steps = n;
        if (cpt_stop(argv[1])) {
            check();
            return 0;
        }
        cpt_nap();
    }
}
