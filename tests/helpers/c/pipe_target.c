/*
 * A whole-memory restore target whose memory depends on kernel state: a pipe holding
 * unread data, and the fds it has open. It knows nothing of cpcoord.
 *
 *   pipe_target N
 *     Makes a pipe, writes N bytes of a known pattern into it (read later), prints
 *     "ready RFD WFD", then answers one command per line on stdin:
 *       drain  reads the N bytes back, checks the pattern, notes in memory that the pipe
 *              is drained; "drained"
 *       open   opens /dev/null and keeps it; "opened FD"
 *       check  compares what memory says with what the kernel holds: memory says the
 *              pipe holds N bytes (not drained yet) or none; FIONREAD says how many it
 *              holds. "ok drained=D unread=U" when they agree, else "disagree drained=D
 *              unread=U" (what a rollback leaves when it ignores the kernel side)
 *       quit   exits 0
 *     A pattern read back wrong: "corrupt ..." on stderr, exit 3.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "cptest.h"

static int pipefd[2];
static volatile int drained; /* memory's view: 0 = N bytes still in the pipe */
static size_t n_bytes;

static unsigned char pattern(size_t i) { return (unsigned char)(cpt_mix(i) & 0xff); }

static int line(char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r <= 0) return -1;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: pipe_target N\n");
        return 2;
    }
    n_bytes = strtoul(argv[1], NULL, 10);
    if (n_bytes == 0 || n_bytes > 4096 || pipe(pipefd) != 0) return 2;
    unsigned char out[4096];
    for (size_t i = 0; i < n_bytes; i++) out[i] = pattern(i);
    if (write(pipefd[1], out, n_bytes) != (ssize_t)n_bytes) return 2;
    cpt_ready("%d %d", pipefd[0], pipefd[1]);
    char cmd[64];
    while (line(cmd, sizeof cmd) >= 0) {
        if (strcmp(cmd, "drain") == 0) {
            unsigned char in[4096];
            size_t got = 0;
            while (got < n_bytes) {
                ssize_t r = read(pipefd[0], in + got, n_bytes - got);
                if (r <= 0) cpt_corrupt("pipe read returned %zd", r);
                got += (size_t)r;
            }
            for (size_t i = 0; i < n_bytes; i++)
                if (in[i] != pattern(i)) cpt_corrupt("pipe byte %zu is %u", i, in[i]);
            drained = 1;
            printf("drained\n");
        } else if (strcmp(cmd, "open") == 0) {
            printf("opened %d\n", open("/dev/null", O_RDONLY));
        } else if (strcmp(cmd, "check") == 0) {
            int unread = -1;
            ioctl(pipefd[0], FIONREAD, &unread);
            int want = drained ? 0 : (int)n_bytes;
            printf("%s drained=%d unread=%d\n", unread == want ? "ok" : "disagree", drained,
                   unread);
        } else if (strcmp(cmd, "quit") == 0) {
            return 0;
        } else {
            printf("unknown\n");
        }
        fflush(stdout);
    }
    return 0;
}
