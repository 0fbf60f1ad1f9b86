/*
 * A target whose one region is rewritten and remapped on command: restore in
 * place must refuse it when its mapping changed since the cut, and a restore that fails
 * part-way must leave it as it was. It checks its own memory; it knows nothing of cpcoord.
 *
 *   remap_target PAGES START FILE_A FILE_B
 *     Maps PAGES pages at one address, read-write, as START says: "anon" (private
 *     anonymous) or "file" (FILE_A, private), fills them with the pattern of seed 1 and
 *     prints "ready ADDR". FILE_A and FILE_B must hold at least PAGES pages. Commands on
 *     stdin, one per line, each answered with one line:
 *       fill SEED   rewrite every page with the pattern of SEED           -> "ok HASH"
 *       remap HOW   replace the mapping at the same address and size:
 *                     ro      mprotect read-only
 *                     rx      mprotect read + execute
 *                     file    FILE_A, private, read-write (anonymous -> a file)
 *                     file2   FILE_B, private, read-write (one file -> another)
 *                     shared  shared anonymous, read-write (private -> shared), refilled
 *                             with the pattern of the last seed
 *                   and remember what it holds now                        -> "ok HASH"
 *       check       the region holds what was remembered ("ok HASH"); else it prints
 *                   "corrupt ..." on stderr and exits 3
 *       hash        "ok HASH" of what it holds now (nothing checked)
 *       quit        exit 0
 *   The region is remembered after "ready" and after every fill or remap.
 */
#include "cptest.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>

static unsigned char *region;
static size_t size;
static const char *file_a, *file_b;
static uint64_t want, last_seed = 1;

static uint64_t hash_region(void) {
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    const uint64_t *w = (const uint64_t *)region;
    for (size_t i = 0; i < size / 8; i++) h = cpt_mix(h ^ w[i]) + i;
    return h;
}

static void fill(uint64_t seed) {
    uint64_t *w = (uint64_t *)region;
    for (size_t i = 0; i < size / 8; i++) w[i] = cpt_mix(seed * 0x100000001b3ULL + i);
    last_seed = seed;
}

static void map_file(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) cpt_corrupt("open %s failed", path);
    void *p = mmap(region, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0);
    if (p != region) cpt_corrupt("mmap of %s failed", path);
    close(fd);
}

static int remap(const char *how) {
    if (!strcmp(how, "ro")) return mprotect(region, size, PROT_READ);
    if (!strcmp(how, "rx")) return mprotect(region, size, PROT_READ | PROT_EXEC);
    if (!strcmp(how, "file")) {
        map_file(file_a);
        return 0;
    }
    if (!strcmp(how, "file2")) {
        map_file(file_b);
        return 0;
    }
    if (!strcmp(how, "shared")) {
        void *p = mmap(region, size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != region) return -1;
        fill(last_seed);
        return 0;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: remap_target PAGES anon|file FILE_A FILE_B\n");
        return 2;
    }
    size = (size_t)strtoull(argv[1], NULL, 10) * 4096;
    file_a = argv[3];
    file_b = argv[4];
    region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) cpt_corrupt("mmap failed");
    if (!strcmp(argv[2], "file")) map_file(file_a);
    fill(1);
    want = hash_region();
    cpt_ready("%p", (void *)region);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char arg[64] = "";
        unsigned long long seed = 0;
        if (sscanf(line, "fill %llu", &seed) == 1) {
            fill(seed);
            want = hash_region();
        } else if (sscanf(line, "remap %63s", arg) == 1) {
            if (remap(arg)) cpt_corrupt("remap %s failed", arg);
            want = hash_region();
        } else if (!strncmp(line, "check", 5)) {
            uint64_t have = hash_region();
            if (have != want)
                cpt_corrupt("region changed behind our back: hash %016" PRIx64 ", want %016" PRIx64,
                            have, want);
        } else if (!strncmp(line, "hash", 4)) {
            printf("ok %016" PRIx64 "\n", hash_region());
            fflush(stdout);
            continue;
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        } else {
            cpt_corrupt("unknown command %s", line);
        }
        printf("ok %016" PRIx64 "\n", want);
        fflush(stdout);
    }
    return 0;
}
