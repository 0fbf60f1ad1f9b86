/*
 * Processes that are hard to freeze, for the freeze tests (tests/integration/
 * test_freeze_hard.py, test_freeze_churn.py). Knows nothing of cpcoord.
 *
 * Every mode maps a region of PAGES pages stamped with a known pattern (word i of page p
 * is cpt_mix(SEED * 1000003 + p * 512 + i), SEED 1 at start), prints
 * "ready ADDR PAGES" and answers commands on stdin, one per line:
 *   p        "pong N" (N counts the work the mode's threads did: it must grow)
 *   c        check the region holds the pattern: "ok"
 *   s SEED   stamp the region with SEED: "ok"
 *   q        check, stop, print "bye ..." and exit 0
 * A region that does not hold the pattern, a vfork child that did not exit as it should,
 * or a thread count that does not add up ends the program with exit 3 (cptest.h).
 *
 *   freeze_target vfork PAGES MS
 *     The main thread vforks at once; the child prints "child PID", sleeps MS ms and
 *     _exits 7; the parent checks that status and prints "back", then serves commands.
 *     Command "v MS" vforks again the same way ("child PID", then "back").
 *   freeze_target vfork-loop PAGES MAXMS LONGMS EVERY
 *     A thread vforks over and over, each child sleeping a random 0..MAXMS ms, every
 *     EVERYth LONGMS ms; the main thread serves commands. Command "V MS": the next
 *     child sleeps MS ms; "ok" once that vfork() is under way.
 *   freeze_target churn PAGES THREADS
 *     THREADS spawner threads each create and join short-lived threads in a tight loop
 *     (every one writes a page of its own and exits); "bye CREATED" at the end.
 *   freeze_target leader-exit PAGES
 *     The main thread starts a worker and a command thread and calls pthread_exit(): the
 *     leader is a zombie while the process runs on. "q" exits the process with 0.
 *   freeze_target spin PAGES
 *     Two threads count in user space; the main thread serves commands.
 */
#include "cptest.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t *region;
static unsigned long npages;
static uint64_t seed = 1;
static atomic_ulong work;
static atomic_int stopping;

static void stamp(uint64_t s) {
    for (unsigned long p = 0; p < npages; p++)
        for (unsigned long i = 0; i < WORDS; i++)
            region[p * WORDS + i] = cpt_mix(s * 1000003ULL + p * 512 + i);
    seed = s;
}

static void check(void) {
    for (unsigned long p = 0; p < npages; p++)
        for (unsigned long i = 0; i < WORDS; i++)
            if (region[p * WORDS + i] != cpt_mix(seed * 1000003ULL + p * 512 + i))
                cpt_corrupt("page %lu word %lu: %016" PRIx64, p, i, region[p * WORDS + i]);
}


/* vfork a child that prints its pid, sleeps and _exits 7; check it did. Only system
 * calls in the child: it shares our memory and stack. */
static void vfork_once(long ms, int announce) {
    pid_t c = vfork();
    if (c == 0) {
        char line[32];
        int n = snprintf(line, sizeof line, "child %d\n", (int)syscall(SYS_getpid));
        if (announce)
            syscall(SYS_write, 1, line, n);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        while (syscall(SYS_nanosleep, &ts, &ts) != 0) {
        }
        syscall(SYS_exit, 7);
    }
    if (c < 0)
        cpt_corrupt("vfork: %s", strerror(errno));
    int st;
    while (waitpid(c, &st, 0) < 0)
        if (errno != EINTR)
            cpt_corrupt("waitpid %d: %s", c, strerror(errno));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 7)
        cpt_corrupt("vfork child %d ended with status 0x%x", c, st);
    atomic_fetch_add(&work, 1);
    if (announce) {
        printf("back\n");
        fflush(stdout);
    }
}

static long vl_max, vl_long, vl_every;
static atomic_long vl_next;    /* "V MS": the next child's sleep */
static atomic_ulong vl_forced; /* how many such vforks started */
static void *vfork_loop(void *arg) {
    (void)arg;
    uint64_t r = 12345;
    for (unsigned long i = 1; !atomic_load(&stopping); i++) {
        r = cpt_mix(r + i);
        long ms = i % vl_every == 0 ? vl_long : (long)(r % (uint64_t)(vl_max + 1));
        long forced = atomic_exchange(&vl_next, 0);
        if (forced) {
            ms = forced;
            atomic_fetch_add(&vl_forced, 1);
        }
        vfork_once(ms, 0);
    }
    return NULL;
}

static atomic_ulong created, finished;
static void *short_lived(void *arg) {
    volatile char *own = arg;
    own[0]++;
    atomic_fetch_add(&finished, 1);
    return NULL;
}
static void *spawner(void *arg) {
    char *own = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    (void)arg;
    if (own == MAP_FAILED)
        cpt_corrupt("mmap: %s", strerror(errno));
    while (!atomic_load(&stopping)) {
        pthread_t t;
        int e = pthread_create(&t, NULL, short_lived, own);
        if (e == EAGAIN)
            continue;
        if (e)
            cpt_corrupt("pthread_create: %s", strerror(e));
        atomic_fetch_add(&created, 1);
        if ((e = pthread_join(t, NULL)))
            cpt_corrupt("pthread_join: %s", strerror(e));
        atomic_fetch_add(&work, 1);
    }
    return NULL;
}

static void *spinner(void *arg) {
    (void)arg;
    while (!atomic_load(&stopping))
        for (int i = 0; i < 100000; i++)
            atomic_fetch_add_explicit(&work, 1, memory_order_relaxed);
    return NULL;
}

static pthread_t helpers[64];
static int nhelpers;

static void start(void *(*fn)(void *), int n) {
    for (int i = 0; i < n && nhelpers < 64; i++) {
        int e = pthread_create(&helpers[nhelpers++], NULL, fn, NULL);
        if (e)
            cpt_corrupt("pthread_create: %s", strerror(e));
    }
}

static int serve(void) {
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'p') {
            printf("pong %lu\n", atomic_load(&work));
        } else if (line[0] == 'c') {
            check();
            printf("ok\n");
        } else if (line[0] == 's') {
            stamp(strtoull(line + 1, NULL, 10));
            printf("ok\n");
        } else if (line[0] == 'V') {
            unsigned long before = atomic_load(&vl_forced);
            atomic_store(&vl_next, strtol(line + 1, NULL, 10));
            while (atomic_load(&vl_forced) == before)
                usleep(1000);
            usleep(20000); /* the flag is raised just before vfork(): let it get there */
            printf("ok\n");
        } else if (line[0] == 'v') {
            fflush(stdout);
            vfork_once(strtol(line + 1, NULL, 10), 1);
            continue;
        } else if (line[0] == 'q') {
            break;
        } else {
            printf("error unknown command\n");
        }
        fflush(stdout);
    }
    check();
    atomic_store(&stopping, 1);
    for (int i = 0; i < nhelpers; i++)
        pthread_join(helpers[i], NULL);
    if (atomic_load(&created) != atomic_load(&finished))
        cpt_corrupt("%lu threads created, %lu finished", atomic_load(&created),
                    atomic_load(&finished));
    printf("bye %lu\n", atomic_load(&created));
    fflush(stdout);
    return 0;
}

static void *serve_then_exit(void *arg) {
    (void)arg;
    exit(serve());
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: freeze_target MODE PAGES [ARGS]\n");
        return 2;
    }
    const char *mode = argv[1];
    npages = strtoul(argv[2], NULL, 10);
    region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        cpt_corrupt("mmap: %s", strerror(errno));
    stamp(1);
    /* "ready" once the mode's threads run (vfork: just before it blocks). */
    if (!strcmp(mode, "vfork") && argc > 3) {
        cpt_ready("%p %lu", (void *)region, npages);
        vfork_once(strtol(argv[3], NULL, 10), 1);
    } else if (!strcmp(mode, "vfork-loop") && argc > 5) {
        vl_max = strtol(argv[3], NULL, 10);
        vl_long = strtol(argv[4], NULL, 10);
        vl_every = strtol(argv[5], NULL, 10);
        if (vl_every < 1)
            vl_every = 1;
        start(vfork_loop, 1);
    } else if (!strcmp(mode, "churn") && argc > 3) {
        start(spawner, atoi(argv[3]));
    } else if (!strcmp(mode, "leader-exit")) {
        pthread_t t;
        start(spinner, 1);
        cpt_ready("%p %lu", (void *)region, npages);
        if (pthread_create(&t, NULL, serve_then_exit, NULL))
            cpt_corrupt("pthread_create failed");
        pthread_exit(NULL);
    } else if (!strcmp(mode, "spin")) {
        start(spinner, 2);
    } else {
        fprintf(stderr, "bad mode %s\n", mode);
        return 2;
    }
    if (strcmp(mode, "vfork"))
        cpt_ready("%p %lu", (void *)region, npages);
    return serve();
}
