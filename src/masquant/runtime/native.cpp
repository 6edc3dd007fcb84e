// masquant's native integer kernel (masquant/native.py builds it on first use and calls masquant_layer).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
// The instruction set the dot products use: 2 = AVX-512 VNNI (dpbusd), 1 = AVX2 (16-bit products, vpmaddwd), 0 = plain
// C++ loops. MASQUANT_NO_VNNI and MASQUANT_PORTABLE force the lower ones (tests build all three where the CPU can).
#if !defined(MASQUANT_PORTABLE) && !defined(MASQUANT_NO_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__) \
    && defined(__AVX512VL__)
#define MASQUANT_ISA 2
#elif !defined(MASQUANT_PORTABLE) && defined(__AVX2__)
#define MASQUANT_ISA 1
#else
#define MASQUANT_ISA 0
#endif
#if MASQUANT_ISA
#include <immintrin.h>
#endif

// y[r] = ((float)(q[r] . w[o]) * t[r]) * ws[o] (+ bias[o]), with q[r] the per-token codes of x[r] / smooth[ids[r]]
// at scale t[r]. The codes are stored shifted by 128 as uint8 so that the dot products are unsigned x signed byte
// products (dpbusd), corrected by 128 * sum(w[o]) (wsum): exact int32 arithmetic on every path (sums that wrap
// around wrap back, as in two's complement).
//
// The weight is packed (pack in Python): blocks of 16 outputs, and in each block, for every 4 inputs, the 4 bytes
// of each of the 16 outputs: wp[block][k4][16][4], inputs padded to k4 * 4 and outputs to a multiple of 16 with
// zero weights. One dpbusd adds 4 products to each of 16 outputs of one row; a tile of up to ROWS rows x BLOCKS
// blocks keeps its sums in registers while its weights are read once.

// One modality's low-rank patch (MASQuant's compensation): y[r] += (x[r] . down) . up for the rows whose id names it,
// x the unsmoothed rows (the modality's smoothing vector is folded into down), down [k, rank], up [rank, n] float32.
struct Patch { const float* down; const float* up; int64_t rank; };

// A layer's arguments, bound once (Plan): the call passes one pointer to them. patches (or null) has one entry per
// row of the smoothing table (rank 0: no patch).
struct Layer {
  int64_t k; int64_t k4; const float* smooth; int64_t vectors; int64_t qmax; const int8_t* wp; const int32_t* wsum;
  int64_t n; const float* ws; int64_t ws_stride; const float* bias; double eps; const Patch* patches;
};

#if MASQUANT_ISA == 2
constexpr int ROWS = 4, BLOCKS = 4;  // 16 zmm sums
#elif MASQUANT_ISA == 1
constexpr int ROWS = 2, BLOCKS = 1;  // 8 ymm sums (4 per block and row)
#else
constexpr int ROWS = 1, BLOCKS = 1;
#endif
constexpr int LANES = 16;

extern "C" int masquant_isa() { return MASQUANT_ISA; }

// max |x[0:k]| (exact in any order; NaN propagates, as in torch's amax).
static float abs_max(const float* x, int64_t k) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // (8 running maxima: vectorisable)
  int nan = 0;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8)
    for (int i = 0; i < 8; ++i) {
      const float a = std::fabs(x[j + i]);
      nan |= a != a;
      part[i] = a > part[i] ? a : part[i];
    }
  for (; j < k; ++j) {
    const float a = std::fabs(x[j]);
    nan |= a != a;
    part[0] = a > part[0] ? a : part[0];
  }
  float amax = part[0];
  for (int i = 1; i < 8; ++i) amax = part[i] > amax ? part[i] : amax;
  return nan ? NAN : amax;
}

// Codes of one row (x / s when s is given) into codes[0:kp] (the padding is the code of 0), its scale into *t.
// The same float32 operations as the eager kernels, element by element: a division by the smoothing factor, the
// abs-max (exact in any order; NaN propagates), a division by the scale, rounding half to even and clamping.
static void quantize_row(const Layer* l, const float* x, const float* s, float* xs, uint8_t* codes, float* t) {
  const int64_t k = l->k;
  const float qmax = (float)l->qmax, lo = -qmax - 1.0f;
#if MASQUANT_ISA == 2
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 in = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(in, x + j);
    if (s) {
      v = _mm512_mask_div_ps(v, in, v, _mm512_maskz_loadu_ps(in, s + j));
      _mm512_mask_storeu_ps(xs + j, in, v);
    }
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  if (s) x = xs;
  float amax = nan ? NAN : _mm512_reduce_max_ps(vmax);
#else
  if (s) {  // each input divided by its smoothing factor, as rows / smooth
    for (int64_t j = 0; j < k; ++j) xs[j] = x[j] / s[j];
    x = xs;
  }
  const float amax = abs_max(x, k);
#endif
  float scale = (amax < (float)l->eps) ? (float)l->eps : amax;
  scale = scale / qmax;
#if MASQUANT_ISA == 2
  const __m512 vscale = _mm512_set1_ps(scale), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(qmax);
  const __m512i shift = _mm512_set1_epi32(128);
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 in = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(in, x + j), vscale),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));  // (operands in this order: a NaN passes, as in torch.clamp)
    _mm_mask_storeu_epi8(codes + j, in, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), shift)));
  }
#else
  for (int64_t j = 0; j < k; ++j) {
    float v = std::nearbyint(x[j] / scale);  // round half to even, as torch.round
    v = v < lo ? lo : (v > qmax ? qmax : v);
    if (v != v) v = 0.0f;  // NaN (an infinite row: inf / inf): code 0, as torch's conversion to int8 gives
    codes[j] = (uint8_t)((int32_t)v + 128);
  }
#endif
  for (int64_t j = k; j < 4 * l->k4; ++j) codes[j] = 128;
  *t = scale;
}

// acc[r][b * 16 + i]: the byte dot products of R rows of codes (stride kp) with B blocks of packed weights.
template <int R, int B>
static void tile(const uint8_t* codes, int64_t kp, const int8_t* wp, int64_t k4, int32_t (*acc)[BLOCKS * LANES]) {
#if MASQUANT_ISA == 2
  __m512i sum[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) sum[r][b] = _mm512_setzero_si512();
  for (int64_t j = 0; j < k4; ++j) {
    __m512i w[B];
    for (int b = 0; b < B; ++b) w[b] = _mm512_loadu_si512((const void*)(wp + (b * k4 + j) * 4 * LANES));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * kp + 4 * j, 4);
      const __m512i a = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) sum[r][b] = _mm512_dpbusd_epi32(sum[r][b], a, w[b]);
    }
  }
#pragma GCC unroll 4  // (unrolled, so that the sums stay in registers)
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) _mm512_storeu_si512((void*)(acc[r] + b * LANES), sum[r][b]);
#elif MASQUANT_ISA == 1
  // Codes and weights widened to 16 bits; vpmaddwd adds pairs of products exactly (|q * w| <= 255 * 128), so each
  // int32 lane holds half of an output's sum: quarter c of a block (outputs 4c .. 4c + 3) as pairs of lanes.
  __m256i sum[R][B][4];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) sum[r][b][c] = _mm256_setzero_si256();
  for (int64_t j = 0; j < k4; ++j) {
    __m256i w[B][4];
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c)
        w[b][c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + (b * k4 + j) * 4 * LANES + 16 * c)));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * kp + 4 * j, 4);
      const __m256i a = _mm256_cvtepu8_epi16(_mm_set1_epi32(four));  // q0 q1 q2 q3, four times, as int16
      for (int b = 0; b < B; ++b)
        for (int c = 0; c < 4; ++c) sum[r][b][c] = _mm256_add_epi32(sum[r][b][c], _mm256_madd_epi16(w[b][c], a));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) {
        uint32_t pairs[8];
        _mm256_storeu_si256((__m256i*)pairs, sum[r][b][c]);
        for (int i = 0; i < 4; ++i) acc[r][b * LANES + 4 * c + i] = (int32_t)(pairs[2 * i] + pairs[2 * i + 1]);
      }
#else
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < B * LANES; ++i) acc[r][i] = 0;
  for (int b = 0; b < B; ++b)
    for (int64_t j = 0; j < k4; ++j) {
      const int8_t* w = wp + (b * k4 + j) * 4 * LANES;
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = codes + r * kp + 4 * j;
        uint32_t* out = (uint32_t*)acc[r] + b * LANES;
        for (int i = 0; i < LANES; ++i)
          for (int c = 0; c < 4; ++c) out[i] += (uint32_t)((int32_t)q[c] * (int32_t)w[4 * i + c]);
      }
    }
#endif
}

// tile<R, nb> for nb <= B (only the block counts this instruction set uses are instantiated).
template <int R, int B = BLOCKS>
static void tile_blocks(int64_t nb, const uint8_t* codes, int64_t kp, const int8_t* wp, int64_t k4,
                        int32_t (*acc)[BLOCKS * LANES]) {
  if constexpr (B > 1) {
    if (nb < B) return tile_blocks<R, B - 1>(nb, codes, kp, wp, k4, acc);
  }
  tile<R, B>(codes, kp, wp, k4, acc);
}

// Rows r0 .. r0 + R of y for the outputs of blocks b0 .. b0 + nb.
template <int R>
static void rows_tile(const Layer* l, const uint8_t* codes, int64_t kp, const float* t, int64_t b0, int64_t nb,
                      float* y) {
  const int64_t n = l->n;
  const int8_t* wp = l->wp + b0 * l->k4 * 4 * LANES;
  int32_t acc[ROWS][BLOCKS * LANES];
  tile_blocks<R>(nb, codes, kp, wp, l->k4, acc);
  const int64_t o0 = b0 * LANES, o1 = (o0 + nb * LANES < n) ? o0 + nb * LANES : n;
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * n;
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t dot = (int32_t)((uint32_t)acc[r][o - o0] - 128u * (uint32_t)l->wsum[o]);
      const float v = ((float)dot * t[r]) * l->ws[o * l->ws_stride];
      yr[o] = l->bias ? v + l->bias[o] : v;
    }
  }
}

// rows_tile<left> for the last left < ROWS rows.
template <int R = ROWS - 1>
static void rows_left(int64_t left, const Layer* l, const uint8_t* codes, int64_t kp, const float* t, int64_t b0,
                      int64_t nb, float* y) {
  if constexpr (R > 1) {
    if (left < R) return rows_left<R - 1>(left, l, codes, kp, t, b0, nb, y);
  }
  if constexpr (R >= 1) rows_tile<R>(l, codes, kp, t, b0, nb, y);
}

// out[r][c] = (add ? out[r][c] : 0) + sum_j a[r][j] * b[j][c], for rows x w outputs, b [kk, w] row-major: each sum
// over j in ascending order from 0 (fused multiply-adds on AVX-512, a product then an addition elsewhere), so a patch
// gives the same values whatever the number of rows, and on every call.
#if MASQUANT_ISA == 2
template <int R, int C>
static void fgemm_tile(const float* a, int64_t lda, const float* b, int64_t kk, int64_t w, int64_t c0, float* out,
                       int64_t ldo, bool add) {
  __m512 acc[R][C];
  __mmask16 mask[C];
  for (int c = 0; c < C; ++c) {
    const int64_t left = w - c0 - 16 * c;
    mask[c] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    for (int r = 0; r < R; ++r) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < kk; ++j) {
    __m512 bv[C];
    for (int c = 0; c < C; ++c) bv[c] = _mm512_maskz_loadu_ps(mask[c], b + j * w + c0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + j]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4  // (unrolled, so that the sums stay in registers: not stored to the stack at every step)
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float* o = out + r * ldo + c0 + 16 * c;
      const __m512 v = add ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask[c], o), acc[r][c]) : acc[r][c];
      _mm512_mask_storeu_ps(o, mask[c], v);
    }
}

// fgemm_tile<R, chunks> for chunks <= C and R rows.
template <int R, int C = 4>
static void fgemm_chunks(int64_t chunks, const float* a, int64_t lda, const float* b, int64_t kk, int64_t w,
                         int64_t c0, float* out, int64_t ldo, bool add) {
  if constexpr (C > 1) {
    if (chunks < C) return fgemm_chunks<R, C - 1>(chunks, a, lda, b, kk, w, c0, out, ldo, add);
  }
  fgemm_tile<R, C>(a, lda, b, kk, w, c0, out, ldo, add);
}

// ... for rows <= R rows.
template <int R = 4>
static void fgemm_rows(int64_t rows, int64_t chunks, const float* a, int64_t lda, const float* b, int64_t kk,
                       int64_t w, int64_t c0, float* out, int64_t ldo, bool add) {
  if constexpr (R > 1) {
    if (rows < R) return fgemm_rows<R - 1>(rows, chunks, a, lda, b, kk, w, c0, out, ldo, add);
  }
  fgemm_chunks<R>(chunks, a, lda, b, kk, w, c0, out, ldo, add);
}

static void fgemm(const float* a, int64_t lda, int64_t rows, const float* b, int64_t kk, int64_t w, float* out,
                  int64_t ldo, bool add) {
  for (int64_t c0 = 0; c0 < w; c0 += 64) {  // 4 x 16 outputs, 4 rows at a time: 16 zmm sums
    const int64_t chunks = ((w - c0 < 64 ? w - c0 : 64) + 15) / 16;
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
      fgemm_rows(rows - r0 < 4 ? rows - r0 : 4, chunks, a + r0 * lda, lda, b, kk, w, c0, out + r0 * ldo, ldo, add);
  }
}
#else
static void fgemm(const float* a, int64_t lda, int64_t rows, const float* b, int64_t kk, int64_t w, float* out,
                  int64_t ldo, bool add) {
  for (int64_t c0 = 0; c0 < w; c0 += 64) {
    const int64_t cw = w - c0 < 64 ? w - c0 : 64;
    for (int64_t r = 0; r < rows; ++r) {
      float acc[64] = {0.0f};
      for (int64_t j = 0; j < kk; ++j) {
        const float av = a[r * lda + j];
        const float* bj = b + j * w + c0;
        for (int64_t c = 0; c < cw; ++c) acc[c] += av * bj[c];
      }
      float* o = out + r * ldo + c0;
      for (int64_t c = 0; c < cw; ++c) o[c] = add ? o[c] + acc[c] : acc[c];
    }
  }
}
#endif

// Asks for the factors of the patches these rows use to be brought into the cache (L2) while the integer products
// run: read after them, straight from memory, they took about as long as the products themselves.
static void prefetch_patches(const Layer* l, const int64_t* ids, int64_t m) {
  std::vector<char> used(l->vectors, 0);
  for (int64_t r = 0; r < m; ++r) used[ids[r]] = 1;
  for (int64_t v = 0; v < l->vectors; ++v) {
    const Patch& p = l->patches[v];
    if (!used[v] || p.rank <= 0) continue;
    for (const float* f : {p.down, p.up}) {
      const int64_t bytes = (f == p.down ? l->k : l->n) * p.rank * (int64_t)sizeof(float);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char*)f + off, 0, 2);
    }
  }
}

// Adds each run of consecutive rows' patch (the rows of one modality, in order) to y.
static void add_patches(const Layer* l, const float* x, const int64_t* ids, int64_t m, float* y) {
  std::vector<float> u;
  for (int64_t r = 0, e; r < m; r = e) {
    for (e = r + 1; e < m && ids[e] == ids[r];) ++e;
    const Patch& p = l->patches[ids[r]];
    if (p.rank <= 0) continue;
    u.resize((e - r) * p.rank);
    fgemm(x + r * l->k, l->k, e - r, p.down, l->k, p.rank, u.data(), p.rank, false);  // [rows, rank]
    fgemm(u.data(), p.rank, e - r, p.up, p.rank, l->n, y + r * l->n, l->n, true);
  }
}

// Weights from this many elements up share their output blocks among the threads (decoding large layers: the weight
// streams from memory, and one core's bandwidth is less than the machine's). native.THREADED_WEIGHT says the same.
constexpr int64_t PARALLEL_WEIGHT = 1 << 20;

// y = the rows' integer linear, plus each row's patch when ids are given and the layer has patches, on up to `threads`
// threads. Returns 0, or 1 when an id is not a row of the smoothing table (nothing is written then).
extern "C" int masquant_layer(const Layer* l, const float* x, const int64_t* ids, int64_t m, float* y, int threads) {
  const int64_t k = l->k, kp = 4 * l->k4, n = l->n;
  if (ids)
    for (int64_t r = 0; r < m; ++r)
      if (ids[r] < 0 || ids[r] >= l->vectors) return 1;
  if (ids && l->patches) prefetch_patches(l, ids, m);
  uint8_t* codes = new uint8_t[m * kp];
  float* t = new float[m];
  float* xs = l->smooth ? new float[k] : nullptr;
  for (int64_t r = 0; r < m; ++r)
    quantize_row(l, x + r * k, l->smooth ? l->smooth + (ids ? ids[r] : 0) * k : nullptr, xs, codes + r * kp, t + r);
  // Output tiles outside, rows inside: each tile's weights are read from memory once and reused from cache.
  const int64_t blocks = (n + LANES - 1) / LANES;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (threads > 1 && n * k >= PARALLEL_WEIGHT)
  for (int64_t b0 = 0; b0 < blocks; b0 += BLOCKS) {
    const int64_t nb = blocks - b0 < BLOCKS ? blocks - b0 : BLOCKS;
    int64_t r = 0;
    for (; r + ROWS <= m; r += ROWS) rows_tile<ROWS>(l, codes + r * kp, kp, t + r, b0, nb, y + r * n);
    if (r < m) rows_left(m - r, l, codes + r * kp, kp, t + r, b0, nb, y + r * n);
  }
  if (ids && l->patches) add_patches(l, x, ids, m, y);
  delete[] codes;
  delete[] t;
  delete[] xs;
  return 0;
}

// ---- Many rows where the CPU has no fast int8 GEMM (AVX2 without VNNI, where torch._int_mm runs plain loops) ----
// y[r][o] = ((float)(q[r] . w[o]) * t[r]) * ws[o] (+ bias[o]) from signed codes q [m, k] (kernels.quantize_tokens),
// the same float32 operations as kernels.int_linear. Codes widened to 16 bits, products by vpmaddwd: exact (each
// pair of products fits 32 bits), twice the multiply-adds per instruction of FP32 FMAs. Blocked as BLAS does: a
// tile of GM rows x GN outputs keeps its sums in 12 registers (written in assembly: compilers spilled them), KC
// inputs at a time so that the weights' panel stays in L1, MC rows at a time so that their codes stay in L2; the
// threads share the outputs. The weight is packed by native.pack_pairs: [n / 16][k2][16][2], each output's two
// codes of each pair of inputs side by side, zero-padded.
#if defined(__x86_64__) && defined(__AVX2__) && !defined(MASQUANT_PORTABLE)
#define MASQUANT_GEMM 1
#else
#define MASQUANT_GEMM 0
#endif
constexpr int GM = 6, GN = 16;
constexpr int64_t KC = 512, MC = 144, NP = 16;

extern "C" int masquant_gemm_isa() { return MASQUANT_GEMM; }

// c[r][0:16] = (first ? 0 : c[r][0:16]) + the sum over kk2 pairs j of a[r][2j, 2j + 1] . b[j][0:16] for the GM rows
// of a (lda int16 apart) and of c (ldc int32 apart); b is one panel. The sums stay in registers for the whole call.
static void gemm_tile(const int16_t* a, int64_t lda, const int8_t* b, int64_t kk2, int32_t* c, int64_t ldc,
                      bool first) {
#if MASQUANT_GEMM
  const int64_t s = lda * (int64_t)sizeof(int16_t), t = ldc * (int64_t)sizeof(int32_t);
  const int16_t* a3 = a + 3 * lda;
  int32_t* c3 = c + 3 * ldc;
  const int64_t start = first ? 1 : 0;
  asm volatile(
      "testq %[first], %[first]\n\t"
      "jz 2f\n\t"
      "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
      "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
      "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
      "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
      "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
      "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
      "jmp 3f\n\t"
      "2:\n\t"
      "vmovdqu (%[c]), %%ymm0\n\t"
      "vmovdqu 32(%[c]), %%ymm1\n\t"
      "vmovdqu (%[c],%[t],1), %%ymm2\n\t"
      "vmovdqu 32(%[c],%[t],1), %%ymm3\n\t"
      "vmovdqu (%[c],%[t],2), %%ymm4\n\t"
      "vmovdqu 32(%[c],%[t],2), %%ymm5\n\t"
      "vmovdqu (%[c3]), %%ymm6\n\t"
      "vmovdqu 32(%[c3]), %%ymm7\n\t"
      "vmovdqu (%[c3],%[t],1), %%ymm8\n\t"
      "vmovdqu 32(%[c3],%[t],1), %%ymm9\n\t"
      "vmovdqu (%[c3],%[t],2), %%ymm10\n\t"
      "vmovdqu 32(%[c3],%[t],2), %%ymm11\n\t"
      "3:\n\t"
      "vpmovsxbw (%[b]), %%ymm12\n\t"
      "vpmovsxbw 16(%[b]), %%ymm13\n\t"
      "vpbroadcastd (%[a]), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm0, %%ymm0\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm1, %%ymm1\n\t"
      "vpbroadcastd (%[a],%[s],1), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm2, %%ymm2\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm3, %%ymm3\n\t"
      "vpbroadcastd (%[a],%[s],2), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm4, %%ymm4\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm5, %%ymm5\n\t"
      "vpbroadcastd (%[a3]), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm6, %%ymm6\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm7, %%ymm7\n\t"
      "vpbroadcastd (%[a3],%[s],1), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm8, %%ymm8\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm9, %%ymm9\n\t"
      "vpbroadcastd (%[a3],%[s],2), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm10, %%ymm10\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm11, %%ymm11\n\t"
      "addq $32, %[b]\n\t"
      "addq $4, %[a]\n\t"
      "addq $4, %[a3]\n\t"
      "decq %[n]\n\t"
      "jnz 3b\n\t"
      "vmovdqu %%ymm0, (%[c])\n\t"
      "vmovdqu %%ymm1, 32(%[c])\n\t"
      "vmovdqu %%ymm2, (%[c],%[t],1)\n\t"
      "vmovdqu %%ymm3, 32(%[c],%[t],1)\n\t"
      "vmovdqu %%ymm4, (%[c],%[t],2)\n\t"
      "vmovdqu %%ymm5, 32(%[c],%[t],2)\n\t"
      "vmovdqu %%ymm6, (%[c3])\n\t"
      "vmovdqu %%ymm7, 32(%[c3])\n\t"
      "vmovdqu %%ymm8, (%[c3],%[t],1)\n\t"
      "vmovdqu %%ymm9, 32(%[c3],%[t],1)\n\t"
      "vmovdqu %%ymm10, (%[c3],%[t],2)\n\t"
      "vmovdqu %%ymm11, 32(%[c3],%[t],2)\n\t"
      "vzeroupper\n\t"
      : [a] "+r"(a), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(kk2)
      : [s] "r"(s), [t] "r"(t), [c] "r"(c), [c3] "r"(c3), [first] "r"(start)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#else
  for (int r = 0; r < GM; ++r)
    for (int i = 0; i < GN; ++i) {
      uint32_t sum = first ? 0u : (uint32_t)c[r * ldc + i];  // (wrapping, as the vector adds do)
      for (int64_t j = 0; j < kk2; ++j)
        sum += (uint32_t)((int32_t)a[r * lda + 2 * j] * b[j * 2 * GN + 2 * i]
                          + (int32_t)a[r * lda + 2 * j + 1] * b[j * 2 * GN + 2 * i + 1]);
      c[r * ldc + i] = (int32_t)sum;
    }
#endif
}

// Runs work(i) for i in [0, parts) on up to `threads` threads: OpenMP's, which in a PyTorch process are PyTorch's
// own (the runtime is loaded once), so no second pool competes with its spinning workers; else new threads.
template <class F>
static void parallel(int64_t parts, int threads, F work) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
  for (int64_t p = 0; p < parts; ++p) work(p);
#else
  const int64_t used = threads < 1 ? 1 : (threads > parts ? parts : threads);
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < used; ++i) pool.emplace_back([&work, i, used, parts] {
    for (int64_t p = parts * i / used; p < parts * (i + 1) / used; ++p) work(p);
  });
  for (int64_t p = 0; p < parts / used; ++p) work(p);
  for (auto& th : pool) th.join();
#endif
}

// Codes of one float32 row widened to int16 (a[0:k]) and its scale (*t): kernels.quantize_tokens's float32
// operations element by element (abs-max with NaN propagated, floor eps, division, rounding half to even, clamp;
// a NaN code is 0, as torch's conversion to int8 gives).
static void quantize_row16(const float* x, int64_t k, float qmax, float eps, int16_t* a, float* t) {
  const float amax = abs_max(x, k);
  const float scale = ((amax < eps) ? eps : amax) / qmax, lo = -qmax - 1.0f;
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(x[i] / scale);
    v = v < lo ? lo : (v > qmax ? qmax : v);
    a[i] = v != v ? 0 : (int16_t)v;
  }
  *t = scale;
}

extern "C" void masquant_gemm(const float* x, int64_t m, int64_t k, int64_t qmax, double eps, const int8_t* wp,
                              int64_t n, const float* ws, int64_t ws_stride, const float* bias, float* y,
                              int threads) {
  const int64_t k2 = (k + 1) / 2, lda = 2 * k2, tiles = (m + GM - 1) / GM, panels = (n + GN - 1) / GN;
  std::vector<int16_t> a(tiles * GM * lda, 0);  // the rows' codes, 16-bit, rows padded to whole tiles
  std::vector<float> t(m);
  parallel(tiles, threads, [&](int64_t i) {
    for (int64_t r = i * GM; r < m && r < (i + 1) * GM; ++r)
      quantize_row16(x + r * k, k, (float)qmax, (float)eps, a.data() + r * lda, t.data() + r);
  });
  const int64_t used = threads < 1 ? 1 : (threads > panels ? panels : threads);
  parallel(used, threads, [&](int64_t part) {
    const int64_t p0 = panels * part / used, p1 = panels * (part + 1) / used;
    std::vector<int32_t> c(MC * NP * GN);
    for (int64_t q0 = p0; q0 < p1; q0 += NP) {  // NP panels of outputs at a time: their sums stay in L2
      const int64_t q1 = q0 + NP < p1 ? q0 + NP : p1, cols = (q1 - q0) * GN;
      for (int64_t i0 = 0; i0 < tiles * GM; i0 += MC) {
        const int64_t i1 = i0 + MC < tiles * GM ? i0 + MC : tiles * GM;
        for (int64_t pc = 0; pc < k2; pc += KC / 2) {
          const int64_t kk2 = k2 - pc < KC / 2 ? k2 - pc : KC / 2;
          for (int64_t p = q0; p < q1; ++p)
            for (int64_t i = i0; i < i1; i += GM)
              gemm_tile(a.data() + i * lda + 2 * pc, lda, wp + (p * k2 + pc) * 2 * GN, kk2,
                        c.data() + (i - i0) * cols + (p - q0) * GN, cols, pc == 0);
        }
        const int64_t o1 = q1 * GN < n ? q1 * GN : n;
        for (int64_t r = i0; r < i1 && r < m; ++r)
          for (int64_t o = q0 * GN; o < o1; ++o) {
            const float v = ((float)c[(r - i0) * cols + o - q0 * GN] * t[r]) * ws[o * ws_stride];
            y[r * n + o] = bias ? v + bias[o] : v;
          }
      }
    }
  });
}
