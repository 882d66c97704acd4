/* A pairs job (built-in models and subjects) through the C ABI, with a progress callback.
 * Usage: ./pairs OUT_DIR */
#include <stdio.h>
#include <string.h>
#include "toffee.h"

static int progress(void *user, uint64_t done, uint64_t total) {
    (void)user;
    printf("%llu/%llu records\n", (unsigned long long)done, (unsigned long long)total);
    fflush(stdout);
    return 0; /* nonzero would cancel after the batch in flight */
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    volatile int32_t cancel = 0; /* another thread may set it to stop the job */
    toffee_pairs_options o;
    memset(&o, 0, sizeof o);
    o.size = sizeof o;
    o.out_dir = argv[1];
    o.progress = progress;
    o.cancel = (const int32_t *)&cancel;
    toffee_pairs_summary s;
    toffee_status st = toffee_pairs_run(&o, &s);
    if (st != TOFFEE_OK) {
        fprintf(stderr, "pairs: %s\n", toffee_last_error());
        /* The exit codes of `toffee pairs`: 2 fix the setup, 3 stopped (resumable), 1 a shard failed. */
        return st == TOFFEE_SETUP_ERROR ? 2 : st == TOFFEE_CANCELLED ? 3 : 1;
    }
    printf("%llu records, %llu kept, %llu shards\n", (unsigned long long)s.records, (unsigned long long)s.kept,
           (unsigned long long)s.shards_built);
    return 0;
}
