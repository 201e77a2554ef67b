/* The castled linear-angular core on CPU, inference only: the two passes over memory around its
 * two matmuls (variants/ops/linear_angular_cpu.py builds this file and calls it).
 *
 *   prepare:  q^ = q / max(|q|, eps), k^ = k / max(|k|, eps) and a contiguous copy of v, one
 *             read of q, k and v (strided views of the qkv projection) per token and head;
 *   (torch:   G = k^^T v and P = q^ G, two batched matmuls)
 *   finish:   2y = v + (2/pi) P; out = 2y / max(|2y|, 2 eps) (or y without the normalisation)
 *             + sum_t w[h, t] v[n + t - K/2], written in (B, N, h, d) order so that merging the
 *             heads afterwards is a view.
 *
 * D (the head width) and K (the DWConv taps, 0 for none) are compile-time constants: the build
 * makes one library per pair, so each row is a fixed-length loop the compiler vectorises. Work is
 * split over (batch, head, block of 32 tokens) with OpenMP, on the caller's thread count. Rows are
 * reduced in float32 whatever the storage type; bfloat16 rounds to nearest even on store.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef D
#error "D (head width) must be defined"
#endif
#ifndef K
#error "K (DWConv taps, 0 for none) must be defined"
#endif

#define BLOCK 32

/* The two entry points, one signature each for every storage type and code path (the Python
 * side declares them once). */
#define PREPARE(SUFFIX, T)                                                                            \
void prepare_##SUFFIX(const T* q, const T* k, const T* v, int64_t B, int64_t H, int64_t N,           \
                      int64_t stride_b, int64_t stride_h, int64_t stride_n, float eps,               \
                      T* q_hat, T* k_hat, T* v_out, int threads)
#define FINISH(SUFFIX, T)                                                                             \
void finish_##SUFFIX(const T* v, const T* p, const float* taps, int64_t B, int64_t H, int64_t N,     \
                     float c, float eps2, int normalize, T* out, int threads)

/* The work split: task -> its (batch x head) index and token range [*start, *end), one block of
 * BLOCK tokens; tasks = B * H * blocks. */
static inline int64_t task_rows(int64_t task, int64_t blocks, int64_t N, int64_t* start, int64_t* end) {
    *start = (task % blocks) * BLOCK;
    *end = *start + BLOCK < N ? *start + BLOCK : N;
    return task / blocks;
}

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }

static inline float load_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t store_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)((bits >> 16) | 0x40u) : rounded;   /* NaN stays NaN */
}

#define DEFINE_KERNELS(SUFFIX, T, LOAD, STORE)                                                        \
PREPARE(SUFFIX, T) {                                                                                  \
    int64_t blocks = (N + BLOCK - 1) / BLOCK;                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
    for (int64_t task = 0; task < B * H * blocks; task++) {                                           \
        int64_t start, end, bh = task_rows(task, blocks, N, &start, &end), b = bh / H, h = bh % H;    \
        for (int64_t n = start; n < end; n++) {                                                       \
            int64_t in = b * stride_b + h * stride_h + n * stride_n, out = (bh * N + n) * D;          \
            float qf[D], kf[D], sq = 0.f, sk = 0.f;                                                   \
            for (int64_t j = 0; j < D; j++) { qf[j] = LOAD(q[in + j]); kf[j] = LOAD(k[in + j]); }     \
            _Pragma("omp simd reduction(+:sq, sk)")                                                   \
            for (int64_t j = 0; j < D; j++) { sq += qf[j] * qf[j]; sk += kf[j] * kf[j]; }             \
            float iq = 1.f / fmaxf(sqrtf(sq), eps), ik = 1.f / fmaxf(sqrtf(sk), eps);                 \
            for (int64_t j = 0; j < D; j++) {                                                         \
                q_hat[out + j] = STORE(qf[j] * iq);                                                   \
                k_hat[out + j] = STORE(kf[j] * ik);                                                   \
                v_out[out + j] = v[in + j];                                                           \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
FINISH(SUFFIX, T) {                                                                                   \
    int64_t blocks = (N + BLOCK - 1) / BLOCK;                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
    for (int64_t task = 0; task < B * H * blocks; task++) {                                           \
        int64_t start, end, bh = task_rows(task, blocks, N, &start, &end), b = bh / H, h = bh % H;    \
        for (int64_t n = start; n < end; n++) {                                                       \
            int64_t row = bh * N + n;                                                                 \
            float y[D], s = 0.f;                                                                      \
            for (int64_t j = 0; j < D; j++) y[j] = LOAD(v[row * D + j]) + c * LOAD(p[row * D + j]);   \
            _Pragma("omp simd reduction(+:s)")                                                        \
            for (int64_t j = 0; j < D; j++) s += y[j] * y[j];                                         \
            float scale = normalize ? 1.f / fmaxf(sqrtf(s), eps2) : 0.5f;                             \
            for (int64_t j = 0; j < D; j++) y[j] *= scale;                                            \
            for (int64_t t = 0; t < K; t++) {                 /* the DWConv, zero padded */           \
                int64_t m = n + t - K / 2;                                                            \
                if (m < 0 || m >= N) continue;                                                        \
                float w = taps[h * K + t];                                                            \
                const T* src = v + (bh * N + m) * D;                                                  \
                for (int64_t j = 0; j < D; j++) y[j] += w * LOAD(src[j]);                             \
            }                                                                                         \
            T* dst = out + ((b * N + n) * H + h) * D;                                                 \
            for (int64_t j = 0; j < D; j++) dst[j] = STORE(y[j]);                                     \
        }                                                                                             \
    }                                                                                                 \
}

#if defined(__AVX512F__) && D % 16 == 0
/* The same two passes in AVX-512, 16 floats a register, a row in D / 16 registers: what GCC makes
 * of the loops above spends most of a row on converting and reducing element by element. */
#include <immintrin.h>
#define LANES (D / 16)

static inline __m512 load16_float32(const float* x) { return _mm512_loadu_ps(x); }
static inline void store16_float32(float* x, __m512 y) { _mm512_storeu_ps(x, y); }
static inline __m512 load16_bfloat16(const uint16_t* x) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline void store16_bfloat16(uint16_t* x, __m512 y) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i*)x, (__m256i)_mm512_cvtneps_pbh(y));
#else   /* round to nearest even; NaN stays NaN */
    __m512i bits = _mm512_castps_si512(y);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i*)x, _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet)));
#endif
}

#define DEFINE_VECTOR_KERNELS(SUFFIX, T)                                                              \
PREPARE(SUFFIX, T) {                                                                                  \
    int64_t blocks = (N + BLOCK - 1) / BLOCK;                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
    for (int64_t task = 0; task < B * H * blocks; task++) {                                           \
        int64_t start, end, bh = task_rows(task, blocks, N, &start, &end), b = bh / H, h = bh % H;    \
        for (int64_t n = start; n < end; n++) {                                                       \
            int64_t in = b * stride_b + h * stride_h + n * stride_n, out = (bh * N + n) * D;          \
            __m512 qf[LANES], kf[LANES], sq = _mm512_setzero_ps(), sk = _mm512_setzero_ps();         \
            for (int i = 0; i < LANES; i++) {                                                         \
                qf[i] = load16_##SUFFIX(q + in + 16 * i);                                             \
                kf[i] = load16_##SUFFIX(k + in + 16 * i);                                             \
                sq = _mm512_fmadd_ps(qf[i], qf[i], sq);                                               \
                sk = _mm512_fmadd_ps(kf[i], kf[i], sk);                                               \
            }                                                                                         \
            __m512 iq = _mm512_set1_ps(1.f / fmaxf(sqrtf(_mm512_reduce_add_ps(sq)), eps));            \
            __m512 ik = _mm512_set1_ps(1.f / fmaxf(sqrtf(_mm512_reduce_add_ps(sk)), eps));            \
            for (int i = 0; i < LANES; i++) {                                                         \
                store16_##SUFFIX(q_hat + out + 16 * i, _mm512_mul_ps(qf[i], iq));                     \
                store16_##SUFFIX(k_hat + out + 16 * i, _mm512_mul_ps(kf[i], ik));                     \
            }                                                                                         \
            memcpy(v_out + out, v + in, D * sizeof(T));                                               \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
FINISH(SUFFIX, T) {                                                                                   \
    int64_t blocks = (N + BLOCK - 1) / BLOCK;                                                         \
    __m512 cv = _mm512_set1_ps(c);                                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
    for (int64_t task = 0; task < B * H * blocks; task++) {                                           \
        int64_t start, end, bh = task_rows(task, blocks, N, &start, &end), b = bh / H, h = bh % H;    \
        /* v's rows start - K/2 .. end + K/2 in float32, zero outside the sequence (the padding):  \
           each converted once, and the taps need no bounds test */                                   \
        __m512 window[BLOCK + (K > 0 ? K - 1 : 0)][LANES];                                             \
        for (int64_t m = start - K / 2; m < end + (K > 0 ? K - 1 - K / 2 : 0); m++) {                  \
            int64_t slot = m - start + K / 2;                                                         \
            for (int i = 0; i < LANES; i++)                                                           \
                window[slot][i] = (m < 0 || m >= N) ? _mm512_setzero_ps()                             \
                                                    : load16_##SUFFIX(v + (bh * N + m) * D + 16 * i); \
        }                                                                                             \
        __m512 w[K > 0 ? K : 1];                                                                      \
        for (int t = 0; t < K; t++) w[t] = _mm512_set1_ps(taps[h * K + t]);                           \
        for (int64_t n = start; n < end; n++) {                                                       \
            int64_t row = (bh * N + n) * D, slot = n - start;                                         \
            __m512 y[LANES], s = _mm512_setzero_ps();                                                 \
            for (int i = 0; i < LANES; i++) {                                                         \
                y[i] = _mm512_fmadd_ps(cv, load16_##SUFFIX(p + row + 16 * i), window[slot + K / 2][i]); \
                s = _mm512_fmadd_ps(y[i], y[i], s);                                                   \
            }                                                                                         \
            __m512 scale = _mm512_set1_ps(normalize ? 1.f / fmaxf(sqrtf(_mm512_reduce_add_ps(s)), eps2) : 0.5f); \
            for (int i = 0; i < LANES; i++) y[i] = _mm512_mul_ps(y[i], scale);                        \
            for (int t = 0; t < K; t++)                       /* the DWConv */                        \
                for (int i = 0; i < LANES; i++) y[i] = _mm512_fmadd_ps(w[t], window[slot + t][i], y[i]); \
            T* dst = out + ((b * N + n) * H + h) * D;                                                 \
            for (int i = 0; i < LANES; i++) store16_##SUFFIX(dst + 16 * i, y[i]);                     \
        }                                                                                             \
    }                                                                                                 \
}

DEFINE_VECTOR_KERNELS(float32, float)
DEFINE_VECTOR_KERNELS(bfloat16, uint16_t)
#else
DEFINE_KERNELS(float32, float, load_f32, store_f32)
DEFINE_KERNELS(bfloat16, uint16_t, load_bf16, store_bf16)
#endif
