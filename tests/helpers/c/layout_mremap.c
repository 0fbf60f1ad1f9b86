/*
 * Grows, shrinks and moves mappings with mremap in a loop (restore in place must put
 * the layout back: issue 15).
 *
 *   layout_mremap STOPFILE
 *     Prints "ready RUN" and loops until STOPFILE exists, then exits 0. Slot k of 8 (32
 *     pages apart) holds 2 or 12 pages: each step grows one slot in place (the new pages
 *     stamped with the step's seed) or shrinks it back; every 5 steps a mover mapping goes
 *     from one home to the other (mremap MAYMOVE|FIXED). Every step checks each slot's
 *     extent (mapped as its state says, unmapped after), its stamps, and the mover.
 */
#include "cpt_layout.h"

#define SLOTS 8
#define SPACING (32 * PG)
#define SMALL 2
#define BIG 12

static uintptr_t base, home[2];
static uint64_t size[SLOTS], tail_seed[SLOTS], at_home;

static void check(void) {
    cpt_read_maps();
    for (int k = 0; k < SLOTS; k++) {
        uintptr_t a = base + k * SPACING;
        cpt_expect("slot", a, size[k] * PG, "rw-p");
        cpt_expect("after a slot", a + size[k] * PG, SPACING - size[k] * PG, NULL);
        cpt_check_stamp("slot head", (void *)a, SMALL, 1000 + (uint64_t)k);
        if (size[k] == BIG)
            cpt_check_stamp("slot tail", (void *)(a + SMALL * PG), BIG - SMALL, tail_seed[k]);
    }
    cpt_expect("mover", home[at_home], 4 * PG, "rw-p");
    cpt_expect("mover's other home", home[!at_home], 4 * PG, NULL);
    cpt_check_stamp("mover", (void *)home[at_home], 4, 77);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    base = cpt_hole(SLOTS * SPACING + 3 * SPACING);
    base = (base + SPACING - 1) / SPACING * SPACING;
    for (int k = 0; k < SLOTS; k++) {
        void *p = mmap((void *)(base + k * SPACING), SMALL * PG, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED) cpt_corrupt("mmap failed");
        cpt_stamp(p, SMALL, 1000 + (uint64_t)k);
        size[k] = SMALL;
    }
    home[0] = base + SLOTS * SPACING;
    home[1] = home[0] + SPACING;
    void *m = mmap((void *)home[0], 4 * PG, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (m == MAP_FAILED) cpt_corrupt("mmap failed");
    cpt_stamp(m, 4, 77);
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        check(); /* first: a rollback resumes in the nap below */
        int k = (int)(n % SLOTS);
        void *a = (void *)(base + k * SPACING);
        if (size[k] == SMALL) {
            if (mremap(a, SMALL * PG, BIG * PG, 0) != a) cpt_corrupt("mremap grow failed");
            cpt_stamp((char *)a + SMALL * PG, BIG - SMALL, n);
            tail_seed[k] = n;
            size[k] = BIG;
        } else {
            if (mremap(a, BIG * PG, SMALL * PG, 0) != a) cpt_corrupt("mremap shrink failed");
            size[k] = SMALL;
        }
        if (n % 5 == 0) {
            void *to = (void *)home[!at_home];
            if (mremap((void *)home[at_home], 4 * PG, 4 * PG, MREMAP_MAYMOVE | MREMAP_FIXED,
                       to) != to)
                cpt_corrupt("mremap move failed");
            at_home = !at_home;
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
