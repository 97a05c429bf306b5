/* Batched 2-D block copies for host_copy (reshard/hostcopy.py builds, loads and feeds this).
 *
 * Why native code: on the CPU backend a weight sync is a layout transpose in host memory
 * (FSDP rows -> TP columns): hundreds of 2-D block copies whose contiguous runs are a few
 * hundred bytes to a few KB. numpy, and glibc's memcpy below its ~100 MB non-temporal
 * threshold, write them with ordinary stores, which first read every destination cache line
 * from DRAM (read-for-ownership): 1.5x the memory traffic of a large memcpy, which streams.
 * Measured on the 2-core dev box: contiguous copies in 1-64 MB pieces ran at 0.6x of one 410 MB
 * memcpy, numpy's strided block copies at 0.35x. Here the destination is written with
 * streaming (non-temporal) stores, one whole 64-byte line at a time, as glibc's large memcpy
 * does, so the transpose moves its bytes at memcpy speed.
 *
 * A block: `rows` rows of `row_bytes` bytes, `dst_stride` / `src_stride` bytes apart. The caller
 * checks every block against its buffers' bounds before calling.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

/* -DTANDEM_NO_SIMD builds the portable path (memcpy rows) on x86 too, to test it. */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TANDEM_NO_SIMD)
#include <immintrin.h>
#define TANDEM_X86 1
#endif

typedef struct {
  int64_t dst, src, rows, row_bytes, dst_stride, src_stride;
  int64_t lockstep; /* > 1 on a group's first block: this and the next lockstep-1 blocks advance
                       together, one row of each in turn (they share a strided buffer) */
  int64_t unused;
} tandem_block;

/* Whether a block's destination rows all start on a 64-byte line and span whole lines. */
static inline int whole_lines(const tandem_block *k) {
  return (((uint64_t)k->dst | (uint64_t)k->dst_stride | (uint64_t)k->row_bytes) & 63) == 0;
}

/* The block loop, for one way of copying a row (ROW) and one of copying whole lines (LINES). */
#define TANDEM_BLOCK_LOOP(NAME, ATTR, ROW, LINES)                                             \
  ATTR static void NAME(const tandem_block *blocks, int64_t n) {                             \
    for (int64_t b = 0; b < n;) {                                                            \
      int64_t g = blocks[b].lockstep > 1 ? blocks[b].lockstep : 1;                           \
      if (g > n - b) g = n - b;                                                              \
      int64_t rows = 0;                                                                      \
      int lines = 1;                                                                         \
      for (int64_t m = 0; m < g; m++) {                                                      \
        if (blocks[b + m].rows > rows) rows = blocks[b + m].rows;                            \
        lines &= whole_lines(&blocks[b + m]);                                                \
      }                                                                                      \
      if (g == 1) {                                                                          \
        const tandem_block *k = &blocks[b++];                                                \
        char *d = (char *)(uintptr_t)k->dst;                                                 \
        const char *s = (const char *)(uintptr_t)k->src;                                     \
        if (lines)                                                                           \
          for (int64_t r = 0; r < rows; r++, d += k->dst_stride, s += k->src_stride)        \
            LINES(d, s, k->row_bytes);                                                       \
        else                                                                                 \
          for (int64_t r = 0; r < rows; r++, d += k->dst_stride, s += k->src_stride)        \
            ROW(d, s, k->row_bytes);                                                         \
        continue;                                                                            \
      }                                                                                      \
      if (lines && g <= 8) { /* whole lines: walk each member's row pointers */             \
        char *dp[8];                                                                         \
        const char *sp[8];                                                                   \
        for (int64_t m = 0; m < g; m++) {                                                    \
          dp[m] = (char *)(uintptr_t)blocks[b + m].dst;                                      \
          sp[m] = (const char *)(uintptr_t)blocks[b + m].src;                                \
        }                                                                                    \
        for (int64_t r = 0; r < rows; r++)                                                   \
          for (int64_t m = 0; m < g; m++) {                                                  \
            const tandem_block *k = &blocks[b + m];                                          \
            if (r >= k->rows) continue;                                                      \
            LINES(dp[m], sp[m], k->row_bytes);                                               \
            dp[m] += k->dst_stride;                                                          \
            sp[m] += k->src_stride;                                                          \
          }                                                                                  \
        b += g;                                                                              \
        continue;                                                                            \
      }                                                                                      \
      for (int64_t r = 0; r < rows; r++)                                                     \
        for (int64_t m = 0; m < g; m++) {                                                    \
          const tandem_block *k = &blocks[b + m];                                            \
          if (r >= k->rows) continue;                                                        \
          char *d = (char *)(uintptr_t)k->dst + r * k->dst_stride;                           \
          const char *s = (const char *)(uintptr_t)k->src + r * k->src_stride;               \
          if (lines)                                                                         \
            LINES(d, s, k->row_bytes);                                                       \
          else                                                                               \
            ROW(d, s, k->row_bytes);                                                         \
        }                                                                                    \
      b += g;                                                                                \
    }                                                                                        \
  }

static inline void row_memcpy(char *d, const char *s, int64_t n) { memcpy(d, s, (size_t)n); }
TANDEM_BLOCK_LOOP(copy_plain, , row_memcpy, row_memcpy)

#ifdef TANDEM_X86
/* Streaming rows: LINES copies whole 64-byte lines in a bare loop; ROW handles any row, with
 * memcpy for a partial first or last line. */
#define TANDEM_STREAM_ROWS(LINES, ROW, TARGET, LINE)                                          \
  __attribute__((target(TARGET), always_inline)) static inline void LINES(                   \
      char *d, const char *s, int64_t n) {                                                   \
    for (int64_t i = 0; i < n; i += 64) LINE(d + i, s + i);                                  \
  }                                                                                          \
  __attribute__((target(TARGET), always_inline)) static inline void ROW(                     \
      char *d, const char *s, int64_t n) {                                                   \
    int64_t head = (int64_t)((-(uintptr_t)d) & 63);                                          \
    if (head > n) head = n;                                                                  \
    if (head) memcpy(d, s, (size_t)head);                                                    \
    const int64_t end = head + ((n - head) & ~(int64_t)63);                                  \
    for (int64_t i = head; i < end; i += 64) LINE(d + i, s + i);                             \
    if (n > end) memcpy(d + end, s + end, (size_t)(n - end));                                \
  }

#define LINE_AVX512(d, s) \
  _mm512_stream_si512((void *)(d), _mm512_loadu_si512((const void *)(s)))
#define LINE_AVX(d, s)                                                                  \
  do {                                                                                  \
    _mm256_stream_ps((float *)(d), _mm256_loadu_ps((const float *)(s)));                \
    _mm256_stream_ps((float *)((d) + 32), _mm256_loadu_ps((const float *)((s) + 32)));  \
  } while (0)
#define LINE_SSE2(d, s)                                                                       \
  do {                                                                                        \
    for (int q = 0; q < 64; q += 16)                                                          \
      _mm_stream_si128((__m128i *)((d) + q), _mm_loadu_si128((const __m128i *)((s) + q)));    \
  } while (0)

TANDEM_STREAM_ROWS(lines_avx512, row_avx512, "avx512f", LINE_AVX512)
TANDEM_STREAM_ROWS(lines_avx, row_avx, "avx", LINE_AVX)
TANDEM_STREAM_ROWS(lines_sse2, row_sse2, "sse2", LINE_SSE2)
TANDEM_BLOCK_LOOP(copy_avx512, __attribute__((target("avx512f"))), row_avx512, lines_avx512)
TANDEM_BLOCK_LOOP(copy_avx, __attribute__((target("avx"))), row_avx, lines_avx)
TANDEM_BLOCK_LOOP(copy_sse2, __attribute__((target("sse2"))), row_sse2, lines_sse2)
#endif

/* Which copier tandem_copy_blocks(..., streaming=1) uses: 3 avx512, 2 avx, 1 sse2,
 * 0 none (not x86: streaming requests fall back to memcpy). */
int tandem_stream_level(void) {
#ifdef TANDEM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 3;
  if (__builtin_cpu_supports("avx")) return 2;
  return 1;
#else
  return 0;
#endif
}

/* Copies n blocks. streaming != 0: whole destination lines with non-temporal stores, then a
 * store fence, so the bytes are visible to every thread once this returns. */
void tandem_copy_blocks(const tandem_block *blocks, int64_t n, int streaming) {
#ifdef TANDEM_X86
  if (streaming) {
    int level = tandem_stream_level();
    if (level == 3)
      copy_avx512(blocks, n);
    else if (level == 2)
      copy_avx(blocks, n);
    else
      copy_sse2(blocks, n);
    _mm_sfence();
    return;
  }
#else
  (void)streaming;
#endif
  copy_plain(blocks, n);
}

/* Waits until ready[s] != 0 and returns it. Spins briefly, then sleeps 20 us at a time, so a
 * waiting thread leaves the core to the caller. */
static int64_t wait_ready(const int64_t *ready, int64_t s) {
  int64_t flag;
  int spins = 0;
  while ((flag = __atomic_load_n(&ready[s], __ATOMIC_ACQUIRE)) == 0) {
    if (++spins < 200) {
#ifdef TANDEM_X86
      _mm_pause();
#endif
    } else {
      struct timespec ts = {0, 20000};
      nanosleep(&ts, 0);
    }
  }
  return flag;
}

/* Copies stage after stage, shared by every thread that calls it with the same arguments,
 * while the caller prepares the stages: stage s is chunks stage_chunks[s] .. stage_chunks[s+1]
 * - 1, chunk c is blocks[bounds[c] : bounds[c+1]], and a stage starts once ready[s] != 0 (the
 * caller filled in its source addresses and called tandem_publish); ready[s] < 0 cancels the
 * rest. Each thread takes the stage's next chunk from next[s] (an atomic counter) until none is
 * left, so a thread that joins late (the caller, once its bookkeeping is done) takes what is
 * left. Returns the number of stages this thread went through. */
int64_t tandem_copy_shared(const tandem_block *blocks, const int64_t *bounds,
                           const int64_t *stage_chunks, int64_t n_stages, const int64_t *ready,
                           int64_t *next, int streaming) {
  for (int64_t s = 0; s < n_stages; s++) {
    if (wait_ready(ready, s) < 0) return s;
    const int64_t lo = stage_chunks[s], hi = stage_chunks[s + 1];
    for (;;) {
      const int64_t c = lo + __atomic_fetch_add(&next[s], 1, __ATOMIC_RELAXED);
      if (c >= hi) break;
      tandem_copy_blocks(blocks + bounds[c], bounds[c + 1] - bounds[c], streaming);
    }
  }
  return n_stages;
}

/* Stores value into *flag after every earlier store of this thread (a release store). */
void tandem_publish(int64_t *flag, int64_t value) {
  __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}
