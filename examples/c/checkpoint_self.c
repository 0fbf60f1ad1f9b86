/*
 * checkpoint_self: a C program that checkpoints its own memory through the cpcoord node
 * agent and gets it back after a restart. It needs no library: the local API is a Unix
 * socket carrying frames of a 4-byte big-endian length and a JSON object
 * (docs/local-api.md).
 *
 *   cc -O2 -Wall -o checkpoint_self examples/c/checkpoint_self.c
 *   export CPCOORD_JOB=demo CPCOORD_MEMBER=c-0     # or run it under `cpcoord run`
 *   ./checkpoint_self run 40        # 40 steps, checkpoint, then keep working until killed
 *   ./checkpoint_self resume 100    # (after a restart) restore, continue up to step 100
 *
 * `run` registers its state region, computes STEPS steps, asks for a checkpoint of itself
 * and prints "checkpointed generation=G step=S"; it then goes on computing without
 * checkpointing, work a restart loses. `resume` registers the same region (by name and
 * size, wherever mmap puts it now), restores it, prints "restored generation=G step=S",
 * continues up to TOTAL and prints "result step=TOTAL digest=D", the same D as a run
 * that was never interrupted. CPCOORD_AGENT_SOCKET names the agent's socket (default
 * /run/cpcoord/agent.sock).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define STATE_BYTES (16 * 4096)
#define NWORDS (STATE_BYTES / 8 - 1)

struct state {
    uint64_t step;         /* the step the data has reached */
    uint64_t data[NWORDS]; /* the computation */
};

static void advance(struct state *st, uint64_t step) {
    for (uint64_t i = 0; i < NWORDS; i++)
        st->data[i] = st->data[i] * 6364136223846793005ULL + i + step;
    st->step = step;
}

static uint64_t digest(const struct state *st) {
    uint64_t d = 0;
    for (uint64_t i = 0; i < NWORDS; i++) d ^= st->data[i] * 0x9E3779B97F4A7C15ULL;
    return d;
}

/* ---- the local API: one frame out, one frame back ------------------------------------ */

static int io_all(int fd, void *buf, size_t n, int writing) {
    char *p = buf;
    while (n > 0) {
        ssize_t k = writing ? write(fd, p, n) : read(fd, p, n);
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Send `request`, read the reply into `reply` (NUL-terminated); exit on any error. */
static void call(int fd, const char *request, char *reply, size_t cap) {
    uint32_t len = htonl((uint32_t)strlen(request)), rlen;
    if (io_all(fd, &len, 4, 1) || io_all(fd, (void *)request, strlen(request), 1) ||
        io_all(fd, &rlen, 4, 0)) {
        fprintf(stderr, "checkpoint_self: the agent hung up\n");
        exit(1);
    }
    rlen = ntohl(rlen);
    if (rlen >= cap || io_all(fd, reply, rlen, 0)) {
        fprintf(stderr, "checkpoint_self: bad reply of %u bytes\n", rlen);
        exit(1);
    }
    reply[rlen] = '\0';
    if (!strstr(reply, "\"ok\":true")) { /* {"ok":false,"error":...,"message":...} */
        fprintf(stderr, "checkpoint_self: agent refused: %s\n", reply);
        exit(1);
    }
}

/* The unsigned integer after "key": in a flat JSON reply (enough for this API). */
static uint64_t json_u64(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(json, pat);
    if (!p) return 0;
    p += strlen(pat);
    while (*p == ' ' || *p == ':') p++;
    return strtoull(p, NULL, 10);
}

static int connect_agent(void) {
    const char *path = getenv("CPCOORD_AGENT_SOCKET");
    if (!path || !*path) path = "/run/cpcoord/agent.sock";
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("checkpoint_self: connect to the agent");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "run") && strcmp(argv[1], "resume"))) {
        fprintf(stderr, "usage: checkpoint_self run STEPS | resume TOTAL\n");
        return 2;
    }
    uint64_t steps = strtoull(argv[2], NULL, 10);
    const char *job = getenv("CPCOORD_JOB"), *member = getenv("CPCOORD_MEMBER");
    if (!job || !member) {
        fprintf(stderr, "checkpoint_self: set CPCOORD_JOB and CPCOORD_MEMBER\n");
        return 2;
    }
    /* Regions start on a page boundary: mmap gives one (malloc would not). */
    struct state *st = mmap(NULL, STATE_BYTES, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (st == MAP_FAILED) return 1;

    int fd = connect_agent();
    char req[512], reply[4096];
    snprintf(req, sizeof req,
             "{\"v\":1,\"op\":\"register\",\"job\":\"%s\",\"member\":\"%s\","
             "\"regions\":[{\"name\":\"state\",\"addr\":%" PRIuPTR ",\"size\":%d}]}",
             job, member, (uintptr_t)st, STATE_BYTES);
    call(fd, req, reply, sizeof reply);

    if (strcmp(argv[1], "run") == 0) {
        for (uint64_t s = 1; s <= steps; s++) advance(st, s);
        call(fd, "{\"v\":1,\"op\":\"checkpoint\",\"scope\":\"self\"}", reply, sizeof reply);
        printf("checkpointed generation=%" PRIu64 " step=%" PRIu64 "\n",
               json_u64(reply, "generation"), st->step);
        fflush(stdout);
        for (uint64_t s = steps + 1;; s++) { /* lost at the restart */
            advance(st, s);
            usleep(10000);
        }
    }
    /* resume: the agent writes the generation's bytes into st, then answers. */
    call(fd, "{\"v\":1,\"op\":\"restore\",\"regions\":[\"state\"]}", reply, sizeof reply);
    printf("restored generation=%" PRIu64 " step=%" PRIu64 "\n",
           json_u64(reply, "generation"), st->step);
    for (uint64_t s = st->step + 1; s <= steps; s++) advance(st, s);
    printf("result step=%" PRIu64 " digest=%" PRIu64 "\n", st->step, digest(st));
    close(fd);
    return 0;
}
