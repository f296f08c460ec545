/* weightavg_stream_bytes: one memcpy whose stores bypass the cache (non-temporal), shared by the two
 * compiled helpers: the client's copies into its shared memory region (weightavg/_copy.c) and the
 * server's copies out of regions and streams (weightavg_server/domain/_native.c).
 *
 * Why: a cached store first reads the line it writes into the cache, so a copy moves three bytes of
 * memory traffic per byte; a streaming store writes the line whole, two. glibc's memcpy streams only
 * from its non-temporal threshold, three quarters of the L3 it is told of per thread: 99-114 MB on the
 * project's VMs, which report an L3 of 260-300 MiB, so a model's 16 MB tensors were copied with cached
 * stores (rep movsb): 256 MB took 42 ms on one core, against 25 ms streamed (docs/perf.md). */
#ifndef WEIGHTAVG_STREAM_BYTES_H
#define WEIGHTAVG_STREAM_BYTES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>

/* 64 bytes from src to dst (64-byte aligned) with streaming stores. */
static inline void weightavg_stream_line(char *dst, const char *src) {
    const __m128i a = _mm_loadu_si128((const __m128i *)src);
    const __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
    const __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
    const __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
    _mm_stream_si128((__m128i *)dst, a);
    _mm_stream_si128((__m128i *)(dst + 16), b);
    _mm_stream_si128((__m128i *)(dst + 32), c);
    _mm_stream_si128((__m128i *)(dst + 48), d);
}

#define WEIGHTAVG_STREAM_PAGE ((size_t)4096)
#define WEIGHTAVG_STREAM_PAGES 4

/* dst := src, n bytes; streaming stores from dst's first 64-byte boundary, memcpy for the ends. The
 * two ranges must not overlap. The bulk goes four 4 KiB pages at a time, a line from each in turn (as
 * glibc's own large copy does): four streams of reads and of writes in flight at once moved 256 MB in
 * 12.7-14.2 ms on two threads of the project's VM, against 16.7-18.2 ms a page after the other. */
static void weightavg_stream_bytes(char *dst, const char *src, size_t n) {
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    const size_t group = WEIGHTAVG_STREAM_PAGE * WEIGHTAVG_STREAM_PAGES;
    size_t i = 0;
    for (; i + group <= n; i += group) {
        for (size_t j = 0; j < WEIGHTAVG_STREAM_PAGE; j += 64) {
            for (size_t p = 0; p < WEIGHTAVG_STREAM_PAGES; p++) {
                const size_t at = i + p * WEIGHTAVG_STREAM_PAGE + j;
                __builtin_prefetch(src + at + 256);
                weightavg_stream_line(dst + at, src + at);
            }
        }
    }
    for (; i + 64 <= n; i += 64) weightavg_stream_line(dst + i, src + i);
    _mm_sfence(); /* the streamed lines are visible to every thread (and process) before the call returns */
    memcpy(dst + i, src + i, n - i);
}
#else
static void weightavg_stream_bytes(char *dst, const char *src, size_t n) { memcpy(dst, src, n); }
#endif

#endif
