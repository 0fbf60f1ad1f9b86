/*
 * Grows its stack after the start (restore in place with a stack grown since the cut:
 * issue 15).
 *
 *   layout_stack STOPFILE
 *     Prints "ready RUN" and loops until STOPFILE exists, then exits 0. Step n recurses
 *     to depth (n / 100) % 8 (% 48 once the driver pokes run.poke, after the cut) with
 *     32 KiB frames stamped with the step's seed, and checks every frame on the way back;
 *     run.mark is the deepest depth reached so far: after the poke the stack grows to
 *     about 1.5 MiB. It checks that the stack mapping covers every frame (rw-p) at the
 *     deepest point.
 */
#include "cpt_layout.h"

#define FRAME 32768

static uint64_t max_depth;

static void dive(uint64_t depth, uint64_t want, uint64_t seed) {
    volatile uint64_t buf[FRAME / 8];
    for (size_t i = 0; i < FRAME / 8; i += 64) buf[i] = cpt_word(seed, depth * 4096 + i);
    if (depth < want) {
        dive(depth + 1, want, seed);
    } else {
        cpt_read_maps();
        cpt_expect("stack", ((uintptr_t)buf + PG - 1) & ~(PG - 1), FRAME - PG, "rw-p");
    }
    for (size_t i = 0; i < FRAME / 8; i += 64)
        if (buf[i] != cpt_word(seed, depth * 4096 + i))
            cpt_corrupt("frame %" PRIu64 " word %zu of step %" PRIu64, depth, i, seed);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        uint64_t want = (n / 100) % (run.poke ? 48 : 8);
        dive(0, want, n);
        if (want > max_depth) max_depth = want;
        run.mark = max_depth;
        run.steps = n;
        if (cpt_stop(argv[1])) return 0;
        cpt_nap();
    }
}
