/*
 * A private file mapping it unmaps on request (restore in place re-maps a file mapping
 * only from the unchanged file: issue 15).
 *
 *   layout_file STOPFILE GOFILE FILE
 *     Maps 4 pages of FILE private read-write, stamps pages 0 and 1 (pages 2 and 3 stay
 *     the file's bytes, which it reads at the start), prints "ready RUN" and loops until
 *     STOPFILE exists, then exits 0. While GOFILE exists it unmaps the file mapping (once;
 *     run.mark = 1 from then on). Every step checks the mapping: mapped read-write with
 *     the stamps and the file's bytes while run.mark is 0, unmapped after.
 */
#include "cpt_layout.h"

static unsigned char *map, filebytes[2 * 4096];

static void check(void) {
    cpt_read_maps();
    if (run.mark) {
        cpt_expect("unmapped file mapping", (uintptr_t)map, 4 * PG, NULL);
        return;
    }
    cpt_expect("file mapping", (uintptr_t)map, 4 * PG, "rw-p");
    cpt_check_stamp("stamped page", map, 2, 5);
    if (memcmp(map + 2 * PG, filebytes, sizeof filebytes))
        cpt_corrupt("the file's pages differ from the file");
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int fd = open(argv[3], O_RDONLY);
    if (fd < 0 || pread(fd, filebytes, sizeof filebytes, 2 * PG) != (ssize_t)sizeof filebytes)
        cpt_corrupt("cannot read %s", argv[3]);
    map = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) cpt_corrupt("mmap failed");
    close(fd);
    cpt_stamp(map, 2, 5);
    cpt_read_maps(); /* opens the maps file before the first cut */
    cpt_ready("%p", (void *)&run);
    for (uint64_t n = 1;; n++) {
        check(); /* first: a rollback resumes in the nap below */
        if (!run.mark && access(argv[2], F_OK) == 0) {
            if (munmap(map, 4 * PG)) cpt_corrupt("munmap failed");
            run.mark = 1;
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
