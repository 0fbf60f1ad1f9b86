/*
 * A C test target for copy-on-write sharing that checks its own memory. It
 * knows nothing of cpcoord. Built by the tests with gcc into a temporary directory.
 *
 *   cow_target MIB
 *
 * Fills MIB MiB of private anonymous memory with a pattern, then forks: parent and child
 * now share every page copy-on-write (smaps: Shared_Dirty), as a forking server or a
 * Python worker pool does. Neither writes that memory again, so it stays shared unless
 * something else unshares it. Prints "ready ADDR MIB CHILD" (address in hex, the
 * child's pid), then the parent answers commands read with read(2) from stdin:
 *   check  -> "ok" when both its memory and the child's hold the pattern, else
 *             "bad parent PAGE" / "bad child PAGE"
 *   quit   -> both exit 0
 * The child waits on a pipe and checks its copy when asked; it exits when the parent
 * goes away.
 */
#include "cptest.h"

#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096

static unsigned char *mem;
static long pages;

static uint64_t word(long page, long i) { return cpt_mix(((uint64_t)page << 12) ^ (uint64_t)i ^ 0xc0ull << 56); }

/* -1 when every page holds the pattern, else the first page that does not. */
static long verify(void) {
    for (long p = 0; p < pages; p++) {
        const uint64_t *w = (const uint64_t *)(mem + p * PAGE);
        for (long i = 0; i < PAGE / 8; i++)
            if (w[i] != word(p, i)) return p;
    }
    return -1;
}

static void say(const char *s) {
    size_t n = strlen(s);
    if (write(1, s, n) != (ssize_t)n) _exit(4);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: cow_target MIB\n");
        return 2;
    }
    long mib = atol(argv[1]);
    pages = mib * 256;
    mem = mmap(NULL, (size_t)pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) cpt_corrupt("mmap");
    for (long p = 0; p < pages; p++) {
        uint64_t *w = (uint64_t *)(mem + p * PAGE);
        for (long i = 0; i < PAGE / 8; i++) w[i] = word(p, i);
    }
    int ask[2], answer[2];
    if (pipe(ask) || pipe(answer)) cpt_corrupt("pipe");
    pid_t child = fork();
    if (child < 0) cpt_corrupt("fork");
    if (child == 0) {
        close(ask[1]);
        close(answer[0]);
        char c;
        while (read(ask[0], &c, 1) == 1) {
            long bad = verify();
            if (write(answer[1], &bad, sizeof bad) != sizeof bad) _exit(4);
        }
        _exit(0);
    }
    close(ask[0]);
    close(answer[1]);
    cpt_ready("%lx %ld %d", (unsigned long)mem, mib, (int)child);
    char line[64];
    for (;;) {
        ssize_t n = 0, got = 1;
        while (n < (ssize_t)sizeof line - 1 && (got = read(0, line + n, 1)) == 1 && line[n] != '\n')
            n++;
        if (n == 0 && got <= 0) break;
        line[n] = 0;
        if (strcmp(line, "check") == 0) {
            char out[64];
            long bad = verify(), cbad = -2;
            if (write(ask[1], "c", 1) != 1 || read(answer[0], &cbad, sizeof cbad) != sizeof cbad)
                cpt_corrupt("child gone");
            if (bad >= 0)
                snprintf(out, sizeof out, "bad parent %ld\n", bad);
            else if (cbad >= 0)
                snprintf(out, sizeof out, "bad child %ld\n", cbad);
            else
                snprintf(out, sizeof out, "ok\n");
            say(out);
        } else if (strcmp(line, "quit") == 0) {
            break;
        } else {
            say("error\n");
        }
    }
    close(ask[1]);
    waitpid(child, NULL, 0);
    return 0;
}
