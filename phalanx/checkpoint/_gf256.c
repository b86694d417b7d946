/* GF(2^8) multiply-accumulate kernels for phalanx's Reed-Solomon codec (phalanx/checkpoint/erasure.py).
 *
 * Field: polynomial 0x11D, the same as the Python tables in gf256.py. Built on first use by gf256.py
 * with the system C compiler (cc -O3 -shared -fPIC) and called through ctypes on tensor.data_ptr().
 *
 * One primitive: gf256_dot(outs, m, srcs, k, coefs, n, accumulate): for each output r,
 *     outs[r] (^)= XOR_j coefs[r*k + j] * srcs[j]            (bytewise, n bytes)
 * It walks the sources in chunks so that a chunk of every source stays in L1/L2 while all m outputs
 * are computed from it: each source byte comes from memory once per call, each output byte is
 * written once. mul_xor (dst ^= c * src) is the m = k = 1 case; xor is c = 1.
 *
 * Kernels, picked at load time with __builtin_cpu_supports (gf256_set_level can force a lower one):
 *   3  AVX-512BW + GFNI: multiplying by c is GF(2)-linear, so it is one gf2p8affineqb with c's 8x8
 *      bit matrix (the affine form works for any field polynomial; gf2p8mulb is fixed to 0x11B).
 *   2  AVX2 + GFNI (VEX): the same on 32-byte vectors.
 *   1  AVX2 split-nibble PSHUFB (Plank, Greenan, Miller, "Screaming fast Galois field arithmetic
 *      using Intel SIMD instructions", FAST 2013; ISA-L's gf_vect_dot_prod): c*x = lo[x & 15] ^ hi[x >> 4].
 *   0  portable C: a 256-byte row of the multiplication table per coefficient.
 * With m = 1 the output may be one of the sources (each position is read before it is written);
 * otherwise outputs and sources must not overlap.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__clang__) || __GNUC__ >= 9)
#define GF_X86 1
#include <immintrin.h>
#else
#define GF_X86 0
#endif

#define GF_POLY 0x11D
#define GF_MAXK 256
/* Bytes of each source per pass: k = 8 sources of 64 KiB sit in a 1 MiB L2, so every output of a chunk reads
   them from cache; one unchunked pass per output would read each source from memory m times. */
#define GF_CHUNK 65536

static uint8_t mul_tab[256][256];                         /* mul_tab[c][x] = c * x */
static uint8_t nib_tab[256][2][32] __attribute__((aligned(32))); /* c * x, c * (x << 4), x < 16; twice */
static uint64_t aff_tab[256];                             /* gf2p8affineqb matrix of x -> c * x */
static int level = -1, best = -1;

static uint8_t gf_mul_slow(uint8_t a, uint8_t b) {
    unsigned r = 0, x = a;
    for (; b; b >>= 1) {
        if (b & 1) r ^= x;
        x <<= 1;
        if (x & 0x100) x ^= GF_POLY;
    }
    return (uint8_t)r;
}

/* ------------------------------------------------------------------ portable */

static void dot_scalar(uint8_t *out, const uint8_t *const *src, const uint8_t *coef, int k, size_t len,
                       int acc) {
    const uint8_t *row[GF_MAXK];
    for (int j = 0; j < k; j++) row[j] = mul_tab[coef[j]];
    for (size_t i = 0; i < len; i++) { /* byte by byte, so out may be one of the sources */
        uint8_t v = acc ? out[i] : 0;
        for (int j = 0; j < k; j++) v ^= row[j][src[j][i]];
        out[i] = v;
    }
}

#if GF_X86
/* ------------------------------------------------------------------ AVX2 split-nibble */

__attribute__((target("avx2"))) static void dot_avx2(uint8_t *out, const uint8_t *const *src, const uint8_t *coef,
                                                     int k, size_t len, int acc) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        for (int j = 0; j < k; j++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(src[j] + i));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(src[j] + i + 32));
            if (coef[j] == 1) {
                a0 = _mm256_xor_si256(a0, x0);
                a1 = _mm256_xor_si256(a1, x1);
                continue;
            }
            __m256i lo = _mm256_load_si256((const __m256i *)nib_tab[coef[j]][0]);
            __m256i hi = _mm256_load_si256((const __m256i *)nib_tab[coef[j]][1]);
            __m256i l0 = _mm256_and_si256(x0, low), h0 = _mm256_and_si256(_mm256_srli_epi16(x0, 4), low);
            __m256i l1 = _mm256_and_si256(x1, low), h1 = _mm256_and_si256(_mm256_srli_epi16(x1, 4), low);
            a0 = _mm256_xor_si256(a0, _mm256_xor_si256(_mm256_shuffle_epi8(lo, l0), _mm256_shuffle_epi8(hi, h0)));
            a1 = _mm256_xor_si256(a1, _mm256_xor_si256(_mm256_shuffle_epi8(lo, l1), _mm256_shuffle_epi8(hi, h1)));
        }
        if (acc) {
            a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(out + i)));
            a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(out + i + 32)));
        }
        _mm256_storeu_si256((__m256i *)(out + i), a0);
        _mm256_storeu_si256((__m256i *)(out + i + 32), a1);
    }
    if (i < len) {
        const uint8_t *tail[GF_MAXK];
        for (int j = 0; j < k; j++) tail[j] = src[j] + i;
        dot_scalar(out + i, tail, coef, k, len - i, acc);
    }
}

/* ------------------------------------------------------------------ GFNI */

__attribute__((target("avx2,gfni"))) static void dot_gfni256(uint8_t *out, const uint8_t *const *src,
                                                             const uint8_t *coef, int k, size_t len, int acc) {
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        for (int j = 0; j < k; j++) {
            __m256i A = _mm256_set1_epi64x((long long)aff_tab[coef[j]]);
            a0 = _mm256_xor_si256(a0, _mm256_gf2p8affine_epi64_epi8(
                                          _mm256_loadu_si256((const __m256i *)(src[j] + i)), A, 0));
            a1 = _mm256_xor_si256(a1, _mm256_gf2p8affine_epi64_epi8(
                                          _mm256_loadu_si256((const __m256i *)(src[j] + i + 32)), A, 0));
        }
        if (acc) {
            a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(out + i)));
            a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(out + i + 32)));
        }
        _mm256_storeu_si256((__m256i *)(out + i), a0);
        _mm256_storeu_si256((__m256i *)(out + i + 32), a1);
    }
    if (i < len) {
        const uint8_t *tail[GF_MAXK];
        for (int j = 0; j < k; j++) tail[j] = src[j] + i;
        dot_scalar(out + i, tail, coef, k, len - i, acc);
    }
}

__attribute__((target("avx512f,avx512bw,gfni"))) static void dot_gfni512(uint8_t *out, const uint8_t *const *src,
                                                                         const uint8_t *coef, int k, size_t len,
                                                                         int acc) {
    size_t i = 0;
    for (; i + 128 <= len; i += 128) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (int j = 0; j < k; j++) {
            __m512i A = _mm512_set1_epi64((long long)aff_tab[coef[j]]);
            a0 = _mm512_xor_si512(a0, _mm512_gf2p8affine_epi64_epi8(_mm512_loadu_si512(src[j] + i), A, 0));
            a1 = _mm512_xor_si512(a1, _mm512_gf2p8affine_epi64_epi8(_mm512_loadu_si512(src[j] + i + 64), A, 0));
        }
        if (acc) {
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(out + i));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(out + i + 64));
        }
        _mm512_storeu_si512(out + i, a0);
        _mm512_storeu_si512(out + i + 64, a1);
    }
    for (; i < len; i += 64) { /* the tail, masked: no scalar loop */
        __mmask64 mask = len - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (len - i)) - 1);
        __m512i a = acc ? _mm512_maskz_loadu_epi8(mask, out + i) : _mm512_setzero_si512();
        for (int j = 0; j < k; j++) {
            __m512i A = _mm512_set1_epi64((long long)aff_tab[coef[j]]);
            a = _mm512_xor_si512(a, _mm512_gf2p8affine_epi64_epi8(_mm512_maskz_loadu_epi8(mask, src[j] + i), A, 0));
        }
        _mm512_mask_storeu_epi8(out + i, mask, a);
    }
}
#endif

/* ------------------------------------------------------------------ dispatch */

typedef void (*dot_fn)(uint8_t *, const uint8_t *const *, const uint8_t *, int, size_t, int);

static dot_fn kernel(int lvl) {
#if GF_X86
    if (lvl == 3) return dot_gfni512;
    if (lvl == 2) return dot_gfni256;
    if (lvl == 1) return dot_avx2;
#endif
    return dot_scalar;
}

/* Builds the tables and picks the fastest kernel this CPU runs; returns its level. */
int gf256_init(void) {
    for (int c = 0; c < 256; c++) {
        for (int x = 0; x < 256; x++) mul_tab[c][x] = gf_mul_slow((uint8_t)c, (uint8_t)x);
        for (int x = 0; x < 16; x++) {
            nib_tab[c][0][x] = nib_tab[c][0][x + 16] = mul_tab[c][x];
            nib_tab[c][1][x] = nib_tab[c][1][x + 16] = mul_tab[c][x << 4];
        }
        /* gf2p8affineqb: bit i of the result is parity(matrix byte 7 - i AND x). Row i has bit b set
           when bit i of c * 2^b is set. */
        uint64_t m = 0;
        for (int i = 0; i < 8; i++) {
            uint64_t row = 0;
            for (int b = 0; b < 8; b++) row |= (uint64_t)((mul_tab[c][1 << b] >> i) & 1) << b;
            m |= row << (8 * (7 - i));
        }
        aff_tab[c] = m;
    }
    best = 0;
#if GF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best = 1;
    if (best == 1 && __builtin_cpu_supports("gfni")) best = 2;
    if (best == 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = 3;
#endif
    level = best;
    return best;
}

/* Forces a kernel (for tests and benchmarks); a level above what the CPU runs is clamped. */
int gf256_set_level(int lvl) {
    level = lvl < 0 ? 0 : (lvl > best ? best : lvl);
    return level;
}

int gf256_level(void) { return level; }

/* Asks Linux for transparent huge pages under the 2 MiB-aligned part of [p, p + n) before it is first written.
   Fresh output blocks otherwise cost one page fault per 4 KiB, which can cost more than the encode itself
   (benchmarks/erasure.py, "reused out"). A no-op elsewhere. */
void gf256_advise_huge(void *p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1), end = ((uintptr_t)p + n) & ~(huge - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* outs[r] (^)= XOR_j coefs[r * k + j] * srcs[j] over n bytes, r < m, j < k; accumulate = 0 overwrites. */
void gf256_dot(uint8_t *const *outs, int m, const uint8_t *const *srcs, int k, const uint8_t *coefs, size_t n,
               int accumulate) {
    dot_fn f = kernel(level);
    const uint8_t *src[GF_MAXK];
    uint8_t coef[GF_MAXK];
    for (size_t off = 0; off < n; off += GF_CHUNK) {
        size_t len = n - off < GF_CHUNK ? n - off : GF_CHUNK;
        for (int r = 0; r < m; r++) {
            int kk = 0; /* zero coefficients contribute nothing: drop them */
            for (int j = 0; j < k; j++)
                if (coefs[r * k + j]) {
                    src[kk] = srcs[j] + off;
                    coef[kk++] = coefs[r * k + j];
                }
            f(outs[r] + off, src, coef, kk, len, accumulate);
        }
    }
}
