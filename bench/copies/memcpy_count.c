/*
 * Counts the bytes a process copies with memcpy/memmove in copies of at least
 * MEMCPY_COUNT_MIN bytes (default 4096: body bytes, not small bookkeeping), for
 * scripts/bench.sh copies. Loaded with LD_PRELOAD; at exit appends one line
 * "<comm> <pid> <bytes> <copies>" to the file named by MEMCPY_COUNT_OUT.
 *
 * Only copies that go through the C library's exported memcpy/memmove are seen: Rust's
 * copy_from_slice and Vec growth of large buffers do; the kernel's socket copies and copies
 * the compiler inlines (small, fixed sizes) do not.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef void *(*copy_fn)(void *, const void *, size_t);

static copy_fn real_memcpy, real_memmove;
static _Atomic unsigned long long copied_bytes, copies;
/* Bytes and copies by size class (log2 of the size), for MEMCPY_COUNT_SIZES=1. */
static _Atomic unsigned long long class_bytes[64], class_copies[64];
static size_t min_size = 4096;

/* Used until dlsym has answered (dlsym itself may copy). */
static void *plain_copy(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        for (size_t i = 0; i < n; i++) d[i] = s[i];
    } else {
        for (size_t i = n; i > 0; i--) d[i - 1] = s[i - 1];
    }
    return dst;
}

static void count(size_t n) {
    if (n >= min_size) {
        atomic_fetch_add_explicit(&copied_bytes, n, memory_order_relaxed);
        atomic_fetch_add_explicit(&copies, 1, memory_order_relaxed);
        int class = 63 - __builtin_clzll((unsigned long long)n);
        atomic_fetch_add_explicit(&class_bytes[class], n, memory_order_relaxed);
        atomic_fetch_add_explicit(&class_copies[class], 1, memory_order_relaxed);
    }
}

__attribute__((constructor)) static void init(void) {
    const char *min = getenv("MEMCPY_COUNT_MIN");
    if (min) min_size = (size_t)strtoull(min, NULL, 10);
    real_memcpy = (copy_fn)dlsym(RTLD_NEXT, "memcpy");
    real_memmove = (copy_fn)dlsym(RTLD_NEXT, "memmove");
}

void *memcpy(void *dst, const void *src, size_t n) {
    count(n);
    return real_memcpy ? real_memcpy(dst, src, n) : plain_copy(dst, src, n);
}

void *memmove(void *dst, const void *src, size_t n) {
    count(n);
    return real_memmove ? real_memmove(dst, src, n) : plain_copy(dst, src, n);
}

__attribute__((destructor)) static void report(void) {
    const char *out = getenv("MEMCPY_COUNT_OUT");
    if (!out) return;
    FILE *f = fopen(out, "a");
    if (!f) return;
    char comm[64] = "?";
    FILE *c = fopen("/proc/self/comm", "r");
    if (c) {
        if (fgets(comm, sizeof comm, c)) comm[strcspn(comm, "\n")] = 0;
        fclose(c);
    }
    fprintf(f, "%s %d %llu %llu\n", comm, (int)getpid(),
            (unsigned long long)atomic_load(&copied_bytes),
            (unsigned long long)atomic_load(&copies));
    if (getenv("MEMCPY_COUNT_SIZES")) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load(&class_copies[i]))
                fprintf(f, "  %s sizes %llu-%llu: %llu copies, %llu bytes\n", comm, 1ULL << i,
                        (2ULL << i) - 1, (unsigned long long)atomic_load(&class_copies[i]),
                        (unsigned long long)atomic_load(&class_bytes[i]));
        }
    }
    fclose(f);
}
