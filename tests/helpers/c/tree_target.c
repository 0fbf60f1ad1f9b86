/*
 * A process tree that shares memory and checks its own memory. It knows nothing of
 * cpcoord. Built by the tests with gcc into a temporary directory.
 *
 *   tree_target KIND PAGES
 *
 * KIND is the shared object: "anon" (MAP_SHARED | MAP_ANONYMOUS), "sysv" (a SysV shm
 * segment, IPC_RMID at once) or "memfd" (memfd_create, MAP_SHARED). The parent makes the
 * object (PAGES pages) and a private anonymous region (PAGES pages), then forks a child
 * that inherits both (its private copy becomes its own on its first write). Every page
 * of every region holds a pattern of (region, owner, version, page); each process keeps
 * the version it last wrote in `cur` (memory, so a rollback takes it back too).
 *
 * The parent prints "ready SHARED PRIV CHILDPID" (addresses hex), then answers commands
 * read with read(2) from stdin, one per line, relaying each to its children through
 * pipes (no stdio buffer to roll back; every process is blocked in read() between
 * commands, with every pipe empty):
 *   write V  -> every process writes version V into its private region, and its share
 *               of the shared object (the parent the even pages, children the odd ones);
 *               "ok" when all are done
 *   check    -> every process checks its private region and the whole shared object
 *               against its own `cur`: "ok VERSION", or "bad WHO WHAT PAGE" (it keeps
 *               running: a check never exits)
 *   unmap    -> the parent unmaps the shared object; from then on the children write all
 *               of it (the same bytes) and the parent checks only its private region
 *   fork     -> a new child (it shares the object, has its own private region copy);
 *               "child PID"
 *   quit     -> every process exits 0
 * A process that finds its pipes broken exits 3 (harmed).
 */
#include "cptest.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define PAGE 4096
#define MAXKIDS 8

static unsigned char *shared, *priv;
static long pages;
static uint64_t cur;  /* the version this process last wrote: rolled back with memory */
static int who;       /* 0 = parent, k = k-th child */
static int alone;     /* after "unmap": the parent has no shared mapping, children write all */

static uint64_t word(int region, int owner, uint64_t version, long page, long i) {
    return cpt_mix(((uint64_t)region << 60) ^ ((uint64_t)owner << 52) ^ (version << 36) ^
                   ((uint64_t)page << 12) ^ (uint64_t)i);
}

static void fill(unsigned char *p, int region, int owner, uint64_t v, long page) {
    uint64_t *w = (uint64_t *)p;
    for (long i = 0; i < PAGE / 8; i++) w[i] = word(region, owner, v, page, i);
}

static int same(const unsigned char *p, int region, int owner, uint64_t v, long page) {
    const uint64_t *w = (const uint64_t *)p;
    for (long i = 0; i < PAGE / 8; i++)
        if (w[i] != word(region, owner, v, page, i)) return 0;
    return 1;
}

/* Shared page `p` is written by the parent when even, by the children when odd (owner 1
 * for every child: they write the same bytes). */
static int shared_owner(long p) { return p % 2 ? 1 : 0; }

static void write_version(uint64_t v) {
    for (long p = 0; p < pages; p++) fill(priv + p * PAGE, 1, who, v, p);
    for (long p = 0; p < pages; p++)
        if (who ? (alone || shared_owner(p)) : (!alone && !shared_owner(p)))
            fill(shared + p * PAGE, 0, shared_owner(p), v, p);
    cur = v;
}

/* "" when this process's view holds version `cur` everywhere; else what is wrong. */
static void check(char *out, size_t n) {
    for (long p = 0; p < pages; p++)
        if (!same(priv + p * PAGE, 1, who, cur, p)) {
            snprintf(out, n, "bad %d private %ld", who, p);
            return;
        }
    for (long p = 0; p < pages && !(who == 0 && alone); p++)
        if (!same(shared + p * PAGE, 0, shared_owner(p), cur, p)) {
            snprintf(out, n, "bad %d shared %ld", who, p);
            return;
        }
    out[0] = 0;
}

/* One line from fd with read(2), no buffering beyond it; exits 3 on EOF or error. */
static void get_line(int fd, char *buf, size_t n) {
    size_t k = 0;
    while (k + 1 < n) {
        ssize_t r = read(fd, buf + k, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (who == 0 && k == 0) _exit(0);  /* stdin closed: the test ended */
            cpt_corrupt("process %d: pipe broken", who);
        }
        if (buf[k] == '\n') break;
        k++;
    }
    buf[k] = 0;
}

static void put(int fd, const char *s) {
    size_t n = strlen(s);
    if (write(fd, s, n) != (ssize_t)n || write(fd, "\n", 1) != 1) cpt_corrupt("write pipe");
}

static int to_kid[MAXKIDS], from_kid[MAXKIDS], kid_pid[MAXKIDS], kids;

static void child_loop(int in, int out) {
    char cmd[64], res[96];
    for (;;) {
        get_line(in, cmd, sizeof cmd);
        if (!strncmp(cmd, "write ", 6)) {
            write_version(strtoull(cmd + 6, NULL, 10));
            put(out, "ok");
        } else if (!strcmp(cmd, "check")) {
            check(res, sizeof res);
            if (!res[0]) snprintf(res, sizeof res, "ok %" PRIu64, cur);
            put(out, res);
        } else if (!strcmp(cmd, "unmap")) {
            alone = 1;
            put(out, "ok");
        } else if (!strcmp(cmd, "quit")) {
            _exit(0);
        } else {
            cpt_corrupt("child %d: unknown command %s", who, cmd);
        }
    }
}

static pid_t spawn(void) {
    if (kids == MAXKIDS) cpt_corrupt("too many children");
    int a[2], b[2];
    if (pipe(a) || pipe(b)) cpt_corrupt("pipe");
    pid_t c = fork();
    if (c < 0) cpt_corrupt("fork");
    if (c == 0) {
        who = kids + 1;
        close(a[1]);
        close(b[0]);
        child_loop(a[0], b[1]);
    }
    close(a[0]);
    close(b[1]);
    to_kid[kids] = a[1];
    from_kid[kids] = b[0];
    kid_pid[kids++] = c;
    return c;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: tree_target anon|sysv|memfd PAGES\n");
        return 2;
    }
    pages = atol(argv[2]);
    size_t len = (size_t)pages * PAGE;
    if (!strcmp(argv[1], "anon")) {
        shared = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    } else if (!strcmp(argv[1], "sysv")) {
        int id = shmget(IPC_PRIVATE, len, IPC_CREAT | 0600);
        if (id < 0) cpt_corrupt("shmget");
        shared = shmat(id, NULL, 0);
        shmctl(id, IPC_RMID, NULL);
    } else if (!strcmp(argv[1], "memfd")) {
        int fd = memfd_create("tree", 0);
        if (fd < 0 || ftruncate(fd, (off_t)len)) cpt_corrupt("memfd");
        shared = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    } else {
        fprintf(stderr, "unknown kind %s\n", argv[1]);
        return 2;
    }
    priv = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED || shared == (void *)-1 || priv == MAP_FAILED) cpt_corrupt("mmap");
    signal(SIGPIPE, SIG_IGN);
    /* Version 1 everywhere: the parent writes the shared object's odd pages too, as the
     * children will. */
    for (long p = 0; p < pages; p++) fill(shared + p * PAGE, 0, shared_owner(p), 1, p);
    for (long p = 0; p < pages; p++) fill(priv + p * PAGE, 1, 0, 1, p);
    cur = 1;
    pid_t first = spawn();
    /* The child's private copy is the parent's until it writes: make it its own. */
    put(to_kid[0], "write 1");
    char cmd[64], res[96];
    get_line(from_kid[0], res, sizeof res);
    cpt_ready("%lx %lx %d", (unsigned long)shared, (unsigned long)priv, (int)first);
    for (;;) {
        get_line(0, cmd, sizeof cmd);
        if (!strncmp(cmd, "write ", 6)) {
            write_version(strtoull(cmd + 6, NULL, 10));
            for (int k = 0; k < kids; k++) put(to_kid[k], cmd);
            for (int k = 0; k < kids; k++) get_line(from_kid[k], res, sizeof res);
            printf("ok\n");
        } else if (!strcmp(cmd, "check")) {
            check(res, sizeof res);
            for (int k = 0; k < kids && !res[0]; k++) {
                put(to_kid[k], "check");
                get_line(from_kid[k], res, sizeof res);
                if (!strncmp(res, "ok ", 3)) {
                    if (strtoull(res + 3, NULL, 10) != cur)
                        snprintf(res, sizeof res, "bad %d version", k + 1);
                    else
                        res[0] = 0;
                }
            }
            if (res[0]) printf("%s\n", res);
            else printf("ok %" PRIu64 "\n", cur);
        } else if (!strcmp(cmd, "fork") && alone) {
            printf("no\n");  /* a child would have no shared object to share */
        } else if (!strcmp(cmd, "fork")) {
            pid_t c = spawn();
            char w[48];
            snprintf(w, sizeof w, "write %" PRIu64, cur);  /* its own private copy */
            put(to_kid[kids - 1], w);
            get_line(from_kid[kids - 1], res, sizeof res);
            printf("child %d\n", (int)c);
        } else if (!strcmp(cmd, "unmap")) {
            if (munmap(shared, len)) cpt_corrupt("munmap");
            alone = 1;
            for (int k = 0; k < kids; k++) put(to_kid[k], cmd);
            for (int k = 0; k < kids; k++) get_line(from_kid[k], res, sizeof res);
            printf("ok\n");
        } else if (!strcmp(cmd, "quit")) {
            for (int k = 0; k < kids; k++) put(to_kid[k], "quit");
            for (int k = 0; k < kids; k++) waitpid(kid_pid[k], NULL, 0);
            printf("bye\n");
            fflush(stdout);
            _exit(0);
        } else {
            cpt_corrupt("unknown command %s", cmd);
        }
        fflush(stdout);
    }
}
