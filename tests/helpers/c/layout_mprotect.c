/*
 * Changes the protection of its mappings in a loop (restore in place must put the
 * protections back: issue 15).
 *
 *   layout_mprotect STOPFILE
 *     Prints "ready RUN" and loops until STOPFILE exists, then exits 0. Slot k of 8 (4
 *     pages, stamped once at the start) cycles through read-write, read-only, no access,
 *     and read-write with its two middle pages read-only (a split mapping). Every step
 *     checks each slot's protections page by page and the stamps of its readable pages.
 */
#include "cpt_layout.h"

#define SLOTS 8
#define SPACING (8 * PG)

static uintptr_t base;
static uint64_t mode[SLOTS];
static const char *const perms[4][4] = {
    {"rw-p", "rw-p", "rw-p", "rw-p"},
    {"r--p", "r--p", "r--p", "r--p"},
    {"---p", "---p", "---p", "---p"},
    {"rw-p", "r--p", "r--p", "rw-p"},
};

static void set(int k, uint64_t m) {
    char *a = (char *)(base + k * SPACING);
    int p = m == 0 || m == 3 ? PROT_READ | PROT_WRITE : m == 1 ? PROT_READ : PROT_NONE;
    if (mprotect(a, 4 * PG, p)) cpt_corrupt("mprotect failed");
    if (m == 3 && mprotect(a + PG, 2 * PG, PROT_READ)) cpt_corrupt("mprotect failed");
    mode[k] = m;
}

static void check(void) {
    cpt_read_maps();
    for (int k = 0; k < SLOTS; k++) {
        uintptr_t a = base + k * SPACING;
        for (int i = 0; i < 4; i++) {
            cpt_expect("slot page", a + i * PG, PG, perms[mode[k]][i]);
            if (perms[mode[k]][i][0] == 'r')
                cpt_check_stamp("slot page", (void *)(a + i * PG), 1, (uint64_t)k * 10 + i);
        }
        cpt_expect("after a slot", a + 4 * PG, SPACING - 4 * PG, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    base = cpt_hole(SLOTS * SPACING + SPACING);
    base = (base + SPACING - 1) / SPACING * SPACING;
    for (int k = 0; k < SLOTS; k++) {
        char *p = mmap((void *)(base + k * SPACING), 4 * PG, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED) cpt_corrupt("mmap failed");
        for (int i = 0; i < 4; i++) cpt_stamp(p + i * PG, 1, (uint64_t)k * 10 + i);
    }
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        check(); /* first: a rollback resumes in the nap below */
        int k = (int)(n % SLOTS);
        set(k, (mode[k] + 1) % 4);
        check();
        run.steps = n;
        if (cpt_stop(argv[1])) {
            check();
            return 0;
        }
        cpt_nap();
    }
}
