/*
 * A C test target for shared memory that checks its own memory. It knows
 * nothing of cpcoord. Built by the tests with gcc into a temporary directory.
 *
 *   shared_target PAGES [keep]
 *
 * Four shared objects of PAGES pages each, whose contents this process never touches
 * through its own mappings before it is asked to check them (so none of their pages is
 * in its page tables at the first checkpoint):
 *   memfd  a memfd filled with write() (the last quarter left a hole), mapped MAP_SHARED;
 *   anon   MAP_SHARED | MAP_ANONYMOUS, written only by a forked child (which exits);
 *   sysv   a SysV shm segment (IPC_RMID at once), written only by a forked child;
 *   shm    a /dev/shm file filled with write() (last quarter a hole), mapped MAP_SHARED,
 *          then unlinked, unless `keep` (then it stays, and only an explicit range holds it).
 * Version 0 is that initial content: pattern 0 on every page, zeros in the holes.
 *
 * Prints "ready MEMFD ANON SYSV SHM PAGES SHMPATH" (addresses in hex), then answers
 * commands read with read(2) from stdin, one per line (no stdio buffer to roll back):
 *   check V  -> "ok" when every page of every object holds version V, else
 *               "bad OBJECT PAGE" for the first page that does not (it keeps running)
 *   write V  -> a forked child rewrites every page of every object with pattern V
 *               (V > 0); "ok" once it has exited
 *   quit     -> exits 0
 * Single-threaded, blocked in read() between commands: a whole-memory restore puts it
 * back into that read().
 */
#include "cptest.h"

#include <fcntl.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define PAGE 4096
#define NOBJ 4

static const char *names[NOBJ] = {"memfd", "anon", "sysv", "shm"};
static unsigned char *base[NOBJ];
static long pages;

static uint64_t word(int obj, uint64_t version, long page, long i) {
    return cpt_mix(((uint64_t)obj << 56) ^ (version << 40) ^ ((uint64_t)page << 12) ^ (uint64_t)i);
}

static void fill(unsigned char *p, int obj, uint64_t version, long page) {
    uint64_t *w = (uint64_t *)p;
    for (long i = 0; i < PAGE / 8; i++) w[i] = word(obj, version, page, i);
}

/* Pages of version 0 that are holes (never written): the last quarter of the objects
 * filled with write(). */
static int hole(int obj, long page) { return (obj == 0 || obj == 3) && page >= pages - pages / 4; }

static void write_file(int fd, int obj) {
    static unsigned char buf[PAGE];
    for (long p = 0; p < pages - pages / 4; p++) {
        fill(buf, obj, 0, p);
        if (write(fd, buf, PAGE) != PAGE) cpt_corrupt("write %s page %ld", names[obj], p);
    }
    if (ftruncate(fd, pages * PAGE) != 0) cpt_corrupt("ftruncate %s", names[obj]);
}

/* A forked child writes version `v` into the objects in `mask`, then exits. */
static void child_writes(uint64_t v, unsigned mask) {
    pid_t c = fork();
    if (c < 0) cpt_corrupt("fork");
    if (c == 0) {
        for (int o = 0; o < NOBJ; o++)
            if (mask & (1u << o))
                for (long p = 0; p < pages; p++) fill(base[o] + p * PAGE, o, v, p);
        _exit(0);
    }
    int st = 0;
    if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        cpt_corrupt("child writer failed");
}

static void say(const char *s) {
    size_t n = strlen(s);
    if (write(1, s, n) != (ssize_t)n) _exit(4);
}

static void check(uint64_t v) {
    char out[96];
    for (int o = 0; o < NOBJ; o++)
        for (long p = 0; p < pages; p++) {
            const uint64_t *w = (const uint64_t *)(base[o] + p * PAGE);
            int zero = v == 0 && hole(o, p);
            for (long i = 0; i < PAGE / 8; i++)
                if (w[i] != (zero ? 0 : word(o, v, p, i))) {
                    snprintf(out, sizeof out, "bad %s %ld\n", names[o], p);
                    say(out);
                    return;
                }
        }
    say("ok\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: shared_target PAGES [keep]\n");
        return 2;
    }
    pages = atol(argv[1]);
    int keep = argc > 2 && strcmp(argv[2], "keep") == 0;
    size_t size = (size_t)pages * PAGE;

    int mfd = memfd_create("cpt-shared", 0);
    if (mfd < 0) cpt_corrupt("memfd_create");
    write_file(mfd, 0);
    base[0] = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);

    base[1] = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    int sid = shmget(IPC_PRIVATE, size, IPC_CREAT | 0600);
    if (sid < 0) cpt_corrupt("shmget");
    base[2] = shmat(sid, NULL, 0);
    shmctl(sid, IPC_RMID, NULL); /* gone with the last detach */

    char path[64];
    snprintf(path, sizeof path, "/dev/shm/cpt-shared-%d", (int)getpid());
    int sfd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (sfd < 0) cpt_corrupt("open %s", path);
    write_file(sfd, 3);
    base[3] = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (!keep) unlink(path);

    for (int o = 0; o < NOBJ; o++)
        if (base[o] == MAP_FAILED || base[o] == (void *)-1) cpt_corrupt("map %s", names[o]);
    child_writes(0, (1u << 1) | (1u << 2)); /* anon and sysv: only a child ever wrote them */

    cpt_ready("%lx %lx %lx %lx %ld %s", (unsigned long)base[0], (unsigned long)base[1],
              (unsigned long)base[2], (unsigned long)base[3], pages, keep ? path : "-");
    char line[128];
    for (;;) {
        ssize_t n = 0, got = 1;
        while (n < (ssize_t)sizeof line - 1 && (got = read(0, line + n, 1)) == 1 && line[n] != '\n')
            n++;
        if (n == 0 && got <= 0) break;
        line[n] = 0;
        unsigned long long v = 0;
        if (sscanf(line, "check %llu", &v) == 1) {
            check(v);
        } else if (sscanf(line, "write %llu", &v) == 1 && v > 0) {
            child_writes(v, 0xf);
            say("ok\n");
        } else if (strcmp(line, "quit") == 0) {
            break;
        } else {
            say("error\n");
        }
    }
    if (keep) unlink(path);
    return 0;
}
