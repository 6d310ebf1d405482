/* Paged attention on the CPU, float32: each query token attends to its sequence's context,
 * read in place from the KV block pool through the block table (no gathered copy).
 *
 * The batch is flat: sequence s owns query rows [query_start[s], query_start[s+1]), the last
 * tokens of its context of seq_lens[s] tokens (causal, with an optional sliding window).
 * Work is split into (sequence, tile of query tokens) items shared out by OpenMP; an item
 * streams its context once, a KV block at a time, for all its query heads (each block's keys
 * and values are one contiguous run of memory), with an online softmax. Sequences that share
 * prefix blocks are best passed next to each other in `seqs`: those blocks are then still in
 * cache when the next one reads them. The next block is prefetched while one is computed:
 * blocks lie anywhere in the pool, where the hardware prefetcher cannot follow. Dot products,
 * the exponentials (fast_math.h) and the weighted sums of values all run over contiguous
 * float32 rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"

#define QUERY_TILE 16 /* query tokens per work item */
/* From this many query tokens in a tile, each block's keys are transposed into scratch once
 * and every row's scores for the block come from head_dim vector multiply-adds across its
 * keys, instead of one dot product (and one horizontal sum) per key. */
#define TRANSPOSE_MIN_QUERIES 4

typedef struct {
    int64_t q_stride_t, q_stride_h, out_stride_t, out_stride_h;
    int64_t group, num_kv_heads, head_dim, block_size, window;
    float scale;
} Shape;

static void attend_tile(
    const Shape *sh, const float *q, const float *k_cache, const float *v_cache,
    const int64_t *table, int64_t first_q, int64_t num_q, int64_t first_pos,
    int64_t context_len, float *out, float *scratch)
{
    const int64_t group = sh->group, head_dim = sh->head_dim, bs = sh->block_size;
    const int64_t heads = group * sh->num_kv_heads;
    const int64_t rows = num_q * heads, window = sh->window;
    float *m = scratch, *l = m + rows, *acc = l + rows;
    float *qs = acc + rows * head_dim; /* [rows, head_dim] the scaled queries */
    float *scores = qs + rows * head_dim; /* [bs] */
    float *kt = scores + bs; /* [num_kv_heads, head_dim, bs] a block's keys, transposed */
    const int transposed = num_q >= TRANSPOSE_MIN_QUERIES;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = r / heads, h = r % heads;
        const float *src = q + (first_q + i) * sh->q_stride_t + h * sh->q_stride_h;
        for (int64_t d = 0; d < head_dim; d++) qs[r * head_dim + d] = src[d] * sh->scale;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * rows * head_dim);
    const int64_t token_stride = sh->num_kv_heads * head_dim;
    const int64_t last_pos = first_pos + num_q - 1; /* the tile sees keys up to here */
    int64_t lo = 0;
    if (window > 0) { lo = first_pos - window + 1; if (lo < 0) lo = 0; }
    for (int64_t start = lo - lo % bs; start <= last_pos; start += bs) {
        const int64_t block = table[start / bs];
        const float *k_block = k_cache + (block * bs) * token_stride;
        const float *v_block = v_cache + (block * bs) * token_stride;
        int64_t count = context_len - start;
        if (count > bs) count = bs;
        if (start + bs <= last_pos) { /* the next block: fetch it while this one is computed */
            const int64_t next = table[start / bs + 1];
            const char *nk = (const char *)(k_cache + (next * bs) * token_stride);
            const char *nv = (const char *)(v_cache + (next * bs) * token_stride);
            const int64_t bytes = bs * token_stride * (int64_t)sizeof(float);
            for (int64_t b = 0; b < bytes; b += 64) {
                __builtin_prefetch(nk + b, 0, 3);
                __builtin_prefetch(nv + b, 0, 3);
            }
        }
        if (transposed && bs == 16) {
            for (int64_t j = 0; j < count; j++)
                for (int64_t c = 0; c < token_stride; c++)
                    kt[c * bs + j] = k_block[j * token_stride + c];
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t pos = first_pos + r / heads;
            const int64_t kv_off = (r % heads) / group * head_dim;
            const float *kb = k_block + kv_off, *vb = v_block + kv_off;
            int64_t j_lo = 0, j_hi = pos - start + 1; /* keys [j_lo, j_hi) are visible */
            if (j_hi > count) j_hi = count;
            if (window > 0 && pos - window + 1 > start) j_lo = pos - window + 1 - start;
            if (j_hi <= j_lo) continue;
            const float *qr = qs + r * head_dim;
            if (transposed && bs == 16) { /* all 16 slots; those past the context go unread */
                const float *kth = kt + kv_off * 16;
                float s16[16] = {0};
                for (int64_t d = 0; d < head_dim; d++) {
                    const float qd = qr[d];
                    const float *kd = kth + d * 16;
#pragma omp simd
                    for (int j = 0; j < 16; j++) s16[j] += qd * kd[j];
                }
                for (int j = 0; j < 16; j++) scores[j] = s16[j];
            } else {
                for (int64_t j = j_lo; j < j_hi; j++) {
                    const float *kj = kb + j * token_stride;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; d++) dot += qr[d] * kj[d];
                    scores[j] = dot;
                }
            }
            float block_max = -INFINITY;
            for (int64_t j = j_lo; j < j_hi; j++)
                block_max = scores[j] > block_max ? scores[j] : block_max;
            const float m_new = block_max > m[r] ? block_max : m[r];
            const float rescale = manta_exp(m[r] - m_new);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = j_lo; j < j_hi; j++) {
                scores[j] = manta_exp(scores[j] - m_new);
                sum += scores[j];
            }
            float *a = acc + r * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) a[d] *= rescale;
            for (int64_t j = j_lo; j < j_hi; j++) {
                const float p = scores[j];
                const float *vv = vb + j * token_stride;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * vv[d];
            }
            l[r] = l[r] * rescale + sum;
            m[r] = m_new;
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = r / heads, h = r % heads;
        float *o = out + (first_q + i) * sh->out_stride_t + h * sh->out_stride_h;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) o[d] = acc[r * head_dim + d] * inv;
    }
}

/* Returns 0, or -1 if scratch memory could not be allocated. `seqs` lists which of the
 * batch's sequences to compute (the others are left to another path); `num_threads` is
 * torch's intra-op thread count, which OpenMP does not see from every calling thread. */
int manta_paged_attention_f32(
    const float *q, int64_t q_stride_t, int64_t q_stride_h,
    const float *k_cache, const float *v_cache,
    const int64_t *block_tables, int64_t table_stride,
    const int64_t *query_start, const int64_t *seq_lens,
    const int64_t *seqs, int64_t num_seqs,
    float *out, int64_t out_stride_t, int64_t out_stride_h,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int64_t window, int64_t num_threads)
{
    const Shape sh = {q_stride_t, q_stride_h, out_stride_t, out_stride_h,
                      num_heads / num_kv_heads, num_kv_heads, head_dim, block_size,
                      window, scale};
    int64_t *tile_start = malloc(sizeof(int64_t) * (num_seqs + 1));
    if (tile_start == NULL) return -1;
    tile_start[0] = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t s = seqs[i];
        const int64_t num_q = query_start[s + 1] - query_start[s];
        tile_start[i + 1] = tile_start[i] + (num_q + QUERY_TILE - 1) / QUERY_TILE;
    }
    const int64_t num_items = tile_start[num_seqs];
    const int64_t rows = QUERY_TILE * num_heads;
    const size_t scratch_floats =
        rows * (2 + 2 * head_dim) + block_size + num_kv_heads * head_dim * block_size;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scratch = calloc(scratch_floats, sizeof(float)); /* no garbage ever read */
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_items; item++) {
            if (scratch == NULL) continue;
            const int64_t tile = item;
            int64_t i = 0; /* the sequence holding this tile (tiles are few: linear is fine) */
            while (tile_start[i + 1] <= tile) i++;
            const int64_t s = seqs[i];
            const int64_t first_q = query_start[s] + (tile - tile_start[i]) * QUERY_TILE;
            int64_t num_q = query_start[s + 1] - first_q;
            if (num_q > QUERY_TILE) num_q = QUERY_TILE;
            const int64_t len = seq_lens[s];
            const int64_t first_pos = len - (query_start[s + 1] - first_q);
            attend_tile(&sh, q, k_cache, v_cache, block_tables + s * table_stride, first_q,
                        num_q, first_pos, len, out, scratch);
        }
        free(scratch);
    }
    free(tile_start);
    return failed ? -1 : 0;
}
