// Fused CPU kernels for the fast inference path (float32, channels-last maps).
//
// A map is a 2-D (pixels, channels) matrix: pixel p = (image * H + y) * W + x, its channels contiguous,
// consecutive pixels `ld` floats apart (ld >= channels, so a column slice of a wider matrix is a valid map).
// Each kernel replaces a chain of eager PyTorch ops that would each read and write the whole map: a 3x3
// depthwise conv with its bias, residual and activation is one pass instead of four. Parallel over output
// rows with ATen's thread pool (the same OpenMP runtime and thread count as PyTorch itself), vectorised over
// channels with ATen's Vectorized<float> (AVX-512 and AVX2: own GELU and exp, at least as accurate as
// PyTorch's; elsewhere ATen's). A 1x1 conv that feeds a depthwise conv can run inside it (pw_dwconv).
// With AVX-512 or AVX2, 1x1 convs use a register-blocked GEMM of our own (`gemm_rows`) and stride-1 depthwise
// convs a sweep with the taps in registers (`dw_sweep`), both written once over the native vector (`Simd`);
// builds for neither take BLAS's sgemm and the generic loops. Reductions over pixels are summed in an order
// fixed by the layout, never by the threads: the output is the same bits on every run and thread count.
// Built on first use by upscale/models/kernels/__init__.py. AGDN's ops have eager equivalents in
// upscale/models/agdn/fast.py (the fast path without kernels); ESC's window attention and symmetric large-kernel
// conv and ASID's token attention are written for AVX-512/AVX2 only (the build's floor) and checked against their
// PyTorch statements; tests/models/test_kernels.py compares each op.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstring>
#include <string>
#include <type_traits>
#include <cmath>
#include <vector>

namespace {

// helpers of the inner loops must inline: an accumulator array passed to a call that stays a call lives in
// memory, and every FMA becomes load + FMA + store (measured: 5x slower depthwise convs)
#define ALWAYS_INLINE inline __attribute__((always_inline))

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxChannels = 1024;

// kGeluRes (mode 0, with a residual): out = GELU(conv + bias) + residual (ESC's ConvFFN), where kGelu is
// GELU(conv + bias + residual)
enum Act : int64_t { kNone = 0, kGelu = 1, kGeluRes = 2 };

// The native vector of the build for the register-blocked kernels written once for both ISAs: its width, the
// most column vectors a GEMM tile of 4 pixels keeps in registers (32 registers with AVX-512: 4 x 6 sums and 6
// weight vectors; 16 with AVX2: 4 x 3 and 3), and the few operations they use. A mask selects the first lanes.
#if defined(CPU_CAPABILITY_AVX512)
struct Simd {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kW = 16, kMaxNV = 6;
  static ALWAYS_INLINE V zero() { return _mm512_setzero_ps(); }
  static ALWAYS_INLINE V set1(float a) { return _mm512_set1_ps(a); }
  static ALWAYS_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static ALWAYS_INLINE V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static ALWAYS_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static ALWAYS_INLINE void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static ALWAYS_INLINE V load_aligned(const float* p) { return _mm512_load_ps(p); }
  static ALWAYS_INLINE void store_aligned(float* p, V v) { _mm512_store_ps(p, v); }
  static ALWAYS_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static ALWAYS_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static ALWAYS_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static ALWAYS_INLINE V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static ALWAYS_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static ALWAYS_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static ALWAYS_INLINE float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static ALWAYS_INLINE float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static ALWAYS_INLINE V clamp(V x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, set1(lo)), set1(hi)); }
  static ALWAYS_INLINE V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static ALWAYS_INLINE V times_pow2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
  // 1 / d for d >= 1: 14-bit estimate and one Newton step (relative error ~1e-8)
  static ALWAYS_INLINE V recip(V d) {
    const V r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, set1(2.0f)));
  }
  static ALWAYS_INLINE M mask(int64_t n) { return n >= 16 ? M(0xFFFF) : M((1u << n) - 1); }
  // lane j: lo[2j] + lo[2j + 1] for j < 8, then the same of hi
  static ALWAYS_INLINE V pair_sums(V lo, V hi) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct Simd {
  using V = __m256;
  using M = __m256i;  // all ones in the lanes to load or store
  static constexpr int kW = 8, kMaxNV = 3;
  static ALWAYS_INLINE V zero() { return _mm256_setzero_ps(); }
  static ALWAYS_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  static ALWAYS_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static ALWAYS_INLINE V load(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static ALWAYS_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static ALWAYS_INLINE void store(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static ALWAYS_INLINE V load_aligned(const float* p) { return _mm256_load_ps(p); }
  static ALWAYS_INLINE void store_aligned(float* p, V v) { _mm256_store_ps(p, v); }
  static ALWAYS_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static ALWAYS_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static ALWAYS_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static ALWAYS_INLINE V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static ALWAYS_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static ALWAYS_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static ALWAYS_INLINE float hmax(V a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static ALWAYS_INLINE float hsum(V a) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
  }
  static ALWAYS_INLINE V clamp(V x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, set1(lo)), set1(hi)); }
  static ALWAYS_INLINE V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n, n integral and within the exponent range of normal floats: n goes into the exponent bits
  static ALWAYS_INLINE V times_pow2(V p, V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static ALWAYS_INLINE V recip(V d) { return _mm256_div_ps(set1(1.0f), d); }
  // lane j: lo[2j] + lo[2j + 1] for j < 4, then the same of hi (the in-lane shuffles leave the 64-bit
  // quarters in the order lo01 hi01 lo23 hi23; one cross-lane permute puts them right)
  static ALWAYS_INLINE V pair_sums(V lo, V hi) {
    const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(lo, hi, 0x88), _mm256_shuffle_ps(lo, hi, 0xDD));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sums), 0xD8));
  }
  static ALWAYS_INLINE M mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};
#endif


// GELU(x) = x * Phi(x), Phi the normal CDF, from the tail Q(t) = Phi(-t) at t = |x|: GELU(x) = x * Q(|x|) for
// x < 0 and x - x * Q(x) for x >= 0 (no cancellation on either side, Q being the small quantity). Q is a
// degree-5 polynomial in (t - k * 0.375) on the 16 intervals centred at k * 0.375, looked up by a one-table
// permute (vpermps reads the index from the low bits of t / 0.375 + 1.5 * 2^23, which also rounds it to k),
// and 0 from 5.8125 on (Q = 3e-9 there). Coefficients: least squares in float64 on 64 Chebyshev nodes per
// interval, rounded to float32; row j holds the u^j coefficient of every interval. |error| <= 2.4e-7 against
// float64 over [-12, 12] (half an ulp of the result; PyTorch's own float32 GELU: 1.2e-6), relative error
// 7.9e-7 where |GELU| > 1e-3. GELU is a large part of the depthwise kernels: this form (six one-table permutes,
// five FMAs, three ops for the index) took 15 cycles a vector on Zen 4 where degree 4 on 32 intervals (five
// two-table permutes, 2.5-3 cycles each there) took 22-24. tests/models/test_kernels.py checks the accuracy.
constexpr float kGeluStep = 0.375f;
alignas(64) constexpr float kGeluTail[6][16] = {
    {5.00000000e-01f, 3.53830248e-01f, 2.26627350e-01f, 1.30294517e-01f, 6.68072030e-02f, 3.03963590e-02f, 1.22244712e-02f, 4.33244789e-03f, 1.34989817e-03f, 3.69078713e-04f, 8.84174660e-05f, 1.85368226e-05f, 3.39770349e-06f, 5.44051034e-07f, 7.60516770e-08f, 9.27580590e-09f},
    {-3.98942262e-01f, -3.71855080e-01f, -3.01137447e-01f, -2.11876646e-01f, -1.29517600e-01f, -6.87862784e-02f, -3.17396522e-02f, -1.27241807e-02f, -4.43184795e-03f, -1.34111894e-03f, -3.52595816e-04f, -8.05405507e-05f, -1.59837873e-05f, -2.75595835e-06f, -4.12851335e-07f, -5.37332561e-08f},
    {1.05904080e-14f, 6.97210059e-02f, 1.12924434e-01f, 1.19179703e-01f, 9.71386507e-02f, 6.44880980e-02f, 3.57077979e-02f, 1.67006981e-02f, 6.64769718e-03f, 2.26300396e-03f, 6.61024824e-04f, 1.66071404e-04f, 3.59478436e-05f, 6.71312137e-06f, 1.08266318e-06f, 1.50913976e-07f},
    {6.64891005e-02f, 5.32597825e-02f, 2.19583046e-02f, -9.37905442e-03f, -2.69822311e-02f, -2.88400594e-02f, -2.14906726e-02f, -1.24924751e-02f, -5.90922311e-03f, -2.32250267e-03f, -7.67597638e-04f, -2.14961212e-04f, -5.12706720e-05f, -1.04532155e-05f, -1.82674421e-06f, -2.74187329e-07f},
    {-4.12755740e-13f, -1.64752789e-02f, -2.27785204e-02f, -1.71564892e-02f, -6.10544393e-03f, 2.69761356e-03f, 6.08494412e-03f, 5.39880060e-03f, 3.32963513e-03f, 1.59261457e-03f, 6.16452249e-04f, 1.97295900e-04f, 5.28765013e-05f, 1.19641518e-05f, 2.29838065e-06f, 3.76402141e-07f},
    {-9.90082882e-03f, -6.70249574e-03f, 1.26083571e-04f, 5.23131806e-03f, 5.83452266e-03f, 3.28577007e-03f, 4.77967580e-04f, -9.54890274e-04f, -1.10275112e-03f, -7.20221666e-04f, -3.43808817e-04f, -1.29127759e-04f, -3.94320450e-05f, -9.96860672e-06f, -2.10971484e-06f, -3.76592425e-07f},
};

#if defined(CPU_CAPABILITY_AVX512)
ALWAYS_INLINE Vec gelu(Vec v) {
  const __m512 x = v;
  const __m512 t = _mm512_abs_ps(x);
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: the sum is rounded to an integer
  const __m512 f = _mm512_fmadd_ps(t, _mm512_set1_ps(1.0f / kGeluStep), magic);
  const __m512i k = _mm512_castps_si512(f);  // its low mantissa bits are the interval number
  const __m512 u = _mm512_fnmadd_ps(_mm512_sub_ps(f, magic), _mm512_set1_ps(kGeluStep), t);
  auto coef = [&](int j) { return _mm512_permutexvar_ps(k, _mm512_load_ps(kGeluTail[j])); };
  __m512 q = coef(5);
  for (int j = 4; j >= 0; --j) q = _mm512_fmadd_ps(q, u, coef(j));
  // x * Q below 15.5 intervals, else 0 (also for infinities: GELU(inf) = inf, GELU(-inf) = 0); NaN stays NaN
  const __m512 xq = _mm512_maskz_mul_ps(
      _mm512_cmp_ps_mask(t, _mm512_set1_ps(15.5f * kGeluStep), _CMP_NGE_UQ), x, q);
  return _mm512_mask_sub_ps(xq, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), x, xq);
}

#elif defined(CPU_CAPABILITY_AVX2)
// The same form on 8 lanes. vpermps indexes 8 entries, so the table has 8 intervals of twice the width
// (centred at k * 0.75) and a polynomial of degree 7 to keep the accuracy: |error| <= 2.4e-7 against float64,
// relative 6.3e-7 where |GELU| > 1e-3 (fitted like the one above). Eight one-table permutes and seven FMAs,
// where the 16-interval table would take two permutes and a blend for each of its six coefficients.
constexpr float kGeluStep8 = 0.75f;
alignas(32) constexpr float kGeluTail8[8][8] = {
    {5.00000000e-01f, 2.26627350e-01f, 6.68072030e-02f, 1.22244721e-02f, 1.34989817e-03f, 8.84172841e-05f, 3.39766370e-06f, 7.60482806e-08f},
    {-3.98942292e-01f, -3.01137447e-01f, -1.29517600e-01f, -3.17396522e-02f, -4.43184841e-03f, -3.52595729e-04f, -1.59837327e-05f, -4.12844884e-07f},
    {3.83561449e-08f, 1.12926334e-01f, 9.71383154e-02f, 3.57071310e-02f, 6.64774282e-03f, 6.61116675e-04f, 3.59655423e-05f, 1.08402367e-06f},
    {6.64895847e-02f, 2.19580103e-02f, -2.69827992e-02f, -2.14904323e-02f, -5.90912346e-03f, -7.67626276e-04f, -5.12819133e-05f, -1.82791825e-06f},
    {8.03632611e-06f, -2.29310878e-02f, -6.07533986e-03f, 6.13633683e-03f, 3.32494918e-03f, 6.09474548e-04f, 5.16219116e-05f, 2.20761672e-06f},
    {-1.00165596e-02f, 1.45168306e-04f, 5.86792501e-03f, 4.62942728e-04f, -1.10816245e-03f, -3.42055399e-04f, -3.88163535e-05f, -2.04964476e-06f},
    {1.21026453e-04f, 2.95868632e-03f, -6.09537121e-04f, -9.82203288e-04f, 9.86653176e-05f, 1.32395842e-04f, 2.30928727e-05f, 1.62245590e-06f},
    {1.03733444e-03f, -3.25342233e-04f, -5.49762393e-04f, 2.53181555e-04f, 8.63389869e-05f, -2.93106859e-05f, -9.85245606e-06f, -9.32731098e-07f},
};

ALWAYS_INLINE Vec gelu(Vec v) {
  const __m256 x = v;
  const __m256 t = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: the sum is rounded to an integer
  const __m256 f = _mm256_fmadd_ps(t, _mm256_set1_ps(1.0f / kGeluStep8), magic);
  const __m256i k = _mm256_castps_si256(f);  // its low mantissa bits are the interval number
  const __m256 u = _mm256_fnmadd_ps(_mm256_sub_ps(f, magic), _mm256_set1_ps(kGeluStep8), t);
  auto coef = [&](int j) { return _mm256_permutevar8x32_ps(_mm256_load_ps(kGeluTail8[j]), k); };
  __m256 q = coef(7);
  for (int j = 6; j >= 0; --j) q = _mm256_fmadd_ps(q, u, coef(j));
  // x * Q below 7.5 intervals (Q = 9e-9 there), else 0 (infinities too); NaN stays NaN
  const __m256 xq = _mm256_and_ps(_mm256_cmp_ps(t, _mm256_set1_ps(7.5f * kGeluStep8), _CMP_NGE_UQ),
                                  _mm256_mul_ps(x, q));
  return _mm256_blendv_ps(xq, _mm256_sub_ps(x, xq), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
}

#else
// exact (erf) GELU, written as PyTorch's own vectorised GELU kernel writes it
ALWAYS_INLINE Vec gelu(Vec x) {
  const Vec half(0.5f), one(1.0f), alpha(static_cast<float>(M_SQRT1_2));
  return x * half * (one + (x * alpha).erf());
}

ALWAYS_INLINE Vec sigmoid(Vec x) { return (Vec(1.0f) + (Vec(0.0f) - x).exp()).reciprocal(); }
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// e^x for x clamped to [-80, 80] (results stay normal floats: a denormal would cost a microcode assist per
// lane, and e^-80 is already below every rounding step that matters here): Cody-Waite reduction by ln 2 and
// Cephes' degree-7 polynomial, times 2^n; within 2 ulp, and about a third of the cost of the library call
// ATen's Vectorized<float>::exp makes (Sleef, per vector)
ALWAYS_INLINE Simd::V exp_fast(Simd::V x) {
  using S = Simd;
  x = S::clamp(x, -80.0f, 80.0f);
  const S::V n = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  S::V r = S::fnmadd(n, S::set1(0.693359375f), x);
  r = S::fnmadd(n, S::set1(-2.12194440e-4f), r);
  S::V p = S::set1(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = S::fmadd(p, r, S::set1(c));
  p = S::fmadd(p, S::mul(r, r), S::add(r, S::set1(1.0f)));
  return S::times_pow2(p, n);
}

ALWAYS_INLINE Vec sigmoid(Vec v) {
  return Simd::recip(Simd::add(Simd::set1(1.0f), exp_fast(Simd::sub(Simd::zero(), v))));
}
#endif

ALWAYS_INLINE float hsum(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);  // a tree of shuffles: a quarter of the latency of 16 scalar adds in a row
#endif
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += lanes[i];
  return s;
}

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses the vector
// (a memory operand), and AMD Zen 4, which loads one 512-bit vector per cycle, is then bound by the loads
// instead of the FMAs (GEMM at 80% of the FMA peak before, ~97% after)
template <class V>
ALWAYS_INLINE void pin(V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
  v = V(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  __asm__("" : "+x"(r));
  v = V(r);
#endif
}

ALWAYS_INLINE Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
ALWAYS_INLINE void store(Vec v, float* p, int64_t n) {
  if (n == kLanes) v.store(p); else v.store(p, n);
}

// Loads of the first n lanes with the choice made once, outside an inner loop (`load` decides per call, and
// its branches kept a register tile's vectors on the stack)
#if defined(CPU_CAPABILITY_AVX512)
using LaneMask = __mmask16;
ALWAYS_INLINE LaneMask lane_mask(int64_t n) { return Simd::mask(n); }
ALWAYS_INLINE Vec load_lanes(const float* p, LaneMask m) { return _mm512_maskz_loadu_ps(m, p); }
#else
using LaneMask = int64_t;
ALWAYS_INLINE LaneMask lane_mask(int64_t n) { return n; }
ALWAYS_INLINE Vec load_lanes(const float* p, LaneMask n) { return load(p, n); }
#endif

void check_map(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, name,
              ": expected a float32 (pixels, channels) matrix with contiguous channels");
}

const float* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<float>() : nullptr;
}

// Rows [0, n) over the threads, balanced at run time: each thread takes its own contiguous share in ascending
// order, then helps the others from the far end of theirs, descending (so a worker that keeps neighbouring
// rows, like pw_dwconv's ring of GEMM rows, still computes each row once). With a static split, a core slowed
// by anything else on the machine held the other at the end of every op. make_worker() is called once per
// thread, inside the parallel region, and returns that thread's fn(row).
template <class MakeWorker>
void parallel_rows(int64_t n, MakeWorker&& make_worker) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
  if (threads <= 1) {
    auto work = make_worker();
    for (int64_t r = 0; r < n; ++r) work(r);
    return;
  }
  // share i: [front, back) packed into one word (front high, back low), claimed by compare-and-swap
  std::unique_ptr<std::atomic<uint64_t>[]> shares(new std::atomic<uint64_t>[threads]);
  for (int i = 0; i < threads; ++i)
    shares[i].store((static_cast<uint64_t>(n * i / threads) << 32) | static_cast<uint64_t>(n * (i + 1) / threads));
  TORCH_CHECK(n < (int64_t(1) << 31), "parallel_rows: too many rows");
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    auto work = make_worker();
    for (int64_t me = first; me < last; ++me) {
      for (;;) {  // own share, from the front
        uint64_t v = shares[me].load();
        const int64_t f = static_cast<int64_t>(v >> 32), b = static_cast<int64_t>(v & 0xFFFFFFFFu);
        if (f >= b) break;
        if (shares[me].compare_exchange_weak(v, (static_cast<uint64_t>(f + 1) << 32) | static_cast<uint64_t>(b))) work(f);
      }
      for (;;) {  // then the largest remainder of the others, from the back
        int victim = -1;
        int64_t most = 0;
        for (int i = 0; i < threads; ++i) {
          const uint64_t v = shares[i].load();
          const int64_t left = static_cast<int64_t>(v & 0xFFFFFFFFu) - static_cast<int64_t>(v >> 32);
          if (left > most) most = left, victim = i;
        }
        if (victim < 0) break;
        uint64_t v = shares[victim].load();
        const int64_t f = static_cast<int64_t>(v >> 32), b = static_cast<int64_t>(v & 0xFFFFFFFFu);
        if (f < b && shares[victim].compare_exchange_weak(v, (static_cast<uint64_t>(f) << 32) | static_cast<uint64_t>(b - 1)))
          work(b - 1);
      }
    }
  });
}

// Source index of tap k (0..2) for output o along an axis of n pixels; -1 marks zero padding.
ALWAYS_INLINE int64_t tap_index(int64_t o, int64_t k, int64_t stride, int64_t n, bool reflect) {
  int64_t i = o * stride + k - 1;
  if (i >= 0 && i < n) return i;
  if (!reflect) return -1;
  if (n == 1) return 0;
  return i < 0 ? -i : 2 * (n - 1) - i;
}

// Sums of a 3x3 depthwise conv for U consecutive output pixels and one chunk of channels [c, c + n):
// acc[u] = sum over taps of w[tap] * x[tap pixel of output u]. src[k]: input row of tap row k (nullptr: zero
// padding); col[u][kx]: input column of tap kx of output u (-1: zero padding). The U accumulators are
// independent FMA chains, which hides the FMA latency.
template <bool kFull>
ALWAYS_INLINE Vec load_n(const float* p, int64_t n) {
  if constexpr (kFull) return Vec::loadu(p); else return Vec::loadu(p, n);
}

template <int U>
ALWAYS_INLINE void conv_chunk(Vec* acc, const float* const src[3], const int64_t col[][3], const float* wp, int64_t ldw,
                       int64_t c, int64_t n, int64_t ldx) {
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) acc[u] = Vec(0.0f);
  for (int ky = 0; ky < 3; ++ky) {
    if (!src[ky]) continue;
    for (int kx = 0; kx < 3; ++kx) {
      const Vec w = Vec::loadu(wp + (ky * 3 + kx) * ldw + c);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
        if (col[u][kx] >= 0) acc[u] = at::vec::fmadd(w, load(src[ky] + col[u][kx] * ldx + c, n), acc[u]);
    }
  }
}

// The same for U pixels whose taps are all inside the row (no column padding): straight-line code, no
// per-tap checks. base[k]: input row of tap row k at the first tap's column of pixel 0 (a zero row where
// the padding is zero); step: distance between consecutive pixels' inputs.
template <int U, bool kFull>
ALWAYS_INLINE void conv_chunk_interior(Vec* acc, const float* const base[3], int64_t step, const float* wp, int64_t ldw,
                                int64_t c, int64_t n, int64_t ldx) {
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) acc[u] = Vec(0.0f);
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      const Vec w = Vec::loadu(wp + (ky * 3 + kx) * ldw + c);
      const float* px = base[ky] + kx * ldx + c;
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[u] = at::vec::fmadd(w, load_n<kFull>(px + u * step, n), acc[u]);
    }
  }
}

// Stride 1: pixel u's tap kx reads input column u + kx, so a row of U + 2 input vectors serves all U x 3
// taps: U + 2 loads instead of 3U per row of taps, and U independent FMA chains.
template <int U, bool kFull>
ALWAYS_INLINE void conv_chunk_stride1(Vec* acc, const float* const base[3], const float* wp, int64_t ldw,
                                      int64_t c, int64_t n, int64_t ldx) {
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) acc[u] = Vec(0.0f);
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky) {
    const Vec w0 = Vec::loadu(wp + (ky * 3) * ldw + c), w1 = Vec::loadu(wp + (ky * 3 + 1) * ldw + c),
              w2 = Vec::loadu(wp + (ky * 3 + 2) * ldw + c);
    const float* px = base[ky] + c;
    Vec xs[U + 2];
#pragma GCC unroll 10
    for (int j = 0; j < U + 2; ++j) xs[j] = load_n<kFull>(px + j * ldx, n);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      acc[u] = at::vec::fmadd(w0, xs[u], acc[u]);
      acc[u] = at::vec::fmadd(w1, xs[u + 1], acc[u]);
      acc[u] = at::vec::fmadd(w2, xs[u + 2], acc[u]);
    }
  }
}

struct DwArgs {
  const float *xp, *wp, *b, *res;
  float* op;
  const float *side, *side_b;
  float* side_o;
  const float* zero_row;
  int64_t H, W, Ho, Wo, C, G, CS, ldx, ldw, ldr, ldo, lds, ldso, stride, act, mode;
  bool reflect;
  // the output columns to compute, [x_begin, x_end) (x_end -1: W); a column strip of a wider map computes its own
  // columns only, with the strip's edges (which are not the map's) one column outside that range
  int64_t x_begin = 0, x_end = -1;
};

// U output pixels of one row starting at column ox, finished (epilogue included). Everything it reads from
// `a` is copied into locals first, so that nothing in the inner loops is re-read through a pointer.
template <int U>
ALWAYS_INLINE void dw_pixels(const DwArgs& a, const float* const src[3], int64_t row, int64_t ox) {
  const float *xp = a.xp, *wp = a.wp, *b = a.b, *res = a.res, *side = a.side, *side_b = a.side_b;
  float *op = a.op, *side_o = a.side_o;
  const int64_t W = a.W, Wo = a.Wo, C = a.C, G = a.G, CS = a.CS, ldx = a.ldx, ldw = a.ldw, ldr = a.ldr,
                ldo = a.ldo, lds = a.lds, ldso = a.ldso, stride = a.stride, act = a.act, mode = a.mode;
  const bool reflect = a.reflect;
  (void)xp;
  int64_t col[U][3];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < 3; ++k) col[u][k] = tap_index(ox + u, k, stride, W, reflect);
  const int64_t p0 = row * Wo + ox;
  const bool interior = ox >= 1 && (ox + U - 1) * stride + 1 <= W - 1;
  const float* base[3];
  for (int k = 0; k < 3; ++k) base[k] = (src[k] ? src[k] : a.zero_row) + (ox * stride - 1) * ldx;
  auto conv = [&](Vec* a, int64_t c, int64_t n) __attribute__((always_inline)) {
    if (!interior) conv_chunk<U>(a, src, col, wp, ldw, c, n, ldx);
    else if (stride == 1 && n == kLanes) conv_chunk_stride1<U, true>(a, base, wp, ldw, c, n, ldx);
    else if (stride == 1) conv_chunk_stride1<U, false>(a, base, wp, ldw, c, n, ldx);
    else if (n == kLanes) conv_chunk_interior<U, true>(a, base, stride * ldx, wp, ldw, c, n, ldx);
    else conv_chunk_interior<U, false>(a, base, stride * ldx, wp, ldw, c, n, ldx);
  };
  Vec acc[U], acc2[U];
  if (mode == 0) {
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t n = std::min(kLanes, C - c);
      conv(acc, c, n);
      const Vec bv = b ? load(b + c, n) : Vec(0.0f);
      for (int u = 0; u < U; ++u) {
        Vec s = acc[u] + bv;
        if (act == kGeluRes) {
          s = gelu(s) + load(res + (p0 + u) * ldr + c, n);
        } else {
          if (res) s = s + load(res + (p0 + u) * ldr + c, n);
          if (act == kGelu) s = gelu(s);
        }
        store(s, op + (p0 + u) * ldo + c, n);
      }
    }
    if (side) {
      for (int u = 0; u < U; ++u)
        for (int64_t c = 0; c < CS; c += kLanes) {
          const int64_t n = std::min(kLanes, CS - c);
          Vec s = load(side + (p0 + u) * lds + c, n);
          if (side_b) s = s + load(side_b + c, n);
          store(gelu(s), side_o + (p0 + u) * ldso + c, n);
        }
    }
  } else if (mode == 1) {
    for (int64_t c = 0; c < G; c += kLanes) {
      const int64_t n = std::min(kLanes, G - c);
      conv(acc, c, n);
      conv(acc2, G + c, n);
      for (int u = 0; u < U; ++u) store(gelu(acc[u]) * acc2[u], op + (p0 + u) * ldo + c, n);
    }
  } else {
    alignas(64) float sums[U][kMaxChannels + 64];
    for (int64_t c = 0; c < C; c += kLanes) {
      conv(acc, c, std::min(kLanes, C - c));
      for (int u = 0; u < U; ++u) acc[u].store(sums[u] + c);
    }
    for (int u = 0; u < U; ++u) {
      alignas(64) float pair[kMaxChannels / 2 + 64];
      for (int64_t j = 0; j < G; ++j) pair[j] = sums[u][2 * j] + sums[u][2 * j + 1];
      for (int64_t c = 0; c < G; c += kLanes) {
        const int64_t n = std::min(kLanes, G - c);
        Vec s = load(pair + c, n);
        if (b) s = s + load(b + c, n);
        if (act == kGelu) s = gelu(s);
        store(s, op + (p0 + u) * ldo + c, n);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The lanes of one channel chunk: all of them (kFull: plain loads and stores), or the first n by a mask. The
// AVX-512 build always masks (free there); AVX2 masks only a chunk's partial last vector (its masked store is
// slow on AMD).
template <bool kFull>
struct Lanes {
  Simd::M m;
  ALWAYS_INLINE Simd::V load(const float* p) const {
    if constexpr (kFull) return Simd::load(p);
    else return Simd::load(p, m);
  }
  ALWAYS_INLINE void store(float* p, Simd::V v) const {
    if constexpr (kFull) Simd::store(p, v);
    else Simd::store(p, m, v);
  }
};

// fn(lanes) with the Lanes for the first n lanes of a vector
template <class Fn>
ALWAYS_INLINE void with_lanes(int64_t n, Fn&& fn) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n >= Simd::kW) return fn(Lanes<true>{Simd::mask(n)});
#endif
  fn(Lanes<false>{Simd::mask(n)});
}

// Stride 1, one output row, channels [c, c + kW) (the lanes `ln`): the nine tap weights stay in registers
// while the row is swept left to right, three input columns (one vector per tap row) held in registers and one
// new column loaded per output pixel; three partial sums (one per tap column) keep the FMA chains short.
// `epilogue(x, sum)` finishes output pixel x. rows[k]: input row of tap row k (a zero row for zero padding),
// already offset to the conv's first channel. About 3x the speed of `dw_pixels`, whose accumulators and
// tap indices the compiler kept on the stack.
template <class L, class Epilogue>
ALWAYS_INLINE void dw_sweep(const float* const rows[3], int64_t ldx, int64_t W, int64_t x0, int64_t x1, bool reflect,
                            const float* wp, int64_t ldw, int64_t c, const L& ln, Epilogue&& epilogue) {
  using V = Simd::V;
  V w[9];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t) w[t] = ln.load(wp + t * ldw + c);
  const float *r0 = rows[0] + c, *r1 = rows[1] + c, *r2 = rows[2] + c;
  V a0, a1, a2, b0, b1, b2, n0, n1, n2;
  auto column = [&](int64_t xi, V& v0, V& v1, V& v2) __attribute__((always_inline)) {
    v0 = ln.load(r0 + xi * ldx);
    v1 = ln.load(r1 + xi * ldx);
    v2 = ln.load(r2 + xi * ldx);
  };
  const V zero = Simd::zero();
  if (x0 > 0) column(x0 - 1, a0, a1, a2);
  else if (reflect) column(W > 1 ? 1 : 0, a0, a1, a2);  // column -1
  else a0 = a1 = a2 = zero;
  column(x0, b0, b1, b2);
  for (int64_t x = x0; x < x1; ++x) {
    if (x + 1 < W) column(x + 1, n0, n1, n2);
    else if (reflect) column(W > 1 ? W - 2 : 0, n0, n1, n2);  // column W
    else n0 = n1 = n2 = zero;
    const V s0 = Simd::fmadd(w[6], a2, Simd::fmadd(w[3], a1, Simd::mul(w[0], a0)));
    const V s1 = Simd::fmadd(w[7], b2, Simd::fmadd(w[4], b1, Simd::mul(w[1], b0)));
    const V s2 = Simd::fmadd(w[8], n2, Simd::fmadd(w[5], n1, Simd::mul(w[2], n0)));
    epilogue(x, Simd::add(Simd::add(s0, s1), s2));
    a0 = b0, a1 = b1, a2 = b2;
    b0 = n0, b1 = n1, b2 = n2;
  }
}

ALWAYS_INLINE Simd::V gelu(Simd::V v) { return gelu(Vec(v)); }

constexpr int64_t kBlock = 32;  // pixels per block of dw_row_s1

// A whole output row of a stride-1 conv (stride 2 stays on `dw_pixels`), and the side job, one channel chunk
// at a time. src[k]: input row of tap row k, nullptr for a zero-padded row.
void dw_row_s1(const DwArgs& a, const float* const src[3], int64_t row) {
  using V = Simd::V;
  constexpr int64_t kW = Simd::kW;
  const int64_t W = a.W, p0 = row * a.Wo;
  const float* rows[3];
  for (int k = 0; k < 3; ++k) rows[k] = src[k] ? src[k] : a.zero_row;
  // blocks of kBlock pixels, all channel chunks of a block before the next: the block's three input rows
  // (kBlock x ldx floats each) stay in L1 across the chunks instead of streaming from L2 once per chunk
  const int64_t x_end = a.x_end < 0 ? W : a.x_end;
  for (int64_t x0 = a.x_begin; x0 < x_end; x0 += kBlock) {
    const int64_t x1 = std::min(x_end, x0 + kBlock);
    if (a.mode == 0) {
      for (int64_t c = 0; c < a.C; c += kW) with_lanes(a.C - c, [&](const auto& ln) __attribute__((always_inline)) {
        const V bias = a.b ? ln.load(a.b + c) : Simd::zero();
        float* out = a.op + p0 * a.ldo + c;
        const int64_t ldo = a.ldo;
        if (a.res) {
          const float* res = a.res + p0 * a.ldr + c;
          const int64_t ldr = a.ldr;
          if (a.act == kGelu)
            dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
              ln.store(out + x * ldo, gelu(Simd::add(Simd::add(v, bias), ln.load(res + x * ldr))));
            });
          else if (a.act == kGeluRes)
            dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
              ln.store(out + x * ldo, Simd::add(gelu(Simd::add(v, bias)), ln.load(res + x * ldr)));
            });
          else
            dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
              ln.store(out + x * ldo, Simd::add(Simd::add(v, bias), ln.load(res + x * ldr)));
            });
        } else if (a.act == kGelu) {
          dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
            ln.store(out + x * ldo, gelu(Simd::add(v, bias)));
          });
        } else {
          dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
            ln.store(out + x * ldo, Simd::add(v, bias));
          });
        }
      });
    } else if (a.mode == 2) {  // pair: out[j] = act(conv[2j] + conv[2j + 1] + bias[j]), kW outputs from 2 kW channels
      alignas(64) float held[kBlock * kW];
      for (int64_t o = 0; o < a.G; o += kW) {
        const int64_t c = 2 * o;
        if (c + kW < a.C)
          with_lanes(a.C - c - kW, [&](const auto& ln) __attribute__((always_inline)) {
            dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c + kW, ln,
                     [&](int64_t x, V v) __attribute__((always_inline)) { Simd::store_aligned(held + (x - x0) * kW, v); });
          });
        else
          for (int64_t x = x0; x < x1; ++x) Simd::store_aligned(held + (x - x0) * kW, Simd::zero());
        const Lanes<false> lo{Simd::mask(a.C - c)}, lo_out{Simd::mask(a.G - o)};
        const V bias = a.b ? lo_out.load(a.b + o) : Simd::zero();
        float* out = a.op + p0 * a.ldo + o;
        const int64_t ldo = a.ldo;
        const bool act = a.act == kGelu;
        dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, lo, [&](int64_t x, V v) __attribute__((always_inline)) {
          V r = Simd::add(Simd::pair_sums(v, Simd::load_aligned(held + (x - x0) * kW)), bias);
          if (act) r = gelu(r);
          lo_out.store(out + x * ldo, r);
        });
      }
    } else {  // gate: out[c] = gelu(conv[c]) * conv[c + G]; the second half of each chunk pair goes first, to L1
      alignas(64) float held[kBlock * kW];
      for (int64_t c = 0; c < a.G; c += kW) with_lanes(a.G - c, [&](const auto& ln) __attribute__((always_inline)) {
        dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, a.G + c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
          Simd::store_aligned(held + (x - x0) * kW, v);
        });
        float* out = a.op + p0 * a.ldo + c;
        const int64_t ldo = a.ldo;
        dw_sweep(rows, a.ldx, W, x0, x1, a.reflect, a.wp, a.ldw, c, ln, [&](int64_t x, V v) __attribute__((always_inline)) {
          ln.store(out + x * ldo, Simd::mul(gelu(v), Simd::load_aligned(held + (x - x0) * kW)));
        });
      });
    }
  }  // pixel blocks
  if (a.side) {  // side_out = GELU(side_in + side_bias), pointwise
    for (int64_t x = a.x_begin; x < x_end; ++x) {
      const float* in = a.side + (p0 + x) * a.lds;
      float* out = a.side_o + (p0 + x) * a.ldso;
      for (int64_t c = 0; c < a.CS; c += kW) {
        const Lanes<false> ln{Simd::mask(a.CS - c)};
        V v = ln.load(in + c);
        if (a.side_b) v = Simd::add(v, ln.load(a.side_b + c));
        ln.store(out + c, gelu(v));
      }
    }
  }
}
#endif

void dw_rows(const DwArgs args, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t img = row / args.Ho, oy = row % args.Ho;
    const float* src[3];
    for (int k = 0; k < 3; ++k) {
      const int64_t iy = tap_index(oy, k, args.stride, args.H, args.reflect);
      src[k] = iy < 0 ? nullptr : args.xp + ((img * args.H + iy) * args.W) * args.ldx;
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (args.stride == 1) {
      dw_row_s1(args, src, row);
      continue;
    }
#endif
    int64_t ox = 0;
    for (; ox + 4 <= args.Wo; ox += 4) dw_pixels<4>(args, src, row, ox);
    for (; ox < args.Wo; ++ox) dw_pixels<1>(args, src, row, ox);
  }
}


#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// y (P pixels x a block of NV column vectors) = x (P x K) @ w (K x kW*NV) [+ y when kAcc]: P x NV accumulators
// in registers, each weight vector loaded once per k and each input value broadcast once per k. The weights
// need no packing (they are stored (K, Cm) row-major, Cm padded to whole vectors), so a row of 128 pixels
// costs no setup: MKL's sgemm packed the weights and cleared the output on every call, ~20% of its time at
// these sizes. When `partial`, `last` masks the lanes of the block's last vector that exist in y (y may be
// narrower than w); full vectors take plain stores (AVX2's masked store is slow on AMD).
template <int P, int NV, bool kAcc>
ALWAYS_INLINE void gemm_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, float* y,
                             int64_t ldy, bool partial, Simd::M last) {
  using V = Simd::V;
  constexpr int kW = Simd::kW;
  V acc[P][NV];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 6
    for (int v = 0; v < NV; ++v) acc[p][v] = Simd::zero();
  for (int64_t k = 0; k < K; ++k) {
    V wv[NV];
#pragma GCC unroll 6
    for (int v = 0; v < NV; ++v) {
      wv[v] = Simd::load(w + k * ldw + kW * v);
      pin(wv[v]);  // one load for the P FMAs
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const V xb = Simd::set1(x[p * ldx + k]);
#pragma GCC unroll 6
      for (int v = 0; v < NV; ++v) acc[p][v] = Simd::fmadd(xb, wv[v], acc[p][v]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    float* yp = y + p * ldy;
#pragma GCC unroll 6
    for (int v = 0; v < NV; ++v) {
      V r = acc[p][v];
      if (v == NV - 1 && partial) {
        if constexpr (kAcc) r = Simd::add(r, Simd::load(yp + kW * v, last));
        Simd::store(yp + kW * v, last, r);
      } else {
        if constexpr (kAcc) r = Simd::add(r, Simd::load(yp + kW * v));
        Simd::store(yp + kW * v, r);
      }
    }
  }
}

template <int NV, bool kAcc>
void gemm_columns(const float* x, int64_t ldx, int64_t n, const float* w, int64_t ldw, int64_t K, float* y,
                  int64_t ldy, bool partial, Simd::M last) {
  int64_t p = 0;
  for (; p + 4 <= n; p += 4) gemm_tile<4, NV, kAcc>(x + p * ldx, ldx, w, ldw, K, y + p * ldy, ldy, partial, last);
  for (; p < n; ++p) gemm_tile<1, NV, kAcc>(x + p * ldx, ldx, w, ldw, K, y + p * ldy, ldy, partial, last);
}

// gemm_columns for a block of `count` vectors (1 .. kMaxNV), the count a template argument
template <int NV, bool kAcc>
ALWAYS_INLINE void gemm_columns_of(int64_t count, const float* x, int64_t ldx, int64_t n, const float* w,
                                   int64_t ldw, int64_t K, float* y, int64_t ldy, bool partial, Simd::M last) {
  if constexpr (NV < Simd::kMaxNV)
    if (count > NV) return gemm_columns_of<NV + 1, kAcc>(count, x, ldx, n, w, ldw, K, y, ldy, partial, last);
  gemm_columns<NV, kAcc>(x, ldx, n, w, ldw, K, y, ldy, partial, last);
}

// y (n x C, rows ldy apart) [+]= x (n x K, rows ldx apart) @ w (K x Cm, row-major), Cm a multiple of 16 at or
// above C (columns beyond C ignored): in blocks of at most kMaxNV column vectors, as even as they come
template <bool kAcc>
void gemm_rows(const float* x, int64_t ldx, int64_t n, const float* w, int64_t Cm, int64_t K, float* y,
               int64_t ldy, int64_t C) {
  constexpr int kW = Simd::kW;
  const int64_t nv = (C + kW - 1) / kW, blocks = (nv + Simd::kMaxNV - 1) / Simd::kMaxNV;
  const int64_t tail = C - kW * (nv - 1);
  for (int64_t b = 0, v0 = 0; b < blocks; ++b) {
    const int64_t count = (nv - v0 + (blocks - b) - 1) / (blocks - b);
    const bool partial = v0 + count == nv && tail < kW;
    gemm_columns_of<1, kAcc>(count, x, ldx, n, w + kW * v0, Cm, K, y + kW * v0, ldy, partial, Simd::mask(tail));
    v0 += count;
  }
}
#endif

// Fortran BLAS sgemm as exported by PyTorch's MKL / OpenBLAS (a missing symbol fails the load, and the
// caller falls back to the eager path); used where the kernels are built for neither AVX-512 nor AVX2
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// y (n x C) [+]= x (n x K) @ w (K x Cm) for one block of rows, on whichever of the two the build has
void gemm_block(const float* x, int64_t ldx, int64_t n, const float* w, int64_t Cm, int64_t K, float* y,
                int64_t ldy, int64_t C, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (accumulate) gemm_rows<true>(x, ldx, n, w, Cm, K, y, ldy, C);
  else gemm_rows<false>(x, ldx, n, w, Cm, K, y, ldy, C);
#else  // column-major BLAS on the transposes
  const int m = static_cast<int>(C), nn = static_cast<int>(n), k = static_cast<int>(K);
  const int lda = static_cast<int>(Cm), ldb = static_cast<int>(ldx), ldc = static_cast<int>(ldy);
  const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  sgemm_("N", "N", &m, &nn, &k, &one, w, &lda, x, &ldb, &beta, y, &ldc);
#endif
}

ALWAYS_INLINE void layer_norm_pixel(const Vec* v, int64_t C, const float* w, const float* b, double eps, float* dst);
#if defined(CPU_CAPABILITY_AVX512)
template <int NV>
ALWAYS_INLINE void layer_norm_4(const Vec (*v)[NV], int count, int64_t C, const float* w, const float* b, double eps,
                                float* dst, int64_t ld);
#endif

// A LayerNorm over the K channels of each of n pixels (rows ldx apart) into dst (rows K apart): the prologue
// of a GEMM whose input is a LayerNorm's output (ESC and ASID), so that the normalised map never reaches memory
struct RowNorm {
  const float *w = nullptr, *b = nullptr;
  double eps = 0.0;
  explicit operator bool() const { return w != nullptr; }
  void apply(const float* x, int64_t ldx, int64_t n, int64_t K, float* dst) const {
    Vec v[kMaxChannels / kLanes];
    const int64_t nv = (K + kLanes - 1) / kLanes;
#if defined(CPU_CAPABILITY_AVX512)
    // four pixels at a time (the statistics as vectors of four), up to 64 channels
    if (nv == 1) return apply4<1>(x, ldx, n, K, dst);
    if (nv == 2) return apply4<2>(x, ldx, n, K, dst);
    if (nv == 3) return apply4<3>(x, ldx, n, K, dst);
    if (nv == 4) return apply4<4>(x, ldx, n, K, dst);
#endif
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t j = 0; j < nv; ++j) v[j] = load(x + p * ldx + j * kLanes, std::min(kLanes, K - j * kLanes));
      layer_norm_pixel(v, K, w, b, eps, dst + p * K);
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  template <int NV>
  void apply4(const float* x, int64_t ldx, int64_t n, int64_t K, float* dst) const {
    for (int64_t p = 0; p < n; p += 4) {
      const int count = static_cast<int>(std::min<int64_t>(4, n - p));
      Vec v[4][NV];
      for (int u = 0; u < 4; ++u)
        for (int j = 0; j < NV; ++j)
          v[u][j] = u < count ? load(x + (p + u) * ldx + j * kLanes, std::min<int64_t>(kLanes, K - j * kLanes))
                              : Vec(0.0f);
      layer_norm_4<NV>(v, count, K, w, b, eps, dst + p * K, K);
    }
  }
#endif
};

RowNorm row_norm(const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, int64_t K) {
  RowNorm norm;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == K && bias.has_value() && bias->numel() == K && weight->is_contiguous() &&
                bias->is_contiguous() && K <= kMaxChannels, "LayerNorm prologue: weight and bias of the input's width");
    norm.w = weight->const_data_ptr<float>();
    norm.b = bias->const_data_ptr<float>();
    norm.eps = eps;
  }
  return norm;
}

// out (P x C) [+]= x (P x K) @ w (K x Cm), Cm >= C a multiple of 16 (zero columns beyond C): the 1x1 convs
// that no depthwise conv follows (AGDN's c5, MVSA's input, c1, c2), parallel over blocks
// of pixels. With ln_weight/ln_bias, x is first LayerNorm-ed per pixel (eps ln_eps), block by block.
void gemm(const Tensor& x, const Tensor& w, Tensor out, bool accumulate, const std::optional<Tensor>& ln_weight,
          const std::optional<Tensor>& ln_bias, double ln_eps) {
  check_map(x, "x");
  check_map(out, "out");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) % 16 == 0 &&
              w.size(1) >= out.size(1) && w.scalar_type() == at::kFloat, "w: (K, Cm) with Cm a multiple of 16");
  TORCH_CHECK(x.size(0) == out.size(0), "pixel count mismatch");
  TORCH_CHECK(x.stride(0) < (1 << 30) && out.stride(0) < (1 << 30), "too large for BLAS int");
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0), K = x.size(1), Cm = w.size(1), C = out.size(1);
  constexpr int64_t kRows = 128;  // pixels per unit of work
  const int64_t P = x.size(0);
  const RowNorm norm = row_norm(ln_weight, ln_bias, ln_eps, K);
  parallel_rows((P + kRows - 1) / kRows, [&] {
    auto normed = std::make_shared<std::vector<float>>(norm ? kRows * K : 0);
    return [&, normed](int64_t r) {
      const int64_t p = r * kRows, n = std::min(kRows, P - p);
      if (norm) {
        norm.apply(xp + p * ldx, ldx, n, K, normed->data());
        gemm_block(normed->data(), K, n, wp, Cm, K, op + p * ldo, ldo, C, accumulate);
      } else {
        gemm_block(xp + p * ldx, ldx, n, wp, Cm, K, op + p * ldo, ldo, C, accumulate);
      }
    };
  });
}

// pw_dwconv: y = x @ wpw (a 1x1 conv), then dwconv3x3 on columns [conv_off, conv_off + C) of y (stride 1),
// without y ever reaching memory: each thread computes y one image row at a time into a ring of three rows
// (the rows a 3x3 conv needs) that stays in its L2 cache. The side job reads columns [0, side_c) of y. With
// epi_w/epi_out, the output does not reach memory either: each finished row goes through a 1x1 conv into
// epi_out (AGDN's FFN: project_in, dwconv, gate and project_out in one pass).
// wpw: (Cin, Cm) row-major, Cm a multiple of 16 covering every column used.
// Output row `row` of a stride-1 depthwise pass (of args.op; 0 when args.op points at the row itself), on whichever
// vector path this build has
ALWAYS_INLINE void dw_one_row(const DwArgs& args, const float* const src[3], int64_t row = 0) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  dw_row_s1(args, src, row);
#else
  const int64_t x_end = args.x_end < 0 ? args.W : args.x_end;
  int64_t ox = args.x_begin;
  for (; ox + 4 <= x_end; ox += 4) dw_pixels<4>(args, src, row, ox);
  for (; ox < x_end; ++ox) dw_pixels<1>(args, src, row, ox);
#endif
}

// A thread's last three rows of y = x @ wpw (x LayerNorm-ed first when `norm` is set), by image row: a 3x3
// depthwise pass after a 1x1 conv reads each row of y three times and has it computed once (slot = row % 3).
struct GemmRowRing {
  const float *xp, *wp;
  int64_t ldx, H, W, Cin, Cm;
  RowNorm norm;
  std::vector<float> rows, normed;
  int64_t held[3] = {-1, -1, -1};  // which image row each slot holds
  int64_t x0 = 0, Wc;              // the columns the rows hold: [x0, x0 + Wc) (a strip), pixels Cm floats apart
  GemmRowRing(const float* xp, int64_t ldx, int64_t H, int64_t W, int64_t Cin, const float* wp, int64_t Cm,
              const RowNorm& norm)
      : xp(xp), wp(wp), ldx(ldx), H(H), W(W), Cin(Cin), Cm(Cm), norm(norm), rows(3 * W * Cm + kLanes, 0.0f), Wc(W) {
    if (norm) normed.assign(W * Cin, 0.0f);
  }
  // hold columns [first, first + width) of the rows from now on (what is held of other columns is dropped)
  void columns(int64_t first, int64_t width) {
    if (first == x0 && width == Wc) return;
    x0 = first, Wc = width;
    std::fill(held, held + 3, -1);
  }
  const float* row(int64_t img, int64_t iy) {
    const int64_t key = img * H + iy, slot = iy % 3;
    float* dst = rows.data() + slot * Wc * Cm;
    if (held[slot] != key) {  // y row = x row (Wc x Cin) @ wpw (Cin x Cm)
      const float* src = xp + (key * W + x0) * ldx;
      if (norm) {
        norm.apply(src, ldx, Wc, Cin, normed.data());
        gemm_block(normed.data(), Cin, Wc, wp, Cm, Cin, dst, Cm, Cm, false);
      } else {
        gemm_block(src, ldx, Wc, wp, Cm, Cin, dst, Cm, Cm, false);
      }
      held[slot] = key;
    }
    return dst;
  }
};

// Column strips of a wide map for the row-ring passes (pw_dwconv, distill_chain): a full row's rings outgrow the
// L2 cache on a photo's tile (pw_dwconv, AGDN's FFN: 136 ns/px at 768 columns, 119 at 176). Strip i of n holds
// columns [W i / n, W (i + 1) / n); one strip where the map is narrow enough.
constexpr int64_t kStripColumns = 176;
inline int64_t column_strips(int64_t W, int64_t target, int64_t halo) {
  return W <= target + 2 * halo ? 1 : (W + target - 1) / target;
}
// A strip's columns [x0, x1) of a map W wide, and the columns it is computed over: [xs, xs + Ws), `halo` more on
// each side that is not the map's edge
struct ColumnSpan {
  int64_t x0, x1, xs, Ws;
  ColumnSpan(int64_t x0, int64_t x1, int64_t W, int64_t halo)
      : x0(x0), x1(x1), xs(std::max<int64_t>(0, x0 - halo)), Ws(std::min(W, x1 + halo) - xs) {}
  // strip i of n equal ones
  static ColumnSpan nth(int64_t i, int64_t n, int64_t W, int64_t halo) {
    return ColumnSpan(W * i / n, W * (i + 1) / n, W, halo);
  }
};

void pw_dwconv(const Tensor& x, int64_t images, int64_t H, int64_t W, const Tensor& wpw, int64_t conv_off,
               const Tensor& weight, const std::optional<Tensor>& bias, bool reflect,
               const std::optional<Tensor>& residual, int64_t act, int64_t mode, Tensor out,
               const std::optional<Tensor>& side_bias, const std::optional<Tensor>& side_out,
               const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias, double ln_eps,
               const std::optional<Tensor>& epi_w, const std::optional<Tensor>& epi_out) {
  check_map(x, "x");
  const bool epi = epi_w.has_value() && epi_w->defined();
  if (!epi) check_map(out, "out");
  TORCH_CHECK(wpw.is_contiguous() && wpw.dim() == 2 && wpw.size(0) == x.size(1), "wpw: (Cin, Cm)");
  const RowNorm norm = row_norm(ln_weight, ln_bias, ln_eps, x.size(1));
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == 9, "weight: (9, C + 16) expected");
  const int64_t Cin = x.size(1), Cm = wpw.size(1);
  const int64_t C = (mode == 0) ? out.size(1) : 2 * out.size(1);
  const int64_t side_c = side_out.has_value() && side_out->defined() ? side_out->size(1) : 0;
  TORCH_CHECK(conv_off + C <= Cm && side_c <= Cm && C + kLanes <= weight.size(1) && C <= kMaxChannels,
              "channel count mismatch");
  TORCH_CHECK(x.size(0) == images * H * W && (epi || out.size(0) == images * H * W), "pixel count mismatch");
  const float* res = opt_ptr(residual);
  if (res) check_map(*residual, "residual");
  if (side_c) check_map(*side_out, "side_out");
  TORCH_CHECK(act != kGeluRes || (res && mode == 0), "act GELU-then-residual needs a residual, mode 0");
  // epilogue: each finished output row (out.size(1) channels, in a thread's row buffer; `out` only gives the
  // width) times epi_w (out.size(1) x Cm2, zero columns past epi_out's) is added to epi_out's row
  const int64_t Co = out.size(1);
  float* eo = nullptr;
  int64_t lde = 0, Ce = 0, Cm2 = 0;
  const float* ew = nullptr;
  if (epi) {
    TORCH_CHECK(epi_out.has_value() && !res && !side_c, "epilogue: epi_out, and no residual or side output");
    check_map(*epi_out, "epi_out");
    TORCH_CHECK(epi_w->is_contiguous() && epi_w->dim() == 2 && epi_w->size(0) == Co &&
                    epi_out->size(0) == images * H * W && epi_out->size(1) <= epi_w->size(1),
                "epilogue: epi_w (out channels, >= epi_out's), epi_out (pixels, C)");
    eo = epi_out->data_ptr<float>();
    lde = epi_out->stride(0);
    Ce = epi_out->size(1);
    Cm2 = epi_w->size(1);
    ew = epi_w->const_data_ptr<float>();
  }
  DwArgs base{nullptr, weight.const_data_ptr<float>(), opt_ptr(bias), res, out.data_ptr<float>(),
              nullptr, opt_ptr(side_bias), side_c ? side_out->data_ptr<float>() : nullptr, nullptr,
              H, W, H, W, C, C / 2, side_c, Cm, weight.size(1), res ? residual->stride(0) : 0, out.stride(0), Cm,
              side_c ? side_out->stride(0) : 0, 1, act, mode, reflect};
  const float* xp = x.const_data_ptr<float>();
  const float* wp = wpw.const_data_ptr<float>();
  const int64_t ldx = x.stride(0);
  TORCH_CHECK(Cm < (1 << 30) && W < (1 << 30) && ldx < (1 << 30), "too large for BLAS int");
  struct Buffers {  // a thread's row buffers besides its ring
    std::vector<float> zero_row, out_row;
  };
  // a wide map in column strips (`column_strips`), each computed over one more column on each inner side (the
  // depthwise conv's reach): tasks strip-major, so that a thread's consecutive rows share their ring's rows
  const int64_t strips = column_strips(W, kStripColumns, 1), rows_all = images * H;
  parallel_rows(strips * rows_all, [&] {
    auto ring = std::make_shared<GemmRowRing>(xp, ldx, H, W, Cin, wp, Cm, norm);
    auto buf = std::make_shared<Buffers>();
    buf->zero_row.assign((W + 2) * Cm + kLanes, 0.0f);
    if (epi) buf->out_row.assign(W * Co + kLanes, 0.0f);
    return [&, ring, buf](int64_t task) {
      const int64_t strip = task / rows_all, row = task % rows_all, img = row / H, oy = row % H;
      // output columns [x0, x1), from the ring's columns [xs, xs + Ws): a map of Ws columns from here on
      const ColumnSpan span = ColumnSpan::nth(strip, strips, W, 1);
      const int64_t x0 = span.x0, x1 = span.x1, xs = span.xs, Ws = span.Ws;
      ring->columns(xs, Ws);
      const float* src[3];
      for (int k = 0; k < 3; ++k) {
        const int64_t iy = tap_index(oy, k, 1, H, reflect);
        src[k] = iy < 0 ? nullptr : ring->row(img, iy) + conv_off;
      }
      DwArgs args = base;
      args.W = args.Wo = Ws;
      args.x_begin = x0 - xs, args.x_end = x1 - xs;
      args.zero_row = buf->zero_row.data();
      const int64_t first = row * W + xs;  // the map's pixel at the strip's column 0
      args.side = ring->row(img, oy);      // columns [0, side_c) of this row of y
      if (args.side_o) args.side_o += first * args.ldso;
      if (args.res) args.res += first * args.ldr;
      if (epi) args.op = buf->out_row.data(), args.ldo = Co;
      else args.op += first * args.ldo;
      dw_one_row(args, src, 0);
      if (epi)
        gemm_block(buf->out_row.data() + (x0 - xs) * Co, Co, x1 - x0, ew, Cm2, Co, eo + (row * W + x0) * lde, lde,
                   Ce, true);
    };
  });
}

// AGDN's distillation, three pw_dwconv passes, c4 and c5, in one pass over the map that keeps the r maps in a few
// rows per thread instead of writing and reading them whole (on a photo's tile they stream from memory):
//   stage k = 1..3: y = r_{k-1} @ wpw[k] (r_0 = u), r_k = GELU(dw(y[:, dc:]) + dw_bias[k] + r_{k-1}) (reflect),
//                   distilled[:, (k-1) dc : k dc] = GELU(y[:, :dc] + side_bias[k])
//   c4: distilled[:, 3 dc:] = GELU(pair sums of dw(r_3) + c4_bias) (zero padding)
//   c5: z = distilled @ c5_wt (without its bias)
// exactly as the separate pw_dwconv, dwconv3x3 and gemm calls compute them, row by row (the same row functions
// on the same inputs: bit-identical). Neither the r maps nor `distilled` reach memory, only z. Each thread runs a contiguous share of an image's rows as a wavefront:
// stage k's row t - k + 1 as stage 1 makes row t, each stage's rows in a ring of four and its GEMM rows in a
// ring of three, `distilled` rows in a ring of four; the first rows of a share are recomputed from three rows
// above it (reflect at the image's edges, as the separate passes).
// A wide map runs as column strips of about `strip` columns (0: kStripColumns), one after the other: the rings
// of a full row of a photo's tile (5.6 KB a column) outgrow the L2 cache, and the pass ran 1.21x slower per pixel
// at 688 columns than at 128. Each strip computes kDistillHalo more columns on each side that is not the map's
// edge: its four 3x3 convs in a row (r_1..r_3, c4) see a false edge there and spread its error one column each,
// so the halo's last column is exact again, and only the strip's own columns of z are written.
constexpr int64_t kDistillHalo = 4;

void distill_chain(const Tensor& u, int64_t images, int64_t H, int64_t W, std::vector<Tensor> wpw, int64_t dc,
                   std::vector<Tensor> taps, std::vector<Tensor> dw_bias, std::vector<Tensor> side_bias,
                   const Tensor& c4_taps, const Tensor& c4_bias, const Tensor& c5_wt, Tensor z, int64_t strip) {
  check_map(u, "u");
  check_map(z, "z");
  const int64_t C = u.size(1), ldu = u.stride(0), ldd = 4 * dc, ldz = z.stride(0);
  TORCH_CHECK(wpw.size() == 3 && taps.size() == 3 && dw_bias.size() == 3 && side_bias.size() == 3,
              "three stages expected");
  TORCH_CHECK(u.size(0) == images * H * W && z.size(0) == u.size(0) && 2 * dc == C && C <= kMaxChannels,
              "distill_chain shapes");
  TORCH_CHECK(c5_wt.is_contiguous() && c5_wt.dim() == 2 && c5_wt.size(0) == 2 * C && c5_wt.size(1) % 16 == 0 &&
              c5_wt.size(1) >= z.size(1), "c5_wt: (2C, Cm) with Cm a multiple of 16");
  for (int k = 0; k < 3; ++k)
    TORCH_CHECK(wpw[k].is_contiguous() && wpw[k].size(0) == C && wpw[k].size(1) == wpw[0].size(1) &&
                    wpw[k].size(1) >= dc + C && taps[k].is_contiguous() && taps[k].size(0) == 9 &&
                    taps[k].size(1) >= C + kLanes,
                "distill_chain weights");
  TORCH_CHECK(c4_taps.is_contiguous() && c4_taps.size(0) == 9 && c4_taps.size(1) >= C + kLanes, "c4 taps");
  TORCH_CHECK(strip >= 0, "distill_chain: strip >= 0");
  const int64_t Cm = wpw[0].size(1);
  TORCH_CHECK(Cm < (1 << 30) && W < (1 << 30) && ldu < (1 << 30), "too large for BLAS int");
  const float* up = u.const_data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H)));
  // strips of equal width: one where the map is narrow enough that a strip would be mostly halo
  const int64_t strips = column_strips(W, strip > 0 ? strip : kStripColumns, kDistillHalo);
  const int64_t Wmax = std::min(W, (W + strips - 1) / strips + 2 * kDistillHalo);
  at::parallel_for(0, images * threads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> gemm_rows(3 * 3 * Wmax * Cm + kLanes, 0.0f);  // per stage: three rows of y
    std::vector<float> r_rows(3 * 4 * Wmax * C + kLanes, 0.0f);      // per stage: four rows of r_k
    std::vector<float> d_rows(4 * Wmax * ldd + kLanes, 0.0f);        // four rows of `distilled`
    const std::vector<float> zero_row((Wmax + 2) * std::max(Cm, C) + kLanes, 0.0f);
    for (int64_t task = first; task < last; ++task) {
      const int64_t img = task / threads, share = task % threads;
      const int64_t a = H * share / threads, b = H * (share + 1) / threads;  // c4 rows of this share
      if (a >= b) continue;
      for (int64_t strip_i = 0; strip_i < strips; ++strip_i) {
        // z's columns [x0, x1), computed over [xs, xs + Ws): the strip is a map of Ws columns from here on
        const ColumnSpan span = ColumnSpan::nth(strip_i, strips, W, kDistillHalo);
        const int64_t x0 = span.x0, x1 = span.x1, xs = span.xs, Ws = span.Ws;
        int64_t y_held[3][3], r_held[3][4];
        for (auto& s : y_held) std::fill(s, s + 3, -1);
        for (auto& s : r_held) std::fill(s, s + 4, -1);
        auto r_row = [&](int k, int64_t iy) -> float* { return r_rows.data() + (k * 4 + iy % 4) * Ws * C; };
        auto d_row = [&](int64_t iy) -> float* { return d_rows.data() + (iy % 4) * Ws * ldd; };
        // row iy of stage k's input: u from the map, r_{k-1} from its ring (it must be there)
        auto input_row = [&](int k, int64_t iy) -> const float* {
          if (k == 0) return up + ((img * H + iy) * W + xs) * ldu;
          TORCH_CHECK(r_held[k - 1][iy % 4] == iy, "distill_chain: row not held");
          return r_row(k - 1, iy);
        };
        auto y_row = [&](int k, int64_t iy) -> const float* {
          float* dst = gemm_rows.data() + (k * 3 + iy % 3) * Ws * Cm;
          if (y_held[k][iy % 3] != iy) {
            gemm_block(input_row(k, iy), k == 0 ? ldu : C, Ws, wpw[k].const_data_ptr<float>(), Cm, C, dst, Cm, Cm,
                       false);
            y_held[k][iy % 3] = iy;
          }
          return dst;
        };
        // stage k's row oy: r_k into its ring; d_k into `distilled` when the row is this share's
        auto stage = [&](int k, int64_t oy) {
          const float* src[3];
          for (int t = 0; t < 3; ++t) src[t] = y_row(k, tap_index(oy, t, 1, H, true)) + dc;
          const bool own = oy >= a && oy < b;
          const float* y = y_row(k, oy);
          DwArgs args{nullptr, taps[k].const_data_ptr<float>(), dw_bias[k].const_data_ptr<float>(),
                      input_row(k, oy), r_row(k, oy), own ? y : nullptr, side_bias[k].const_data_ptr<float>(),
                      d_row(oy) + k * dc, zero_row.data(), H, Ws, H, Ws, C, C / 2, own ? dc : 0,
                      Cm, taps[k].size(1), k == 0 ? ldu : C, C, Cm, ldd, 1, kGelu, 0, true};
          dw_one_row(args, src);
          r_held[k][oy % 4] = oy;
        };
        auto c4 = [&](int64_t oy) {
          const float* src[3];
          for (int t = 0; t < 3; ++t) {
            const int64_t iy = tap_index(oy, t, 1, H, false);
            if (iy >= 0) TORCH_CHECK(r_held[2][iy % 4] == iy, "distill_chain: r3 row not held");
            src[t] = iy < 0 ? nullptr : r_row(2, iy);
          }
          DwArgs args{nullptr, c4_taps.const_data_ptr<float>(), c4_bias.const_data_ptr<float>(), nullptr,
                      d_row(oy) + 3 * dc, nullptr, nullptr, nullptr, zero_row.data(), H, Ws, H, Ws,
                      C, C / 2, 0, C, c4_taps.size(1), 0, ldd, 0, 0, 1, kGelu, 2, false};
          dw_one_row(args, src);
          gemm_block(d_row(oy) + (x0 - xs) * ldd, ldd, x1 - x0, c5_wt.const_data_ptr<float>(), c5_wt.size(1),
                     2 * C, zp + ((img * H + oy) * W + x0) * ldz, ldz, z.size(1), false);
        };
        // stage k (0-based) makes the rows within 3 - k of the share; c4 the share's own
        for (int64_t t = a - 3; t < b + 3; ++t) {  // the last step makes c4's row b - 1
          for (int k = 0; k < 3; ++k) {
            const int64_t oy = t - k;  // a stage runs one row behind the one before it
            if (oy >= std::max<int64_t>(0, a - 3 + k) && oy < std::min(H, b + 3 - k)) stage(k, oy);
          }
          const int64_t oy = t - 3;
          if (oy >= a && oy < b) c4(oy);
        }
      }
    }
  });
}

// 3x3 depthwise conv on a map, stride 1 or 2, zero or reflect padding of 1, then in this order: + bias,
// + residual, activation. `weight` is (9, C + 16) tap-major (row ky*3+kx), zero beyond C.
//   mode 0: out[c] = act(conv[c] + bias[c] + res[c])                      (out has C channels)
//   mode 1 (gate): out[c] = gelu(conv[c]) * conv[c + C/2]                 (out has C/2 channels)
//   mode 2 (pair): out[j] = act(conv[2j] + conv[2j+1] + bias[j])          (out has C/2 channels)
// Pixel-major: each output pixel's channels are finished (epilogue included) while its inputs are in L1.
// side_in/side_bias/side_out (optional, stride 1): a second, pointwise job done in the same pass,
// side_out = GELU(side_in + side_bias) per pixel (AGDN: the distillation branch c{k}_d, whose GEMM output
// sits in the same rows as this conv's input).
void dwconv3x3(const Tensor& x, int64_t images, int64_t H, int64_t W, const Tensor& weight,
               const std::optional<Tensor>& bias, int64_t stride, bool reflect,
               const std::optional<Tensor>& residual, int64_t act, int64_t mode, Tensor out,
               const std::optional<Tensor>& side_in, const std::optional<Tensor>& side_bias,
               const std::optional<Tensor>& side_out) {
  check_map(x, "x");
  check_map(out, "out");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == 9, "weight: (9, C + 16) expected");
  const int64_t C = (mode == 0) ? out.size(1) : 2 * out.size(1);
  TORCH_CHECK(C <= x.size(1) && C + kLanes <= weight.size(1) && C <= kMaxChannels, "channel count mismatch");
  TORCH_CHECK(stride == 1 || stride == 2, "stride 1 or 2");
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  TORCH_CHECK(x.size(0) == images * H * W && out.size(0) == images * Ho * Wo, "pixel count mismatch");
  const float* res = opt_ptr(residual);
  if (res) check_map(*residual, "residual");
  const int64_t ldr = res ? residual->stride(0) : 0;
  TORCH_CHECK(act != kGeluRes || (res && mode == 0), "act GELU-then-residual needs a residual, mode 0");
  const float* b = opt_ptr(bias);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0), ldw = weight.size(1);
  const int64_t G = C / 2;  // output channels in modes 1 and 2
  const float* side = opt_ptr(side_in);
  const float* side_b = opt_ptr(side_bias);
  float* side_o = side ? side_out->data_ptr<float>() : nullptr;
  const int64_t lds = side ? side_in->stride(0) : 0, ldso = side ? side_out->stride(0) : 0;
  const int64_t CS = side ? side_in->size(1) : 0;
  TORCH_CHECK(!side || (stride == 1 && side_out.has_value() && side_out->size(1) == CS && side_out->stride(1) == 1 &&
                        side_in->stride(1) == 1), "side job: stride 1, matching (pixels, channels) maps");
  const std::vector<float> zero_row((W + 2) * ldx + kLanes, 0.0f);  // stands in for zero-padded rows
  const DwArgs args{xp, wp, b, res, op, side, side_b, side_o, zero_row.data(), H, W, Ho, Wo, C, G, CS, ldx, ldw, ldr,
                    ldo, lds, ldso, stride, act, mode, reflect};
  parallel_rows(images * Ho, [&] { return [&](int64_t row) { dw_rows(args, row, row + 1); }; });
}

// LayerNorm over the C channels of one pixel held in vectors v[0..nv) (lanes beyond C are zero), written
// to dst: biased variance, eps inside the square root
ALWAYS_INLINE void layer_norm_pixel(const Vec* v, int64_t C, const float* w, const float* b, double eps, float* dst) {
  const int64_t nv = (C + kLanes - 1) / kLanes;
  Vec s(0.0f);
  for (int64_t j = 0; j < nv; ++j) s = s + v[j];
  const float mean = hsum(s) / C;
  const Vec m(mean);
  Vec q(0.0f);
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t n = std::min(kLanes, C - j * kLanes);
    Vec d = v[j] - m;
    if (n < kLanes) d = Vec::set(Vec(0.0f), d, n);
    q = at::vec::fmadd(d, d, q);
  }
  const Vec rstd(1.0f / std::sqrt(hsum(q) / C + static_cast<float>(eps)));
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t n = std::min(kLanes, C - j * kLanes);
    store(at::vec::fmadd((v[j] - m) * rstd, load(w + j * kLanes, n), load(b + j * kLanes, n)), dst + j * kLanes, n);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The four horizontal sums [sum(s0), sum(s1), sum(s2), sum(s3)], repeated in every 128-bit lane: one shuffle
// tree for four pixels instead of one per pixel
ALWAYS_INLINE __m512 hsum4(__m512 s0, __m512 s1, __m512 s2, __m512 s3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(s0, s1), _mm512_unpackhi_ps(s0, s1));  // a b a b
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(s2, s3), _mm512_unpackhi_ps(s2, s3));  // c d c d
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));  // a b c d per lane
  const __m512 u = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
}

// Element k of each 128-bit lane, everywhere
template <int K>
ALWAYS_INLINE __m512 lane_broadcast(__m512 x) { return _mm512_shuffle_ps(x, x, K * 0x55); }

// layer_norm_pixel for four pixels at once, v[u][j] (lanes at and beyond C zero), the statistics as vectors
// of four (the per-pixel version's scalar chain of sums, division and square root was ~40% of cell_apply);
// writes pixels u < count to dst + u * ld
template <int NV>
ALWAYS_INLINE void layer_norm_4(const Vec (*v)[NV], int count, int64_t C, const float* w, const float* b, double eps,
                                float* dst, int64_t ld) {
  const __mmask16 last = lane_mask(C - (NV - 1) * kLanes);
  __m512 s[4];
  for (int u = 0; u < 4; ++u) {
    s[u] = v[u][0];
    for (int j = 1; j < NV; ++j) s[u] = _mm512_add_ps(s[u], v[u][j]);
  }
  const __m512 cs = _mm512_set1_ps(static_cast<float>(C));
  const __m512 mean = _mm512_div_ps(hsum4(s[0], s[1], s[2], s[3]), cs);
  const __m512 m[4] = {lane_broadcast<0>(mean), lane_broadcast<1>(mean), lane_broadcast<2>(mean),
                       lane_broadcast<3>(mean)};
  __m512 d[4][NV], q[4];
  for (int u = 0; u < 4; ++u) {
    q[u] = _mm512_setzero_ps();
    for (int j = 0; j < NV; ++j) {
      d[u][j] = j == NV - 1 ? _mm512_maskz_sub_ps(last, v[u][j], m[u]) : _mm512_sub_ps(v[u][j], m[u]);
      q[u] = _mm512_fmadd_ps(d[u][j], d[u][j], q[u]);
    }
  }
  const __m512 var = _mm512_add_ps(_mm512_div_ps(hsum4(q[0], q[1], q[2], q[3]), cs),
                                   _mm512_set1_ps(static_cast<float>(eps)));
  const __m512 rstd = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(var));
  const __m512 r[4] = {lane_broadcast<0>(rstd), lane_broadcast<1>(rstd), lane_broadcast<2>(rstd),
                       lane_broadcast<3>(rstd)};
  for (int u = 0; u < count; ++u)
    for (int j = 0; j < NV; ++j) {
      const __mmask16 mk = j == NV - 1 ? last : __mmask16(0xFFFF);
      const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(d[u][j], r[u]), _mm512_maskz_loadu_ps(mk, w + j * kLanes),
                                       _mm512_maskz_loadu_ps(mk, b + j * kLanes));
      _mm512_mask_storeu_ps(dst + u * ld + j * kLanes, mk, y);
    }
}
#endif

// out = act(x + bias) (bias optional): an elementwise epilogue for a GEMM written without its bias
void bias_act(const Tensor& x, const std::optional<Tensor>& bias, int64_t act, Tensor out) {
  check_map(x, "x");
  check_map(out, "out");
  const int64_t P = x.size(0), C = x.size(1), ldx = x.stride(0), ldo = out.stride(0);
  TORCH_CHECK(out.size(0) == P && out.size(1) == C, "shape mismatch");
  const float* b = opt_ptr(bias);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t n = std::min(kLanes, C - c0);
        Vec s = load(xp + p * ldx + c0, n);
        if (b) s = s + load(b + c0, n);
        if (act == kGelu) s = gelu(s);
        store(s, op + p * ldo + c0, n);
      }
    }
  });
}

// RCCA statistics: g[p] = GELU(t[p] . w + b) (the decompose branch), and per channel the sums of (t - shift)
// and (t - shift)^2 in float64 over all pixels of each image, shift = the image's first pixel (a shifted
// sum keeps the variance free of cancellation). sums: (images, 2, C) float64.
void rcca_stats(const Tensor& t, int64_t images, const Tensor& w, double b, Tensor g, Tensor sums) {
  check_map(t, "t");
  const int64_t P = t.size(0), C = t.size(1), ldt = t.stride(0), per_image = P / images;
  TORCH_CHECK(C <= kMaxChannels && P % images == 0, "shape mismatch");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.numel() == images * 2 * C,
              "sums: (images, 2, C) float64");
  const float* tp = t.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* gp = g.data_ptr<float>();
  double* sp = sums.data_ptr<double>();
  std::fill(sp, sp + images * 2 * C, 0.0);
  for (int64_t img = 0; img < images; ++img) {
    const float* shift = tp + img * per_image * ldt;
    const int64_t lo = img * per_image, hi = lo + per_image;
    const int64_t chunk = 512;
    const int64_t chunks = (per_image + chunk - 1) / chunk;
    std::vector<double> partial(chunks * 2 * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      alignas(64) float s1[kMaxChannels + 64], s2[kMaxChannels + 64];
      for (int64_t ch = cb; ch < ce; ++ch) {
        std::fill(s1, s1 + C + kLanes, 0.0f);
        std::fill(s2, s2 + C + kLanes, 0.0f);
        const int64_t p0 = lo + ch * chunk, p1 = std::min(hi, p0 + chunk);
        for (int64_t p = p0; p < p1; ++p) {
          const float* src = tp + p * ldt;
          Vec dot(0.0f);
          for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
            const int64_t n = std::min(kLanes, C - c0);
            Vec v = load(src + c0, n);
            Vec d = v - load(shift + c0, n);
            if (n < kLanes) {
              v = Vec::set(Vec(0.0f), v, n);
              d = Vec::set(Vec(0.0f), d, n);
            }
            dot = at::vec::fmadd(v, load(wp + c0, n), dot);
            (Vec::loadu(s1 + c0) + d).store(s1 + c0);
            at::vec::fmadd(d, d, Vec::loadu(s2 + c0)).store(s2 + c0);
          }
          gp[p] = hsum(dot) + static_cast<float>(b);
        }
        double* dst = partial.data() + ch * 2 * C;
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = s1[c];
          dst[C + c] = s2[c];
        }
      }
    });
    double* out = sp + img * 2 * C;
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t c = 0; c < 2 * C; ++c) out[c] += partial[ch * 2 * C + c];
  }
  // GELU of the decompose values, vectorised
  at::parallel_for(0, P, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p += kLanes) {
      const int64_t n = std::min(kLanes, end - p);
      store(gelu(load(gp + p, n)), gp + p, n);
    }
  });
}

// RCCA's channel weights from rcca_stats' sums: per image, x = std + mean over its pixels (population std),
// then sigmoid(du2 @ relu(du0 @ x + b0) + b2) (conv_du, two 1x1 convs on a 1x1 map). t: the map the sums came
// from (its first pixel per image is the shift). du0: (hidden, C), du2: (C, hidden). out: (images, C) float32.
void rcca_weight(const Tensor& t, const Tensor& sums, int64_t images, const Tensor& du0, const Tensor& b0,
                 const Tensor& du2, const Tensor& b2, Tensor out) {
  const int64_t P = t.size(0), C = t.size(1), per_image = P / images, hidden = du0.size(0);
  TORCH_CHECK(du0.is_contiguous() && du2.is_contiguous() && du2.size(0) == C && du2.size(1) == hidden &&
              out.is_contiguous() && out.numel() == images * C && hidden <= 64, "rcca_weight shapes");
  const double* sp = sums.const_data_ptr<double>();
  const float* tp = t.const_data_ptr<float>();
  const float *w0 = du0.const_data_ptr<float>(), *w2 = du2.const_data_ptr<float>();
  const float *c0 = b0.const_data_ptr<float>(), *c2 = b2.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<float> x(C);
  for (int64_t img = 0; img < images; ++img) {
    const float* shift = tp + img * per_image * t.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      const double m1 = sp[(img * 2) * C + c] / per_image, m2 = sp[(img * 2 + 1) * C + c] / per_image;
      x[c] = static_cast<float>(std::sqrt(std::max(m2 - m1 * m1, 0.0)) + (shift[c] + m1));
    }
    float h[64];
    for (int64_t j = 0; j < hidden; ++j) {
      float a = c0[j];
      for (int64_t c = 0; c < C; ++c) a += w0[j * C + c] * x[c];
      h[j] = std::max(a, 0.0f);
    }
    for (int64_t c = 0; c < C; ++c) {
      float a = c2[c];
      for (int64_t j = 0; j < hidden; ++j) a += w2[c * hidden + j] * h[j];
      op[img * C + c] = 1.0f / (1.0f + std::exp(-a));
    }
  }
}

// n <= kd floats at p as doubles, and their squares rounded to float32 first, as doubles (zeros past n)
ALWAYS_INLINE void floats_as_doubles(const float* p, int64_t n, at::vec::Vectorized<double>& v,
                                     at::vec::Vectorized<double>& sq) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256 f = _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), p);
  v = _mm512_cvtps_pd(f);
  sq = _mm512_cvtps_pd(_mm256_mul_ps(f, f));
#else
  const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3));
  const __m128 f = _mm_maskload_ps(p, m);
  v = _mm256_cvtps_pd(f);
  sq = _mm256_cvtps_pd(_mm_mul_ps(f, f));
#endif
}

// a vector of doubles rounded to float32, stored (8 floats under AVX-512, 4 under AVX2)
ALWAYS_INLINE void store_as_floats(const at::vec::Vectorized<double>& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_ps(p, _mm512_cvtpd_ps(v));
#else
  _mm_storeu_ps(p, _mm256_cvtpd_ps(v));
#endif
}

// Vectors of doubles whose window sums one call of local_sums_group keeps in registers (two accumulators each)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kLocalGroup = 6;
#else
constexpr int64_t kLocalGroup = 3;
#endif

// rcca_local_weight's sliding pass over one row for `count` (<= kLocalGroup) vectors of channels (the first
// `left` channels valid): per column x, column x + r's vertical sums (a1, a2; ldv apart) take the entering row
// (in) and lose the leaving one (out), then the horizontal window sums slide along x and their means (times
// inv[x]) go to m1, m2 (ldr apart) as floats. Every channel sees the same operations in the same order as one
// vector at a time would give it.
ALWAYS_INLINE void local_sums_group(double* a1, double* a2, const float* in, const float* out, int64_t ldt,
                                    int64_t ldv, int64_t count, int64_t left, int64_t W, int64_t r,
                                    const double* inv, float* m1, float* m2, int64_t ldr) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t kd = VecD::size();
  int64_t n[kLocalGroup];
  for (int k = 0; k < kLocalGroup; ++k) n[k] = std::max<int64_t>(0, std::min(kd, left - k * kd));
  VecD s1[kLocalGroup], s2[kLocalGroup];
#pragma GCC unroll 8
  for (int k = 0; k < kLocalGroup; ++k) s1[k] = VecD(0.0), s2[k] = VecD(0.0);
  auto update = [=, &s1, &s2](int64_t x) __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int k = 0; k < kLocalGroup; ++k) {
      if (k >= count) break;
      VecD a = VecD::loadu(a1 + x * ldv + k * kd), b = VecD::loadu(a2 + x * ldv + k * kd);
      if (in) {
        VecD t1, t2;
        floats_as_doubles(in + x * ldt + k * kd, n[k], t1, t2);
        a = a + t1, b = b + t2;
      }
      if (out) {
        VecD t1, t2;
        floats_as_doubles(out + x * ldt + k * kd, n[k], t1, t2);
        a = a - t1, b = b - t2;
      }
      a.store(a1 + x * ldv + k * kd);
      b.store(a2 + x * ldv + k * kd);
      s1[k] = s1[k] + a, s2[k] = s2[k] + b;
    }
  };
  for (int64_t x = 0; x < std::min(r, W); ++x) update(x);
  for (int64_t x = 0; x < W; ++x) {
    if (x + r < W) update(x + r);
    const VecD f(inv[x]);
#pragma GCC unroll 8
    for (int k = 0; k < kLocalGroup; ++k) {
      if (k >= count) break;
      if (x - r - 1 >= 0)
        s1[k] = s1[k] - VecD::loadu(a1 + (x - r - 1) * ldv + k * kd),
        s2[k] = s2[k] - VecD::loadu(a2 + (x - r - 1) * ldv + k * kd);
      store_as_floats(s1[k] * f, m1 + x * ldr + k * kd);
      store_as_floats(s2[k] * f, m2 + x * ldr + k * kd);
    }
  }
}

// RCCA's output for a vector of channels, z + t * (sigma + w) - sigma * g, spelled as two FMAs: the compiler
// contracts a product and a sum into an FMA or not by context, and two kernels must give the same bits
ALWAYS_INLINE Vec rcca_output(Vec z, Vec t, Vec sigma, Vec w, Vec g) {
  return at::vec::fmadd(Vec(0.0f) - sigma, g, at::vec::fmadd(t, sigma + w, z));
}

// RCCA's channel weights with local statistics (tiles): per pixel and channel, mean and E[t^2] over the
// size x size window centred on the pixel, clipped at the map's border (as layers.box_mean: sums in float64,
// t^2 rounded to float32 first, both means rounded to float32, then std = sqrt(max(E[t^2] - mean^2, 0)) in
// float32), x = std + mean, then conv_du per pixel. out: (pixels, C) float32.
// Box sums: per thread, running vertical sums of t and t^2 per (column, channel) over the rows of the current
// output row's window, and a horizontal sliding sum of those along the row, in one pass over them per row: a
// column's vertical sums take the row entering the window and lose the one leaving it just before the
// horizontal window reaches the column. The window's values are floats and t^2 is rounded to
// float32 first, so the float64 sums are exact unless a window's values span over ~2^17 in magnitude: then the
// result is still the same for any band split (each band re-sums its first window). The row's x = std + mean
// stays in a thread's row buffer, and conv_du and the sigmoid run on it before the next row: one write of out.
// Those steps are shared by rcca_local_weight (t from a map, the weights out) and rcca_local (t made as needed,
// RCCA's output out): each thread reads t through `make_t_rows()`, an accessor (image, row) -> the row (pixels
// ldt floats apart); with `combine`, op gets z + t * (sigma + w) - sigma * g (z read at zp) with
// g = GELU(t . dec_w + dec_b), the bits of rcca_stats' g and rcca_combine, and neither reaches memory.
template <class MakeTRows>
void local_weight_rows(MakeTRows&& make_t_rows, int64_t ldt, int64_t images, int64_t H, int64_t W, int64_t C,
                       int64_t r, const Tensor& du0, const Tensor& b0, const Tensor& du2, const Tensor& b2,
                       bool combine, const float* zp, int64_t ldz, const float* dw, double dec_b, const float* sg,
                       float* op, int64_t ldo) {
  const int64_t hidden = du0.size(0);
  TORCH_CHECK(hidden <= 64 && du0.is_contiguous() && du2.is_contiguous() && C <= kMaxChannels, "conv_du shapes");
  const float *w0 = du0.const_data_ptr<float>(), *w2 = du2.const_data_ptr<float>();
  const float *c0 = b0.const_data_ptr<float>(), *c2 = b2.const_data_ptr<float>();
  std::vector<float> w2t(hidden * (C + kLanes), 0.0f);  // du2 transposed: row j = weights of hidden unit j
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < hidden; ++j) w2t[j * (C + kLanes) + c] = w2[c * hidden + j];
  using VecD = at::vec::Vectorized<double>;
  const int64_t kd = VecD::size();
  const int64_t ldr = (C + kLanes - 1) / kLanes * kLanes;  // row buffers: whole vectors per pixel
  const int64_t ldv = (C + kd - 1) / kd * kd;              // vertical sums: whole double vectors per column
  TORCH_CHECK(ldv <= ldr, "rcca_local_weight layout");
  at::parallel_for(0, images * H, 16, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<double> sums;  // reused across calls: no fresh pages per call
    static thread_local std::vector<float> rows_buf;
    sums.resize(2 * W * ldv + W);
    rows_buf.resize(2 * W * ldr + W + kLanes);
    double* __restrict v1 = sums.data();  // vertical sums of t, (column, channel)
    double* __restrict v2 = v1 + W * ldv;   // and of t^2
    double* __restrict inv = v2 + W * ldv;  // 1 / window size, per column
    float* __restrict xr = rows_buf.data();  // the row's window means, then x = std + mean, in place
    float* __restrict sq = xr + W * ldr;     // the row's window means of t^2
    auto t_row = make_t_rows();  // this thread's rows of t
    auto add_row = [&](int64_t img, int64_t y, double sign) {
      const float* src = t_row(img, y);
      for (int64_t x = 0; x < W; ++x) {
        const float* __restrict v = src + x * ldt;
        double* __restrict s1 = v1 + x * ldv;
        double* __restrict s2 = v2 + x * ldv;
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += sign * static_cast<double>(v[c]);
          s2[c] += sign * static_cast<double>(v[c] * v[c]);
        }
      }
    };
    int64_t current_img = -1, lo = 0, hi = 0;  // rows [lo, hi) of current_img are in v1, v2
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / H, y = row % H;
      const int64_t want_lo = std::max<int64_t>(0, y - r), want_hi = std::min(H, y + r + 1);
      if (img != current_img) {  // start of a band (or of an image within it): sum the window's rows afresh
        current_img = img;
        std::fill(v1, v1 + 2 * W * ldv, 0.0);  // padding lanes stay zero
        lo = hi = want_lo;
        for (; hi < want_hi; ++hi) add_row(img, hi, 1.0);
      }
      // the row entering the window and the one leaving it (one each at most, after a band's first row),
      // applied column by column inside the sliding pass below
      const float* enter = nullptr;
      const float* leave = nullptr;
      if (hi < want_hi) enter = t_row(img, hi++);
      if (lo < want_lo) leave = t_row(img, lo++);
      for (; hi < want_hi; ++hi) add_row(img, hi, 1.0);  // (not reached with one row per step)
      for (; lo < want_lo; ++lo) add_row(img, lo, -1.0);
      const double rows = static_cast<double>(hi - lo);
      for (int64_t x = 0; x < W; ++x)
        inv[x] = 1.0 / (rows * static_cast<double>(std::min(W, x + r + 1) - std::max<int64_t>(0, x - r)));
      // kLocalGroup vectors of channels at a time (all of C = 42 under AVX-512), column by column: bring column
      // x + r's vertical sums up to this row, then slide the row's window sums along x in registers; the means
      // go to the row buffers as float32. A column's t values are read once per group, in order along the row.
      for (int64_t c = 0; c < ldv; c += kLocalGroup * kd)
        local_sums_group(v1 + c, v2 + c, enter ? enter + c : nullptr, leave ? leave + c : nullptr, ldt, ldv,
                         std::min<int64_t>(kLocalGroup, (ldv - c) / kd), C - c, W, r, inv, xr + c, sq + c, ldr);
      for (int64_t x = 0; x < W; ++x) {
        float* __restrict mean = xr + x * ldr;
        const float* __restrict e2p = sq + x * ldr;
        for (int64_t c0v = 0; c0v < C; c0v += kLanes) {
          const int64_t n = std::min(kLanes, C - c0v);
          const Vec m = load(mean + c0v, n), e2 = load(e2p + c0v, n);
          store(at::vec::maximum(e2 - m * m, Vec(0.0f)).sqrt() + m, mean + c0v, n);
        }
      }
      // with z: the row's g, as rcca_stats makes it (each pixel's dot, then GELU a vector of pixels at a time)
      float* __restrict g = sq + W * ldr;
      const float* t_cur = t_row(img, y);
      if (combine) {
        for (int64_t x = 0; x < W; ++x) {
          Vec dot(0.0f);
          for (int64_t c0v = 0; c0v < C; c0v += kLanes) {
            const int64_t n = std::min(kLanes, C - c0v);
            Vec v = load(t_cur + x * ldt + c0v, n);
            if (n < kLanes) v = Vec::set(Vec(0.0f), v, n);
            dot = at::vec::fmadd(v, load(dw + c0v, n), dot);
          }
          g[x] = hsum(dot) + static_cast<float>(dec_b);
        }
        for (int64_t x = 0; x < W; x += kLanes) {
          const int64_t n = std::min(kLanes, W - x);
          store(gelu(load(g + x, n)), g + x, n);
        }
      }
      // conv_du (two 1x1 convs) and the sigmoid on the row
      float* dst_row = op + row * W * ldo;
      const float* z_row = combine ? zp + row * W * ldz : nullptr;
      for (int64_t x = 0; x < W; ++x) {
        const float* xv = xr + x * ldr;
        float* dst = dst_row + x * ldo;
        float h[64];
#if defined(CPU_CAPABILITY_AVX512)
        if (hidden == 4) {  // AGDN: the four dot products' sums in one shuffle tree (`hsum4`)
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t c0v = 0; c0v < C; c0v += kLanes) {
            const int64_t n = std::min(kLanes, C - c0v);
            const Vec xc = load(xv + c0v, n);
            for (int j = 0; j < 4; ++j) acc[j] = at::vec::fmadd(xc, load(w0 + j * C + c0v, n), Vec(acc[j]));
          }
          alignas(64) float sums[kLanes];
          _mm512_store_ps(sums, hsum4(acc[0], acc[1], acc[2], acc[3]));
          for (int j = 0; j < 4; ++j) h[j] = std::max(sums[j] + c0[j], 0.0f);
        } else
#endif
        for (int64_t j = 0; j < hidden; ++j) {
          Vec acc(0.0f);
          for (int64_t c0v = 0; c0v < C; c0v += kLanes) {
            const int64_t n = std::min(kLanes, C - c0v);
            acc = at::vec::fmadd(load(xv + c0v, n), load(w0 + j * C + c0v, n), acc);
          }
          h[j] = std::max(hsum(acc) + c0[j], 0.0f);
        }
        for (int64_t c0v = 0; c0v < C; c0v += kLanes) {
          const int64_t n = std::min(kLanes, C - c0v);
          Vec a = load(c2 + c0v, n);
          for (int64_t j = 0; j < hidden; ++j)
            a = at::vec::fmadd(Vec(h[j]), Vec::loadu(w2t.data() + j * (C + kLanes) + c0v), a);
          if (combine) {  // rcca_combine's steps on this pixel
            const Vec w = sigmoid(a);
            store(rcca_output(load(z_row + x * ldz + c0v, n), load(t_cur + x * ldt + c0v, n), load(sg + c0v, n), w,
                              Vec(g[x])),
                  dst + c0v, n);
          } else {
            store(sigmoid(a), dst + c0v, n);
          }
        }
      }
    }
  });
}

// RCCA's channel weights with local statistics (tiles) from a map t: see local_weight_rows. out: (pixels, C).
void rcca_local_weight(const Tensor& t, int64_t images, int64_t H, int64_t W, int64_t size, const Tensor& du0,
                       const Tensor& b0, const Tensor& du2, const Tensor& b2, Tensor out) {
  check_map(t, "t");
  check_map(out, "out");
  const int64_t C = t.size(1), ldt = t.stride(0);
  TORCH_CHECK(t.size(0) == images * H * W && out.size(0) == t.size(0) && out.size(1) == C,
              "rcca_local_weight: t, out (pixels, C)");
  const float* tp = t.const_data_ptr<float>();
  auto map_rows = [&] { return [&](int64_t img, int64_t iy) { return tp + (img * H + iy) * W * ldt; }; };
  local_weight_rows(map_rows, ldt, images, H, W, C, size / 2, du0, b0, du2, b2, false, nullptr, 0, nullptr, 0.0,
                    nullptr, out.data_ptr<float>(), out.stride(0));
}

// RCCA on a tile from its input z, in one pass, into out (not z): t = GELU(dw3x3(z) + bias) (zero padding, as
// dwconv3x3 makes it), then the local statistics, conv_du, g = GELU(t . dec_w + dec_b) and
// out = z + t * (sigma + w) - sigma * g, row by row. t never reaches memory: each thread makes the rows of t it
// needs into a ring of size + 1 rows (a window's rows and the one leaving it) as the window slides down, from
// rows of z that nothing writes during the pass. Bit-identical to dwconv3x3, rcca_stats' g, rcca_local_weight
// and rcca_combine.
void rcca_local(const Tensor& z, int64_t images, int64_t H, int64_t W, int64_t size, const Tensor& taps,
                const Tensor& dw_bias, const Tensor& du0, const Tensor& b0, const Tensor& du2, const Tensor& b2,
                const Tensor& dec_w, double dec_b, const Tensor& sigma, Tensor out) {
  check_map(z, "z");
  check_map(out, "out");
  const int64_t C = z.size(1), ldz = z.stride(0);
  TORCH_CHECK(z.size(0) == images * H * W && out.size(0) == z.size(0) && out.size(1) == C && !z.is_same(out),
              "rcca_local: z, out (pixels, C), not the same map");
  TORCH_CHECK(taps.is_contiguous() && taps.size(0) == 9 && taps.size(1) >= C + kLanes && dw_bias.numel() >= C &&
                  dec_w.numel() >= C && sigma.numel() >= C && size % 2 == 1, "rcca_local weights");
  const float* zp = z.const_data_ptr<float>();
  const int64_t slots = size + 1;
  const std::vector<float> zero_row((W + 2) * ldz + kLanes, 0.0f);
  const DwArgs dw_base{nullptr, taps.const_data_ptr<float>(), dw_bias.const_data_ptr<float>(), nullptr, nullptr,
                       nullptr, nullptr, nullptr, zero_row.data(), H, W, H, W, C, C / 2, 0, ldz, taps.size(1), 0, C,
                       0, 0, 1, kGelu, 0, false};
  struct Ring {
    std::vector<float> rows;
    std::vector<int64_t> held;
  };
  auto ring_rows = [&] {
    auto ring = std::make_shared<Ring>();
    ring->rows.assign(slots * W * C + kLanes, 0.0f);
    ring->held.assign(slots, -1);
    return [&, ring](int64_t img, int64_t iy) -> const float* {
      const int64_t slot = iy % slots;
      float* dst = ring->rows.data() + slot * W * C;
      if (ring->held[slot] != img * H + iy) {
        const float* src[3];
        for (int k = 0; k < 3; ++k) {
          const int64_t sy = tap_index(iy, k, 1, H, false);
          src[k] = sy < 0 ? nullptr : zp + (img * H + sy) * W * ldz;
        }
        DwArgs args = dw_base;
        args.op = dst;
        dw_one_row(args, src);
        ring->held[slot] = img * H + iy;
      }
      return dst;
    };
  };
  local_weight_rows(ring_rows, C, images, H, W, C, size / 2, du0, b0, du2, b2, true, zp, ldz,
                    dec_w.const_data_ptr<float>(), dec_b, sigma.const_data_ptr<float>(), out.data_ptr<float>(),
                    out.stride(0));
}

// RCCA output, in place on z: z + t * (sigma + w) - sigma * g, w per channel of each image (w_ld 0 within an
// image: rows = images) or per pixel (rows = pixels)
void rcca_combine(Tensor z, const Tensor& t, const Tensor& g, const Tensor& sigma, const Tensor& w,
                  int64_t images) {
  check_map(z, "z");
  check_map(t, "t");
  check_map(w, "w");
  const int64_t P = z.size(0), C = z.size(1), ldz = z.stride(0), ldt = t.stride(0), per_image = P / images;
  TORCH_CHECK(C <= kMaxChannels, "too many channels");
  const bool per_pixel = w.size(0) == P;
  TORCH_CHECK(per_pixel || w.size(0) == images, "w: one row per image or per pixel");
  float* zp = z.data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const float* sg = sigma.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const int64_t ldw = w.stride(0);
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* wr = wp + (per_pixel ? p : p / per_image) * ldw;
      const Vec gv(gp[p]);
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t n = std::min(kLanes, C - c0);
        const Vec out = rcca_output(load(zp + p * ldz + c0, n), load(tp + p * ldt + c0, n), load(sg + c0, n),
                                    load(wr + c0, n), gv);
        store(out, zp + p * ldz + c0, n);
      }
    }
  });
}

// MVSA's head in one pass: y = z @ wpw (conv_f | the four branches' pointwise convs, F + 4F columns), the first
// F columns of each row into cf (what mvsa_tail reads), the other 4F through the stride-2 depthwise conv (reflect
// padding, + bias) into s2 at half resolution, as gemm then dwconv3x3 compute them (bit-identical). y exists only
// as three rows per thread: each thread takes a contiguous share of an image's output rows, whose input rows
// 2 oy and 2 oy + 1 it owns (writes their cf).
void mvsa_head(const Tensor& z, int64_t images, int64_t H, int64_t W, const Tensor& wpw, int64_t F, const Tensor& taps,
               const Tensor& bias, Tensor cf, Tensor s2) {
  check_map(z, "z");
  check_map(cf, "cf");
  check_map(s2, "s2");
  const int64_t Cin = z.size(1), Cm = wpw.size(1), Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  TORCH_CHECK(wpw.is_contiguous() && wpw.dim() == 2 && wpw.size(0) == Cin && 5 * F <= Cm, "wpw: (C, >= 5F)");
  TORCH_CHECK(taps.is_contiguous() && taps.size(0) == 9 && taps.size(1) >= 4 * F + kLanes && bias.numel() >= 4 * F &&
                  4 * F <= kMaxChannels, "taps: (9, 4F + 16), bias: 4F");
  TORCH_CHECK(z.size(0) == images * H * W && cf.size(0) == z.size(0) && cf.size(1) == F &&
                  s2.size(0) == images * Ho * Wo && s2.size(1) == 4 * F, "mvsa_head: z, cf (pixels, F), s2");
  const float* zp = z.const_data_ptr<float>();
  const float* wp = wpw.const_data_ptr<float>();
  float* cp = cf.data_ptr<float>();
  const int64_t ldz = z.stride(0), ldc = cf.stride(0);
  const DwArgs base{nullptr, taps.const_data_ptr<float>(), bias.const_data_ptr<float>(), nullptr,
                    s2.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, H, W, Ho, Wo, 4 * F, 2 * F, 0, Cm,
                    taps.size(1), 0, s2.stride(0), 0, 0, 2, kNone, 0, true};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), Ho)));
  at::parallel_for(0, images * threads, 1, [&](int64_t first, int64_t last) {
    GemmRowRing ring(zp, ldz, H, W, Cin, wp, Cm, RowNorm{});
    for (int64_t task = first; task < last; ++task) {
      const int64_t img = task / threads, share = task % threads;
      const int64_t a = Ho * share / threads, b = Ho * (share + 1) / threads;  // the share's output rows
      for (int64_t oy = a; oy < b; ++oy) {
        const float* src[3];
        for (int k = 0; k < 3; ++k) src[k] = ring.row(img, tap_index(oy, k, 2, H, true)) + F;
        for (int64_t iy = 2 * oy; iy < std::min(H, 2 * oy + 2); ++iy) {  // this output row's own input rows
          const float* y = ring.row(img, iy);
          float* dst = cp + (img * H + iy) * W * ldc;
          for (int64_t x = 0; x < W; ++x) std::copy_n(y + x * Cm, F, dst + x * ldc);
        }
        const int64_t row = img * Ho + oy;
        int64_t ox = 0;
        for (; ox + 4 <= Wo; ox += 4) dw_pixels<4>(base, src, row, ox);
        for (; ox < Wo; ++ox) dw_pixels<1>(base, src, row, ox);
      }
    }
  });
}

// MVSA's full-resolution tail, in place on z: s = bilinear(g1) + bilinear(g2) + (cf + cf_bias) (f channels),
// z = z' + z' * sigmoid(s @ w4 + b4), z' = z + z_bias (optional). g1, g2: (images, f, h, w) coarse maps (NCHW). Sampling per axis:
// index (maps, 4, n) int64 rows [y0, y1, x0, x1] and lambda (maps, 2, n) float32 rows [ly, lx], the
// upper-neighbour weights (PyTorch's align_corners=False rule, or a tile's whole-image coordinates).
void mvsa_tail(Tensor z, int64_t images, int64_t H, int64_t W, const Tensor& cf, const Tensor& cf_bias,
               const Tensor& g1, const Tensor& g2, const Tensor& index, const Tensor& lambda,
               const Tensor& w4, const Tensor& b4, const std::optional<Tensor>& z_bias) {
  check_map(z, "z");
  check_map(cf, "cf");
  const int64_t C = z.size(1), f = cf.size(1), ldz = z.stride(0), ldc = cf.stride(0);
  TORCH_CHECK(g1.is_contiguous() && g2.is_contiguous() && g1.size(1) == f && g2.size(1) == f, "coarse maps");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && lambda.is_contiguous(), "sampling");
  TORCH_CHECK(w4.is_contiguous() && w4.size(0) == f && w4.size(1) >= C, "w4: (f, C) expected");
  float* zp = z.data_ptr<float>();
  const float* cp = cf.const_data_ptr<float>();
  const float* cb = cf_bias.const_data_ptr<float>();
  const float* maps[2] = {g1.const_data_ptr<float>(), g2.const_data_ptr<float>()};
  const int64_t mh[2] = {g1.size(2), g2.size(2)}, mw[2] = {g1.size(3), g2.size(3)};
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const float* lp = lambda.const_data_ptr<float>();
  const int64_t ni = index.size(2), nl = lambda.size(2);
  const float* w4p = w4.const_data_ptr<float>();
  const float* b4p = b4.const_data_ptr<float>();
  const int64_t ldw = w4.size(1);
  const float* zb = opt_ptr(z_bias);
  // the coarse maps pixel-major, each pixel's f channels zero-padded to whole vectors (fv of them): a bilinear
  // sample of all f channels is then 4 * fv vector loads instead of 4f scalar ones
  const int64_t fv = (f + kLanes - 1) / kLanes, fp = fv * kLanes;
  std::vector<float> pm[2];
  for (int m = 0; m < 2; ++m) {
    pm[m].assign(images * mh[m] * mw[m] * fp, 0.0f);
    for (int64_t img = 0; img < images; ++img)
      for (int64_t c = 0; c < f; ++c)
        for (int64_t i = 0; i < mh[m] * mw[m]; ++i)
          pm[m][(img * mh[m] * mw[m] + i) * fp + c] = maps[m][(img * f + c) * mh[m] * mw[m] + i];
  }

  // s of one pixel (f channels, fv vectors, zero past f) into dst: the two bilinear samples plus conv_f's output
  auto sample = [&](int64_t img, int64_t y, int64_t x, int64_t p, float* dst) __attribute__((always_inline)) {
    for (int64_t v = 0; v < fv; ++v) {
      const int64_t c0 = v * kLanes, n = std::min(kLanes, f - c0);
      Vec acc(0.0f);
      for (int m = 0; m < 2; ++m) {
        const int64_t* idx = ip + m * 4 * ni;
        const float* lam = lp + m * 2 * nl;
        const int64_t y0 = idx[y], y1 = idx[ni + y], x0 = idx[2 * ni + x], x1 = idx[3 * ni + x];
        const Vec h1(lam[y]), h0(1.0f - lam[y]), w1(lam[nl + x]), w0(1.0f - lam[nl + x]);
        const float* base = pm[m].data() + img * mh[m] * mw[m] * fp + c0;
        const Vec top = w0 * Vec::loadu(base + (y0 * mw[m] + x0) * fp) + w1 * Vec::loadu(base + (y0 * mw[m] + x1) * fp);
        const Vec bot = w0 * Vec::loadu(base + (y1 * mw[m] + x0) * fp) + w1 * Vec::loadu(base + (y1 * mw[m] + x1) * fp);
        acc = acc + (h0 * top + h1 * bot);
      }
      (acc + (load(cp + p * ldc + c0, n) + load(cb + c0, n))).store(dst + c0);
    }
  };
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // A row at a time: s of the whole row into a buffer, then conv4 as a register-blocked product (U pixels x NV
  // vectors, each weight vector loaded once for the U) and the gating. (Per pixel, s was stored and read back
  // at once as f broadcasts, which waited on the store: 0.43 ms a call at 128 x 128.) AVX-512: 4 x 3 sums and
  // the 3 weight vectors pinned (of 32 registers); AVX2 (C = 42: 6 vectors): 2 x 6 sums, weights from memory.
  using V = Simd::V;
  constexpr int64_t kW = Simd::kW;
  constexpr int U = kW == 16 ? 4 : 2;
  const int64_t nvz = (C + kW - 1) / kW;
  if ((nvz == 2 || nvz == 3 || (kW == 8 && nvz == 6)) && ldw >= nvz * kW) {
    auto run = [&](auto nv_const) {
      constexpr int NV = decltype(nv_const)::value;
      const int64_t tail = C - (NV - 1) * kW;
      parallel_rows(images * H, [&] {
        auto srow_buffer = std::make_shared<std::vector<float>>((W + U - 1) * fp, 0.0f);  // a last group reads past W
        return [&, srow_buffer](int64_t row) {
          float* srow = srow_buffer->data();
          const int64_t img = row / H, y = row % H;
          for (int64_t x = 0; x < W; ++x) sample(img, y, x, row * W + x, srow + x * fp);
          for (int64_t x = 0; x < W; x += U) {
            const int count = static_cast<int>(std::min<int64_t>(U, W - x));
            V acc[U][NV];
            for (int v = 0; v < NV; ++v) {
              const V b = Lanes<false>{Simd::mask(v == NV - 1 ? tail : kW)}.load(b4p + v * kW);
              for (int u = 0; u < U; ++u) acc[u][v] = b;
            }
            for (int64_t k = 0; k < f; ++k) {
              V wv[NV];
              for (int v = 0; v < NV; ++v) {
                wv[v] = Simd::load(w4p + k * ldw + v * kW);
                if constexpr (kW == 16) pin(wv[v]);
              }
              for (int u = 0; u < U; ++u) {  // (pixels past the row's end read stale s; never stored)
                const V sv = Simd::set1(srow[(x + u) * fp + k]);
                for (int v = 0; v < NV; ++v) acc[u][v] = Simd::fmadd(sv, wv[v], acc[u][v]);
              }
            }
#pragma GCC unroll 4
            for (int u = 0; u < U; ++u) {  // a fixed trip count: with `u < count` acc was kept on the stack
              if (u >= count) continue;
              float* zr = zp + (row * W + x + u) * ldz;
#pragma GCC unroll 6
              for (int v = 0; v < NV; ++v) {
                with_lanes(v == NV - 1 ? tail : kW, [&](const auto& ln) __attribute__((always_inline)) {
                  V zv = ln.load(zr + v * kW);
                  if (zb) zv = Simd::add(zv, ln.load(zb + v * kW));
                  ln.store(zr + v * kW, Simd::fmadd(zv, sigmoid(Vec(acc[u][v])), zv));
                });
              }
            }
          }
        };
      });
    };
    if (nvz == 2) run(std::integral_constant<int, 2>{});
    else if (nvz == 3) run(std::integral_constant<int, 3>{});
    else if constexpr (kW == 8) run(std::integral_constant<int, 6>{});
    return;
  }
#endif
  at::parallel_for(0, images * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(fp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / H, y = row % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t p = row * W + x;
        sample(img, y, x, p, s.data());
        float* zr = zp + p * ldz;
        for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
          const int64_t n = std::min(kLanes, C - c0);
          Vec m = load(b4p + c0, n);
          for (int64_t k = 0; k < f; ++k) m = at::vec::fmadd(Vec(s[k]), load(w4p + k * ldw + c0, n), m);
          Vec zv = load(zr + c0, n);
          if (zb) zv = zv + load(zb + c0, n);
          store(at::vec::fmadd(zv, sigmoid(m), zv), zr + c0, n);
        }
      }
    }
  });
}

// Calls fn(segment, x_begin, x_end) for each run of one segment number along a row of W positions.
template <typename Fn>
ALWAYS_INLINE void for_each_run(const int64_t* seg_of, int64_t W, Fn&& fn) {
  for (int64_t x = 0; x < W;) {
    int64_t end = x;
    while (end < W && seg_of[end] == seg_of[x]) ++end;
    fn(seg_of[x], x, end);
    x = end;
  }
}

// A block of pixels the gram kernels sum over: `rows` runs of `count` pixels, the pixels of a run `ld` floats
// apart, the runs `rld` floats apart (a cell's part of a band of rows, summed in one go: 8 x 8 cells ran 8
// pixels per tile, and loading and storing the tile's accumulators cost as much as the sums).
struct PixelBlock {
  const float* p;
  int64_t ld, count, rld, rows;
};

// One register tile of a cell's G: q channels [i0, i0 + R) x k vectors [j0, j0 + NVB) (k channels
// j0 * kLanes ...), summed over the pixels of `b` (q at [0, C), k at [C, 2C)) and added into g (row pitch
// Cp). The accumulators stay in registers for the whole block (R is a compile-time constant for that: with a
// runtime row count they were kept on the stack, 3x slower).
template <int NVB, int R>
ALWAYS_INLINE void gram_tile(const PixelBlock& b, int64_t C, int64_t i0, int64_t j0, float* g, int64_t Cp) {
  // every loop over the tile unrolled in full: one left as a loop indexes the accumulators at run time, which
  // puts them in memory (GCC then stored all 24 of a large tile every pixel)
  Vec acc[R][NVB];
  LaneMask mask[NVB];
#pragma GCC unroll 4
  for (int v = 0; v < NVB; ++v) mask[v] = lane_mask(C - (j0 + v) * kLanes);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) acc[r][v] = Vec(0.0f);
  const float* p = b.p;  // one loop over the block's pixels: runs of `count`, `rld` apart
  const int64_t next_row = b.rld - b.count * b.ld;
  for (int64_t k = 0, x = 0, n = b.rows * b.count; k < n; ++k) {
    Vec kv[NVB];
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) kv[v] = load_lanes(p + C + (j0 + v) * kLanes, mask[v]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec q(p[i0 + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) acc[r][v] = at::vec::fmadd(q, kv[v], acc[r][v]);
    }
    p += b.ld;
    if (++x == b.count) x = 0, p += next_row;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) {
      float* dst = g + (i0 + r) * Cp + (j0 + v) * kLanes;
      (Vec::loadu(dst) + acc[r][v]).store(dst);
    }
}

// Accumulator budget of a tile: rows for NVB vectors (at most 24 accumulators of AVX-512's 32 registers, 12
// of AVX2's 16)
#if defined(CPU_CAPABILITY_AVX2)
template <int NVB>
constexpr int kGramRows = NVB == 1 ? 12 : NVB == 2 ? 6 : NVB == 3 ? 4 : 3;
#else
template <int NVB>
constexpr int kGramRows = NVB == 1 ? 16 : NVB == 2 ? 12 : NVB == 3 ? 8 : 6;
#endif

// gram_tile with the row count `rows` (1 .. kGramRows<NVB>) as its template argument
template <int NVB, int R = 1>
void gram_tile_rows(int rows, const PixelBlock& b, int64_t C, int64_t i0, int64_t j0, float* g, int64_t Cp) {
  if constexpr (R < kGramRows<NVB>) {
    if (rows != R) return gram_tile_rows<NVB, R + 1>(rows, b, C, i0, j0, g, Cp);
  }
  gram_tile<NVB, R>(b, C, i0, j0, g, Cp);
}

// G rows [i0, i1) x k vectors [j0, j1) over a block of pixels, in register tiles: vector groups of up to 4,
// rows split evenly into chunks within the group's budget.
inline void gram_block(const PixelBlock& b, int64_t C, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* g,
                       int64_t Cp) {
  for (int64_t jv = j0; jv < j1; jv += 4) {
    const int64_t nvb = std::min<int64_t>(4, j1 - jv);
    const int64_t rmax = nvb == 1 ? kGramRows<1> : nvb == 2 ? kGramRows<2> : nvb == 3 ? kGramRows<3> : kGramRows<4>;
    const int64_t chunks = (i1 - i0 + rmax - 1) / rmax, step = (i1 - i0 + chunks - 1) / chunks;
    for (int64_t i = i0; i < i1; i += step) {
      const int rows = static_cast<int>(std::min(step, i1 - i));
      switch (nvb) {
        case 1: gram_tile_rows<1>(rows, b, C, i, jv, g, Cp); break;
        case 2: gram_tile_rows<2>(rows, b, C, i, jv, g, Cp); break;
        case 3: gram_tile_rows<3>(rows, b, C, i, jv, g, Cp); break;
        default: gram_tile_rows<4>(rows, b, C, i, jv, g, Cp); break;
      }
    }
  }
}

// Where the cell kernels' pixel (y, x) of an image lies: at (y, x), or, with offset windows P > 0, in the map
// regrouped by offset in P x P windows, where row u * H/P + i is row P * i + u (columns likewise). Regrouped,
// the groups of a dilated grid (one per offset) are blocks of pixels, cells, read in place (a regrouped copy
// of each map cost more than the attention). Consecutive rows (columns) of one block of H/P (W/P) are P apart.
struct CellLayout {
  int64_t H, W, P;
  int64_t row(int64_t y) const { return P ? P * (y % (H / P)) + y / (H / P) : y; }
  int64_t col(int64_t x) const { return P ? P * (x % (W / P)) + x / (W / P) : x; }
  int64_t step() const { return P ? P : 1; }
  int64_t row_block(int64_t y) const { return P ? y / (H / P) : 0; }
  // the end of the run of columns from x that are consecutive in memory (at the step): the block's end
  int64_t run_end(int64_t x, int64_t end) const { return P ? std::min(end, (x / (W / P) + 1) * (W / P)) : end; }
};

// Pixels per block of cell_gram's sums: every head's tiles and the norms run over one block before the next, so
// that its qk rows are read from memory once (head by head over a whole run of a large tile's cell, the map
// came from memory once per head)
constexpr int64_t kGramBlockPixels = 64;

// cell_gram's work on rows [begin, end) (of one image, one band of cells and, with offset windows, one block of
// rows), accumulating into `band` (its nx cells): per run of one cell's columns, in blocks of about
// kGramBlockPixels (whole rows of the run, or parts of one row), each head's diagonal block of G (the vectors
// covering its k channels), then the squared norms.
void gram_rows(const float* base, int64_t ld, const CellLayout& L, int64_t C, int64_t Cp, int64_t heads,
               const int64_t* cs, int64_t cell_size, float* band, int64_t begin, int64_t end) {
  const int64_t ch = C / heads, nv = (C + kLanes - 1) / kLanes;
  const int64_t img = begin / L.H, y0 = begin % L.H, rows = end - begin, rld = L.step() * L.W * ld;
  const float* row0 = base + (img * L.H + L.row(y0)) * L.W * ld;
  auto block_sums = [&](const PixelBlock& b, float* g) {
    for (int64_t h = 0; h < heads; ++h)
      gram_block(b, C, h * ch, (h + 1) * ch, h * ch / kLanes, ((h + 1) * ch - 1) / kLanes + 1, g, Cp);
    float* sq_q = g + C * Cp;
    float* sq_k = sq_q + Cp;
    for (int64_t j = 0; j < nv; ++j) {
      const LaneMask mask = lane_mask(C - j * kLanes);
      Vec aq[2] = {Vec(0.0f), Vec(0.0f)}, ak[2] = {Vec(0.0f), Vec(0.0f)};  // two chains each: FMA latency
      for (int64_t y = 0; y < b.rows; ++y) {
        const float* px = b.p + y * b.rld + j * kLanes;
        for (int64_t x = 0; x < b.count; ++x, px += b.ld) {
          const Vec qv = load_lanes(px, mask), kv = load_lanes(px + C, mask);
          aq[x & 1] = at::vec::fmadd(qv, qv, aq[x & 1]);
          ak[x & 1] = at::vec::fmadd(kv, kv, ak[x & 1]);
        }
      }
      (Vec::loadu(sq_q + j * kLanes) + (aq[0] + aq[1])).store(sq_q + j * kLanes);
      (Vec::loadu(sq_k + j * kLanes) + (ak[0] + ak[1])).store(sq_k + j * kLanes);
    }
  };
  for_each_run(cs, L.W, [&](int64_t seg, int64_t run_begin, int64_t run_end) {
    float* g = band + seg * cell_size;
    for (int64_t x0 = run_begin; x0 < run_end;) {
      const int64_t x1 = L.run_end(x0, run_end), count = x1 - x0;
      const float* p = row0 + L.col(x0) * ld;
      const int64_t step = L.step() * ld;
      x0 = x1;
      if (count >= kGramBlockPixels) {  // a long run: parts of one row at a time
        for (int64_t y = 0; y < rows; ++y)
          for (int64_t c0 = 0; c0 < count; c0 += kGramBlockPixels)
            block_sums(PixelBlock{p + y * rld + c0 * step, step, std::min(kGramBlockPixels, count - c0), rld, 1}, g);
      } else {  // a short one: whole rows of it
        const int64_t per_block = kGramBlockPixels / count;
        for (int64_t y = 0; y < rows; y += per_block)
          block_sums(PixelBlock{p + y * rld, step, count, rld, std::min(per_block, rows - y)}, g);
      }
    }
  });
}

// cell_gram's units of work, fixed by the layout alone: runs of rows of one image, one row segment and one
// block of rows, at most kUnitRows long. Each unit sums into its own copy of its band's cells, and the copies
// are added in unit order (`GramUnits::reduce`), so the result never depends on which thread took which unit.
struct GramUnits {
  static constexpr int64_t kUnitRows = 16;
  int64_t C, Cp, nx, heads, cell_size, band_size;
  std::vector<int64_t> first_row;                // unit u: rows [first_row[u], first_row[u + 1]) of images * H
  std::vector<std::vector<int64_t>> band_units;  // each band's units (band = image * ny + row segment), in order
  float* partial;                                // the units' sums, band_size floats each

  GramUnits(const CellLayout& layout, int64_t images, int64_t ny, int64_t nx, int64_t C, int64_t heads,
            const int64_t* rs)
      : C(C), Cp((C + kLanes - 1) / kLanes * kLanes), nx(nx), heads(heads), cell_size(C * Cp + 2 * Cp),
        band_size(nx * cell_size), band_units(images * ny) {
    const int64_t H = layout.H;
    for (int64_t r = 0; r < images * H;) {
      first_row.push_back(r);
      const int64_t end_of_image = (r / H + 1) * H;
      int64_t e = r + 1;
      while (e < end_of_image && e - r < kUnitRows && rs[e % H] == rs[r % H] &&
             layout.row_block(e % H) == layout.row_block(r % H))
        ++e;
      r = e;
    }
    first_row.push_back(images * H);
    for (int64_t u = 0; u < count(); ++u) band_units[first_row[u] / H * ny + rs[first_row[u] % H]].push_back(u);
    // kept between calls (per calling thread): a fresh buffer of this size is a new mapping from the OS on
    // every call, page-faulted in 4 KiB at a time
    thread_local std::vector<float> buffer;
    const size_t need = static_cast<size_t>(count()) * band_size;
    if (buffer.size() < need) buffer.resize(need);
    partial = buffer.data();  // (the worker threads must not name the thread_local)
  }
  int64_t count() const { return static_cast<int64_t>(first_row.size()) - 1; }
  // unit u's sums, zeroed (only cells [first_cell, end_cell) of its band: a column strip's)
  float* fresh(int64_t u, int64_t first_cell = 0, int64_t end_cell = -1) const {
    float* band = partial + u * band_size;
    if (end_cell < 0) end_cell = nx;
    std::fill(band + first_cell * cell_size, band + end_cell * cell_size, 0.0f);
    return band;
  }
  // per cell, the sums of its band's units in unit order (a fixed order of the additions) into gram (cells, C,
  // C) and sq (cells, 2C)
  void reduce(int64_t cells, float* gp, float* sp) const {
    const int64_t ch = C / heads;
    parallel_rows(cells, [&] {
      return [&](int64_t cell) {
        const int64_t seg = cell % nx;
        float* g = gp + cell * C * C;
        float* s2 = sp + cell * 2 * C;
        std::fill_n(g, C * C, 0.0f);  // the heads' off-diagonal blocks stay zero
        std::fill_n(s2, 2 * C, 0.0f);
        for (const int64_t u : band_units[cell / nx]) {
          const float* src = partial + u * band_size + seg * cell_size;
          for (int64_t i = 0; i < C; ++i) {
            const int64_t j0 = i / ch * ch;  // the head's block
            for (int64_t j = j0; j < j0 + ch; ++j) g[i * C + j] += src[i * Cp + j];
          }
          for (int64_t j = 0; j < C; ++j) s2[j] += src[C * Cp + j];
          for (int64_t j = 0; j < C; ++j) s2[C + j] += src[C * Cp + Cp + j];
        }
      };
    });
  }
};

void check_gram_args(int64_t images, int64_t H, int64_t W, int64_t C, int64_t ny, int64_t nx, const Tensor& gram,
                     const Tensor& sq, int64_t heads, int64_t offsets) {
  TORCH_CHECK(C <= 256 && heads >= 1 && C % heads == 0, "cell_gram: C must split into the heads");
  TORCH_CHECK(gram.is_contiguous() && gram.numel() == images * ny * nx * C * C, "gram: (images, ny, nx, C, C)");
  TORCH_CHECK(sq.is_contiguous() && sq.numel() == images * ny * nx * 2 * C, "sq: (images, ny, nx, 2C)");
  TORCH_CHECK(offsets >= 0 && (!offsets || (H % offsets == 0 && W % offsets == 0)), "offsets: sides its multiples");
}

// Channel attention over cells. A cell is a block of pixels (a segment of rows x a segment of columns) that
// one fixed set of TLC windows covers; row_seg[y] / col_seg[x] give each row's / column's segment (of the
// regrouped map with `offsets` > 0: see CellLayout).
// cell_gram: per cell, G = sum over its pixels of q k^T (C x C, row = q channel) and the squared norms of the
// q and k channels, from a map whose columns [0, C) are q and [C, 2C) are k. With `heads` > 1 only the heads'
// diagonal blocks of G are computed (the attention never reads the rest), the others are written as zeros.
// The work is cut into `GramUnits`: the same input gives the same bits on every run and at every thread count
// (per-thread sums under run-time row sharing did not).
void cell_gram(const Tensor& qk, int64_t images, int64_t H, int64_t W, int64_t C, const Tensor& row_seg,
               const Tensor& col_seg, int64_t ny, int64_t nx, Tensor gram, Tensor sq, int64_t heads,
               int64_t offsets) {
  check_map(qk, "qk");
  TORCH_CHECK(qk.size(1) >= 2 * C && qk.size(0) == images * H * W, "qk: (pixels, >= 2C)");
  check_gram_args(images, H, W, C, ny, nx, gram, sq, heads, offsets);
  const CellLayout layout{H, W, offsets};
  const int64_t* cs = col_seg.const_data_ptr<int64_t>();
  const float* base = qk.const_data_ptr<float>();
  const int64_t ld = qk.stride(0);
  const GramUnits units(layout, images, ny, nx, C, heads, row_seg.const_data_ptr<int64_t>());
  parallel_rows(units.count(), [&] {
    return [&](int64_t u) {
      gram_rows(base, ld, layout, C, units.Cp, heads, cs, units.cell_size, units.fresh(u), units.first_row[u],
                units.first_row[u + 1]);
    };
  });
  units.reduce(images * ny * nx, gram.data_ptr<float>(), sq.data_ptr<float>());
}

// The qkv pass of a channel attention with cell_gram in it: q|k|v = depthwise 3x3 (zero padding, no bias) of
// LayerNorm(x) @ wpw, as `pw_dwconv` computes it (the LayerNorm optional), then cell_gram's sums of q = [0, C)
// and k = [C, 2C) and v = [2C, 3C) into `v`. Run unit by unit (`GramUnits`): a unit's q|k rows go to a thread's
// buffer and are summed from there, so q and k never reach memory (on a photo's tile they were written and read
// back from it, 2C floats a pixel each way); v goes straight to its map. The same row functions on the same values: the grams are
// cell_gram's bits, v pw_dwconv's.
void qkv_gram(const Tensor& x, int64_t images, int64_t H, int64_t W, const Tensor& wpw, const Tensor& weight,
              const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias, double ln_eps, int64_t C,
              const Tensor& row_seg, const Tensor& col_seg, int64_t ny, int64_t nx, int64_t heads, Tensor v,
              Tensor gram, Tensor sq) {
  check_map(x, "x");
  check_map(v, "v");
  check_gram_args(images, H, W, C, ny, nx, gram, sq, heads, 0);
  const int64_t Cin = x.size(1), Cm = wpw.size(1), Cd = 3 * C;
  TORCH_CHECK(wpw.is_contiguous() && wpw.dim() == 2 && wpw.size(0) == Cin && Cd <= Cm, "wpw: (Cin, >= 3C)");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == 9 && Cd + kLanes <= weight.size(1) &&
                  Cd <= kMaxChannels, "weight: (9, 3C + 16) expected");
  TORCH_CHECK(x.size(0) == images * H * W && v.size(0) == x.size(0) && v.size(1) == C, "x, v: (pixels, Cin / C)");
  const RowNorm norm = row_norm(ln_weight, ln_bias, ln_eps, Cin);
  const CellLayout layout{H, W, 0};
  const int64_t* cs = col_seg.const_data_ptr<int64_t>();
  const GramUnits units(layout, images, ny, nx, C, heads, row_seg.const_data_ptr<int64_t>());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = wpw.const_data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldv = v.stride(0);
  // two depthwise calls a row, on channels [0, 2C) into the unit's buffer and [2C, 3C) straight into v: each
  // channel's arithmetic is the same as in one call over all 3C
  const float* taps = weight.const_data_ptr<float>();
  const DwArgs qk_args{nullptr, taps, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, H, W, H, W,
                       2 * C, C, 0, Cm, weight.size(1), 0, 2 * C, Cm, 0, 1, kNone, 0, false};
  DwArgs v_args = qk_args;
  v_args.wp = taps + 2 * C, v_args.C = C, v_args.G = C / 2, v_args.op = vp, v_args.ldo = ldv;
  // a wide map in column strips (as pw_dwconv) cut where a cell ends, so that each cell's sums are made as over
  // the whole row, in the same blocks and order; tasks strip-major, so that a thread's consecutive units share
  // their ring's rows
  std::vector<int64_t> cuts{0};
  if (column_strips(W, kStripColumns, 1) > 1)
    for (int64_t x = 1; x < W; ++x)
      if (cs[x] != cs[x - 1] && x - cuts.back() >= kStripColumns && W - x >= kStripColumns / 2) cuts.push_back(x);
  cuts.push_back(W);
  const int64_t strips = static_cast<int64_t>(cuts.size()) - 1, unit_count = units.count();
  struct Buffers {  // a thread's zero row (padding) and its unit's q|k rows (one pixel of slack before them)
    std::vector<float> zero_row, unit;
  };
  parallel_rows(strips * unit_count, [&] {
    auto ring = std::make_shared<GemmRowRing>(xp, ldx, H, W, Cin, wp, Cm, norm);
    auto buf = std::make_shared<Buffers>();
    buf->zero_row.assign((W + 2) * Cm + kLanes, 0.0f);
    buf->unit.assign(GramUnits::kUnitRows * W * 2 * C + 2 * C + kLanes, 0.0f);
    return [&, ring, buf](int64_t task) {
      const int64_t strip = task / unit_count, u = task % unit_count;
      const int64_t first = units.first_row[u], rows = units.first_row[u + 1] - first;
      // columns [xa, xb), from the ring's [xs, xs + Ws); the unit's q|k rows (xb - xa pixels each) at `unit`
      const ColumnSpan span(cuts[strip], cuts[strip + 1], W, 1);
      const int64_t xa = span.x0, xb = span.x1, xs = span.xs, Ws = span.Ws;
      ring->columns(xs, Ws);
      float* unit = buf->unit.data() + 2 * C;
      DwArgs qk = qk_args, v = v_args;
      qk.zero_row = v.zero_row = buf->zero_row.data();
      qk.W = qk.Wo = v.W = v.Wo = Ws;
      qk.x_begin = v.x_begin = xa - xs, qk.x_end = v.x_end = xb - xs;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t img = (first + r) / H, oy = (first + r) % H;
        const float *src[3], *v_src[3];
        for (int k = 0; k < 3; ++k) {
          const int64_t iy = tap_index(oy, k, 1, H, false);
          src[k] = iy < 0 ? nullptr : ring->row(img, iy);
          v_src[k] = src[k] ? src[k] + 2 * C : nullptr;
        }
        qk.op = unit + (r * (xb - xa) - (xa - xs)) * 2 * C;  // the strip's column xa at the row's start
        v.op = vp + ((first + r) * W + xs) * ldv;
        dw_one_row(qk, src, 0);
        dw_one_row(v, v_src, 0);
      }
      // the unit's rows as a map of `rows` rows starting at its first: gram_rows' blocks and order as cell_gram's
      gram_rows(unit, 2 * C, CellLayout{rows, xb - xa, 0}, C, units.Cp, heads, cs + xa, units.cell_size,
                units.fresh(u, cs[xa], cs[xb - 1] + 1), 0, rows);
    };
  });
  units.reduce(images * ny * nx, gram.data_ptr<float>(), sq.data_ptr<float>());
}

// cell_mats: from cell_gram's G and squared norms, per cell the C x C matrix M with out = z + v @ M (what
// cell_apply reads: float32, rows padded to Cp = 16-float multiples with zeros). In float64, as the Python
// reference `_cell_matrices`: per window w, sums over the cells it covers (to_windows: windows x cells, 0/1),
// A_w = relu(G_w / (|q_i| |k_j|) * tau_i) on the heads' diagonal blocks (norms clamped at 1e-12), then
// B_w = project_out @ A_w; per cell, M = (sum over windows of to_cells[cell, w] * B_w)^T (to_cells: the mean
// over the windows covering it). Applying project_out per window, not per cell, is the same sum.
void cell_mats(const Tensor& gram, const Tensor& sq, const Tensor& to_windows, const Tensor& to_cells,
               const Tensor& tau, const Tensor& proj, int64_t heads, Tensor mats) {
  const int64_t C = gram.size(-1), Cp = (C + 15) / 16 * 16;
  const int64_t nw = to_windows.size(0), ncell = to_windows.size(1);
  TORCH_CHECK(gram.scalar_type() == at::kFloat && gram.is_contiguous() && gram.numel() % (ncell * C * C) == 0,
              "gram: (images, ny, nx, C, C) float32");
  const int64_t images = gram.numel() / (ncell * C * C);
  TORCH_CHECK(sq.scalar_type() == at::kFloat && sq.is_contiguous() && sq.numel() == images * ncell * 2 * C,
              "sq: (images, ny, nx, 2C) float32");
  TORCH_CHECK(to_windows.scalar_type() == at::kDouble && to_windows.is_contiguous() &&
              to_cells.scalar_type() == at::kDouble && to_cells.is_contiguous() && to_cells.size(0) == ncell &&
              to_cells.size(1) == nw, "cover matrices: float64 (windows, cells) and (cells, windows)");
  TORCH_CHECK(tau.scalar_type() == at::kDouble && tau.is_contiguous() && tau.numel() == C &&
              proj.scalar_type() == at::kDouble && proj.is_contiguous() && proj.numel() == C * C,
              "tau (C) and proj (C, C): float64");
  TORCH_CHECK(heads >= 1 && C % heads == 0, "cell_mats: C must split into the heads");
  TORCH_CHECK(mats.scalar_type() == at::kFloat && mats.is_contiguous() && mats.numel() == images * ncell * C * Cp,
              "mats: (images, ny, nx, C, Cp) float32");
  const double *tw = to_windows.const_data_ptr<double>(), *tc = to_cells.const_data_ptr<double>();
  const double *tp = tau.const_data_ptr<double>(), *pp = proj.const_data_ptr<double>();
  const float *gp = gram.const_data_ptr<float>(), *sp = sq.const_data_ptr<float>();
  float* mp = mats.data_ptr<float>();
  const int64_t ch = C / heads;
  std::vector<double> proj_t(C * C);  // proj_t[i][r] = proj[r][i]: B_w^T rows are sums of its rows
  for (int64_t r = 0; r < C; ++r)
    for (int64_t i = 0; i < C; ++i) proj_t[i * C + r] = pp[r * C + i];
  std::vector<double> bt(nw * C * C);  // B_w^T per window, of the image at hand
  for (int64_t img = 0; img < images; ++img) {
    const float* g_img = gp + img * ncell * C * C;
    const float* s_img = sp + img * ncell * 2 * C;
    at::parallel_for(0, nw, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> gw(C * C), norm(2 * C);
      for (int64_t w = begin; w < end; ++w) {
        std::fill(gw.begin(), gw.end(), 0.0);
        std::fill(norm.begin(), norm.end(), 0.0);
        for (int64_t cell = 0; cell < ncell; ++cell) {
          const double f = tw[w * ncell + cell];
          if (f == 0.0) continue;
          const float* gc = g_img + cell * C * C;
          for (int64_t i = 0; i < C; ++i) {
            const int64_t j0 = i / ch * ch;
            for (int64_t j = j0; j < j0 + ch; ++j) gw[i * C + j] += f * gc[i * C + j];
          }
          for (int64_t j = 0; j < 2 * C; ++j) norm[j] += f * s_img[cell * 2 * C + j];
        }
        for (auto& v : norm) v = std::max(std::sqrt(v), 1e-12);
        double* b = bt.data() + w * C * C;  // b[j][r] = sum over i of A[i][j] proj[r][i]
        std::fill(b, b + C * C, 0.0);
        for (int64_t j = 0; j < C; ++j) {
          const int64_t i0 = j / ch * ch;
          for (int64_t i = i0; i < i0 + ch; ++i) {
            const double a = std::max(gw[i * C + j] / (norm[i] * norm[C + j]) * tp[i], 0.0);
            if (a == 0.0) continue;
            const double* pr = proj_t.data() + i * C;
            for (int64_t r = 0; r < C; ++r) b[j * C + r] += a * pr[r];
          }
        }
      }
    });
    at::parallel_for(0, ncell, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> m(C * C);
      for (int64_t cell = begin; cell < end; ++cell) {
        std::fill(m.begin(), m.end(), 0.0);
        for (int64_t w = 0; w < nw; ++w) {
          const double f = tc[cell * nw + w];
          if (f == 0.0) continue;
          const double* b = bt.data() + w * C * C;
          for (int64_t k = 0; k < C * C; ++k) m[k] += f * b[k];
        }
        float* dst = mp + (img * ncell + cell) * C * Cp;
        for (int64_t j = 0; j < C; ++j) {
          for (int64_t r = 0; r < C; ++r) dst[j * Cp + r] = static_cast<float>(m[j * C + r]);
          for (int64_t r = C; r < Cp; ++r) dst[j * Cp + r] = 0.0f;
        }
      }
    });
  }
}

struct ApplyArgs {
  const float *vp, *zp, *mp;
  float* op;
  const int64_t *rs, *cs;
  const float* rp;
  float* sp;  // sum_out
  int64_t H, W, C, Cp, nv, ny, nx, ldv, ldz, ldo, ldr, lds;
  CellLayout layout;
};

// cell_apply's work on rows [begin, end), U pixels at a time; NV the vectors of C when it is a template
// argument (0: a run-time count, up to 16)
template <int NV, int U>
void apply_rows(const ApplyArgs a, int64_t begin, int64_t end) {
  const float *vp = a.vp, *zp = a.zp, *mp = a.mp, *rp = a.rp;
  float *op = a.op, *sp = a.sp;
  const int64_t *rs = a.rs, *cs = a.cs;
  const int64_t H = a.H, W = a.W, C = a.C, Cp = a.Cp, ny = a.ny, nx = a.nx, ldv = a.ldv, ldz = a.ldz,
                ldo = a.ldo, ldr = a.ldr, lds = a.lds;
  const int64_t nv = NV > 0 ? NV : a.nv;
  constexpr int kMaxNV = NV > 0 ? NV : 16;
  const CellLayout& L = a.layout;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t img = row / H, y = row % H, row_start = (img * H + L.row(y)) * W;
    for_each_run(cs, W, [&](int64_t seg, int64_t x_begin, int64_t x_end) {
      const float* M = mp + ((img * ny + rs[y]) * nx + seg) * C * Cp;
      for (int64_t x = x_begin; x < x_end; x += U) {
        const int64_t m = std::min<int64_t>(U, x_end - x);
        int64_t px[U];  // the U pixels' indices (the last repeated past the run's end)
        for (int u = 0; u < U; ++u) px[u] = row_start + L.col(x + std::min<int64_t>(u, m - 1));
        Vec acc[U][kMaxNV];
        for (int u = 0; u < U; ++u)
          for (int64_t j = 0; j < nv; ++j)
            acc[u][j] = u < m ? load(zp + px[u] * ldz + j * kLanes, std::min(kLanes, C - j * kLanes)) : Vec(0.0f);
        const float* vr[U];
        for (int u = 0; u < U; ++u) vr[u] = vp + px[u] * ldv;
        for (int64_t i = 0; i < C; ++i) {
          Vec b[U];
#pragma GCC unroll 4
          for (int u = 0; u < U; ++u) b[u] = Vec(vr[u][i]);
          for (int64_t j = 0; j < nv; ++j) {
            Vec mv = Vec::loadu(M + i * Cp + j * kLanes);
            pin(mv);  // one load for the U FMAs
#pragma GCC unroll 4
            for (int u = 0; u < U; ++u) acc[u][j] = at::vec::fmadd(b[u], mv, acc[u][j]);
          }
        }
        for (int u = 0; u < m; ++u) {
          for (int64_t j = 0; j < nv; ++j) {
            const int64_t n = std::min(kLanes, C - j * kLanes);
            Vec o = acc[u][j];
            if (sp) store(o, sp + px[u] * lds + j * kLanes, n);
            if (rp) o = o + load(rp + px[u] * ldr + j * kLanes, n);
            store(o, op + px[u] * ldo + j * kLanes, n);
          }
        }
      }
    });
  }
}

// cell_apply: out[p] = z[p] + v[p] @ M[cell(p)], M: (images, ny, nx, C, Cp) float32, row i = input channel i
// (the cell's attention matrix with project_out folded in, transposed and padded).
// Optional, in the same pass: a residual added to out (out = z + v @ M + residual), and sum_out = z + v @ M
// without it (may be z itself: each pixel of z is read before it is written). `offsets`: as for cell_gram.
void cell_apply(const Tensor& v, const Tensor& z, const Tensor& mats, int64_t images, int64_t H, int64_t W,
                const Tensor& row_seg, const Tensor& col_seg, int64_t ny, int64_t nx, Tensor out,
                const std::optional<Tensor>& residual, const std::optional<Tensor>& sum_out, int64_t offsets) {
  check_map(v, "v");
  check_map(z, "z");
  check_map(out, "out");
  // mats rows are padded to whole 16-float vectors (the Python side's layout, whatever this build's vector width)
  const int64_t C = z.size(1), Cp = (C + 15) / 16 * 16, nv = (C + kLanes - 1) / kLanes;
  TORCH_CHECK(C <= 256 && mats.is_contiguous() && mats.numel() == images * ny * nx * C * Cp, "mats shape");
  const int64_t* rs = row_seg.const_data_ptr<int64_t>();
  const int64_t* cs = col_seg.const_data_ptr<int64_t>();
  const float* vp = v.const_data_ptr<float>();
  const float* zp = z.const_data_ptr<float>();
  const float* mp = mats.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldv = v.stride(0), ldz = z.stride(0), ldo = out.stride(0);
  const float* rp = opt_ptr(residual);
  const int64_t ldr = rp ? residual->stride(0) : 0;
  float* sp = nullptr;
  int64_t lds = 0;
  if (sum_out.has_value()) {
    check_map(*sum_out, "sum_out");
    TORCH_CHECK(sum_out->size(0) == z.size(0) && sum_out->size(1) == C, "sum_out: the shape of z");
    sp = sum_out->data_ptr<float>();
    lds = sum_out->stride(0);
  }
  TORCH_CHECK(offsets >= 0 && (!offsets || (H % offsets == 0 && W % offsets == 0)), "offsets: sides its multiples");
  const ApplyArgs args{vp, zp, mp, op, rs, cs, rp, sp, H, W, C, Cp, nv, ny, nx, ldv, ldz, ldo, ldr, lds,
                       CellLayout{H, W, offsets}};
  // U x NV accumulators within the registers (AVX-512: 4 x 3 of 32; AVX2, C = 42: 2 x 6 of 16)
  auto run = [&](auto nv_const, auto u_const) {
    constexpr int NV = decltype(nv_const)::value, U = decltype(u_const)::value;
    parallel_rows(images * H, [&] { return [&](int64_t row) { apply_rows<NV, U>(args, row, row + 1); }; });
  };
  using four = std::integral_constant<int, 4>;
  if (nv == 2) run(std::integral_constant<int, 2>{}, four{});
  else if (nv == 3) run(std::integral_constant<int, 3>{}, four{});
#if defined(CPU_CAPABILITY_AVX2)
  else if (nv == 6) run(std::integral_constant<int, 6>{}, std::integral_constant<int, 2>{});
#endif
  else run(std::integral_constant<int, 0>{}, four{});
}

inline int64_t reflect_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
}

// BSConv on a small channel-major map: pointwise (f x f, no bias) then reflect-padded depthwise 3x3 + bias.
// w: [pw (f*f, row = output channel), dw (f*9), bias (f)]
void bsconv_small(const float* in, float* out, int64_t f, int64_t h, int64_t w, const float* wts) {
  const float* pw = wts;
  const float* dw = pw + f * f;
  const float* bias = dw + 9 * f;
  std::vector<float> mid(f * h * w, 0.0f);
  for (int64_t o = 0; o < f; ++o)
    for (int64_t i = 0; i < f; ++i) {
      const float wv = pw[o * f + i];
      for (int64_t p = 0; p < h * w; ++p) mid[o * h * w + p] += wv * in[i * h * w + p];
    }
  // depthwise 3x3 on a mirrored copy of each channel (branch-free taps)
  const int64_t pw_ = w + 2;
  std::vector<float> pad((h + 2) * pw_);
  for (int64_t c = 0; c < f; ++c) {
    const float* m = mid.data() + c * h * w;
    for (int64_t yy = 0; yy < h + 2; ++yy)
      for (int64_t xx = 0; xx < pw_; ++xx)
        pad[yy * pw_ + xx] = m[reflect_index(yy - 1, h) * w + reflect_index(xx - 1, w)];
    const float* k = dw + c * 9;
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x) {
        const float* q = pad.data() + y * pw_ + x;
        float s = 0.0f;
        for (int64_t ky = 0; ky < 3; ++ky)
          for (int64_t kx = 0; kx < 3; ++kx) s += k[ky * 3 + kx] * q[ky * pw_ + kx];
        out[(c * h + y) * w + x] = s + bias[c];
      }
  }
}

// MVSA's coarse branch, from the stride-2 map s2 (pixels of images x h x w, channels [conv2_1 | conv2_2 |
// conv2_3 | conv2_4], f each) to the two maps that are resized back (NCHW, float32):
//   g1 = conv3_1(GELU(conv_max_1(maxpool5(conv2_1) + localvar5(conv2_4))))
//   g2 = conv3_2(GELU(conv_max_2(maxpool7(conv2_2) + localvar7(conv2_3))))
// maxpool: stride 3, padding 1 (-inf); localvar: reflect pad 1, stride 3, unbiased, from float64 sums;
// conv_max/conv3: BSConv (pointwise f x f without bias, then reflect-padded depthwise 3x3 with bias).
// weights: (2, 2 * (f*f + 9f + f)) per branch [pw, dw, bias] of conv_max then of conv3. These maps are
// about 1/40 of the image; in eager PyTorch they cost some twenty small ops per block.
void mvsa_coarse(const Tensor& s2, int64_t images, int64_t H, int64_t W, const Tensor& weights, Tensor g1,
                 Tensor g2, Tensor planes) {
  check_map(s2, "s2");
  const int64_t f = s2.size(1) / 4, ld = s2.stride(0);
  const int64_t per_conv = f * f + 10 * f;
  TORCH_CHECK(weights.is_contiguous() && weights.numel() == 2 * 2 * per_conv, "weights: (2, 2 * (f*f + 10f))");
  TORCH_CHECK(g1.is_contiguous() && g2.is_contiguous(), "g1, g2 contiguous");
  const float* sp = s2.const_data_ptr<float>();
  const float* wp = weights.const_data_ptr<float>();
  const int64_t oh[2] = {(H + 2 - 5) / 3 + 1, (H + 2 - 7) / 3 + 1}, ow[2] = {(W + 2 - 5) / 3 + 1, (W + 2 - 7) / 3 + 1};
  for (int branch = 0; branch < 2; ++branch) {
    const Tensor& g = branch == 0 ? g1 : g2;
    TORCH_CHECK(g.size(0) == images && g.size(1) == f && g.size(2) == oh[branch] && g.size(3) == ow[branch], "g size");
  }
  const int64_t plane = oh[0] * ow[0];  // the larger of the two maps
  std::vector<float> pooled(images * 2 * f * plane);  // pool + variance, per (image, branch, channel)
  // s2's channels as planes (`planes`: scratch of s2's size) first, in one pass: each task below reads two
  // channels, and gathering them from the channels-last rows read all of s2 once per task (20 times; on a
  // photo's tile s2 is some 30 MB, and the pass ran at 1.7x its cost per pixel on a 128 x 128 image)
  const int64_t C4 = 4 * f;
  TORCH_CHECK(planes.is_contiguous() && planes.numel() >= images * C4 * H * W, "planes: s2's size, contiguous");
  float* pp = planes.data_ptr<float>();
  at::parallel_for(0, images * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / H, y = row % H;
      const float* src = sp + row * W * ld;
      for (int64_t ch = 0; ch < C4; ++ch) {
        float* dst = pp + ((img * C4 + ch) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) dst[x] = src[x * ld + ch];
      }
    }
  });
  // one task per (image, branch, channel): the windows are the work
  at::parallel_for(0, images * 2 * f, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<float> mxp, vrp;  // reused across calls
    for (int64_t task = begin; task < end; ++task) {
      // branches alternate (k = 7 windows cost twice k = 5 ones; the threads take equal runs of tasks)
      const int64_t img = task / (2 * f), branch = task % 2, c = (task / 2) % f;
      const int64_t k = branch == 0 ? 5 : 7, oh_b = oh[branch], ow_b = ow[branch];
      const int64_t pool_c = branch == 0 ? 0 : f, var_c = branch == 0 ? 3 * f : 2 * f;
      const float* pool_plane = pp + (img * C4 + pool_c + c) * H * W;
      const float* var_plane = pp + (img * C4 + var_c + c) * H * W;
      float* a = pooled.data() + ((img * 2 + branch) * f + c) * plane;
      // the two channels as contiguous planes with a border of 1: -inf around the pooled one (max-pool
      // padding), mirrored around the variance one (reflect padding)
      const int64_t PW = W + 2;
      mxp.assign((H + 2) * PW, -INFINITY);
      vrp.resize((H + 2) * PW);
      for (int64_t y = 0; y < H; ++y) {
        float* mrow = mxp.data() + (y + 1) * PW + 1;
        float* vrow = vrp.data() + (y + 1) * PW + 1;
        std::copy_n(pool_plane + y * W, W, mrow);
        std::copy_n(var_plane + y * W, W, vrow);
        vrow[-1] = vrow[W > 1 ? 1 : 0];  // mirrored columns
        vrow[W] = vrow[W > 1 ? W - 2 : 0];
      }
      std::copy_n(vrp.data() + (H > 1 ? 2 : 1) * PW, PW, vrp.data());  // mirrored rows
      std::copy_n(vrp.data() + (H > 1 ? H - 1 : 1) * PW, PW, vrp.data() + (H + 1) * PW);
      // separable: window max and sums down the columns first (for an output row, every padded column:
      // contiguous, so the compiler vectorises it), then along the row at the output columns; the variance
      // from the sums of x and x^2 in float64
      std::vector<float> col_max(PW);
      std::vector<double> col_s1(PW), col_s2(PW);
      const double count = static_cast<double>(k * k);
      for (int64_t y = 0; y < oh_b; ++y) {
        std::fill(col_max.begin(), col_max.end(), -INFINITY);
        std::fill(col_s1.begin(), col_s1.end(), 0.0);
        std::fill(col_s2.begin(), col_s2.end(), 0.0);
        for (int64_t dy = 0; dy < k; ++dy) {
          const float* mrow = mxp.data() + (3 * y + dy) * PW;
          const float* vrow = vrp.data() + (3 * y + dy) * PW;
          for (int64_t xx = 0; xx < PW; ++xx) {
            col_max[xx] = std::max(col_max[xx], mrow[xx]);
            const double v = vrow[xx];
            col_s1[xx] += v;
            col_s2[xx] += v * v;
          }
        }
        for (int64_t x = 0; x < ow_b; ++x) {
          float mx = -INFINITY;
          double s1 = 0.0, s2 = 0.0;
          for (int64_t dx = 0; dx < k; ++dx) {
            mx = std::max(mx, col_max[3 * x + dx]);
            s1 += col_s1[3 * x + dx];
            s2 += col_s2[3 * x + dx];
          }
          const double var = std::max(0.0, (s2 - s1 * s1 / count) / (count - 1));
          a[y * ow_b + x] = mx + static_cast<float>(var);
        }
      }
    }
  });
  // then per (image, branch): BSConv, GELU, BSConv on the small maps
  at::parallel_for(0, images * 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / 2, branch = task % 2, oh_b = oh[branch], ow_b = ow[branch];
      std::vector<float> a(f * oh_b * ow_b), b(f * oh_b * ow_b);  // channel-major
      for (int64_t c = 0; c < f; ++c)
        std::copy_n(pooled.data() + (task * f + c) * plane, oh_b * ow_b, a.data() + c * oh_b * ow_b);
      const float* wb = wp + branch * 2 * per_conv;
      bsconv_small(a.data(), b.data(), f, oh_b, ow_b, wb);
      for (size_t i = 0; i < b.size(); i += kLanes) {  // the kernels' GELU (the scalar erf cost as much as a BSConv)
        const int64_t n = std::min<int64_t>(kLanes, b.size() - i);
        store(gelu(load(b.data() + i, n)), b.data() + i, n);
      }
      Tensor& g = branch == 0 ? g1 : g2;
      bsconv_small(b.data(), g.data_ptr<float>() + img * f * oh_b * ow_b, f, oh_b, ow_b, wb + per_conv);
    }
  });
}

// PixelShuffle from a channels-last map: x (images*H*W pixels, C*s*s channels; channel k*s*s + i*s + j) ->
// out (images, C, H*s, W*s) contiguous, out[k, y*s + i, x*s + j] = x[pixel (y, x), k*s*s + i*s + j]. The
// upsampler's last step: eager PyTorch's 6-D strided copy moved 4-float runs at ~5 GB/s (0.7-1.5 ms of a
// 128 x 128 x4 forward); here each output row is a sequence of s-float copies, parallel over output rows.
// Pixel shuffle of a band: x holds rows [row0, row0 + H) of a (pixels, C*s*s) map, written to output rows
// [row0*s, (row0 + H)*s) of out (images, C, Hout, W*s); row0 = 0 and Hout = H*s for a whole map.
void pixel_shuffle(const Tensor& x, int64_t images, int64_t H, int64_t W, int64_t s, Tensor out, int64_t row0) {
  check_map(x, "x");
  TORCH_CHECK(s >= 1 && x.size(1) % (s * s) == 0 && x.size(0) == images * H * W, "x: (pixels, C*s*s)");
  const int64_t C = x.size(1) / (s * s), ldx = x.stride(0);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.dim() == 4 && out.size(0) == images &&
                  out.size(1) == C && out.size(3) == W * s && row0 >= 0 && (row0 + H) * s <= out.size(2),
              "out: (images, C, Hout, W*s) float32 holding the band's rows");
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t Wo = W * s, Ho = out.size(2);
  at::parallel_for(0, images * C * H * s, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = ((img * C + k) * H + y) * s + i
      const int64_t i = r % s, y = (r / s) % H, k = (r / (s * H)) % C, img = r / (s * H * C);
      const float* src = xp + (img * H + y) * W * ldx + (k * s + i) * s;
      float* dst = op + ((img * C + k) * Ho + (row0 + y) * s + i) * Wo;
      if (s == 4) {
        for (int64_t xx = 0; xx < W; ++xx) std::memcpy(dst + 4 * xx, src + xx * ldx, 4 * sizeof(float));
      } else {
        for (int64_t xx = 0; xx < W; ++xx)
          for (int64_t j = 0; j < s; ++j) dst[xx * s + j] = src[xx * ldx + j];
      }
    }
  });
}

// ESC's window self-attention (§3.5 of shared/arch/esc.md) for heads of 16 channels: per window and head,
// out = softmax(q kᵀ · scale + B) v over its L = W² tokens, B[i, j] read from the relative-position table at
// (r_j - r_i + W - 1) * (2W - 1) + (c_j - c_i + W - 1). PyTorch's CPU attention streams a dense (L x L) bias per
// head from memory; here a query's bias over 16 keys of one key row is 16 consecutive table entries (the table,
// 16 KB a head for W = 32, stays in L1). A task is R queries of one window and head: their scores over all L keys
// (R x L floats, in L2), then a float32 softmax (max subtracted), then P v with the value rows streamed once for
// the R queries. Tasks are independent: the output does not depend on the thread count.
// q, v, out: (G, L, 16); kt: (G, 16, L) (k transposed); table: (heads, (2W-1)²); window g uses head g % heads.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int kAttnRows = Simd::kW == 16 ? 8 : 4;  // accumulators in registers: R x (16 / kW) for P v

void attn_rows(const float* q, const float* kt, const float* v, const float* tab, int64_t L, int64_t W, float scale,
               int64_t i0, float* S, float* out) {
  using S_ = Simd;
  using V = S_::V;
  constexpr int R = kAttnRows, kW = S_::kW, D = 16, NV = D / kW;
  const int64_t span = 2 * W - 1;
  V mx[R];
  for (int r = 0; r < R; ++r) mx[r] = S_::set1(-INFINITY);
  const float* bias_row[R];  // the table entry of key (row 0, column 0) for each query
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r, ri = i / W, ci = i % W;
    bias_row[r] = tab + (W - 1 - ri) * span + (W - 1 - ci);
  }
  const V sc = S_::set1(scale);
  for (int64_t j0 = 0; j0 < L; j0 += kW) {
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = S_::zero();
    for (int c = 0; c < D; ++c) {
      V kv = S_::load(kt + c * L + j0);
      pin(kv);
      for (int r = 0; r < R; ++r) acc[r] = S_::fmadd(S_::set1(q[(i0 + r) * D + c]), kv, acc[r]);
    }
    const int64_t off = (j0 / W) * span + j0 % W;  // key row r_j, first column c_j of the chunk
    for (int r = 0; r < R; ++r) {
      const V s = S_::fmadd(acc[r], sc, S_::load(bias_row[r] + off));
      S_::store(S + r * L + j0, s);
      mx[r] = S_::max(mx[r], s);
    }
  }
  float inv[R];
  for (int r = 0; r < R; ++r) {
    const V m = S_::set1(S_::hmax(mx[r]));
    V sum = S_::zero();
    float* row = S + r * L;
    for (int64_t j0 = 0; j0 < L; j0 += kW) {
      const V e = exp_fast(S_::sub(S_::load(row + j0), m));
      S_::store(row + j0, e);
      sum = S_::add(sum, e);
    }
    inv[r] = 1.0f / S_::hsum(sum);
  }
  V o[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) o[r][n] = S_::zero();
  for (int64_t j = 0; j < L; ++j) {
    V vj[NV];
    for (int n = 0; n < NV; ++n) {
      vj[n] = S_::load(v + j * D + n * kW);
      pin(vj[n]);
    }
    for (int r = 0; r < R; ++r) {
      const V p = S_::set1(S[r * L + j]);
      for (int n = 0; n < NV; ++n) o[r][n] = S_::fmadd(p, vj[n], o[r][n]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) S_::store(out + (i0 + r) * D + n * kW, S_::mul(o[r][n], S_::set1(inv[r])));
}
#endif

void window_attention(const Tensor& q, const Tensor& kt, const Tensor& v, const Tensor& table, int64_t window,
                      double scale, Tensor out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t G = q.size(0), L = q.size(1), W = window, heads = table.size(0);
  for (const Tensor* t : {&q, &kt, &v, &table, static_cast<const Tensor*>(&out)})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, "window_attention: contiguous float32");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == 16 && L == W * W && W % 16 == 0, "q: (G, W², 16), W a multiple of 16");
  TORCH_CHECK(v.sizes() == q.sizes() && out.sizes() == q.sizes(), "v, out: the shape of q");
  TORCH_CHECK(kt.dim() == 3 && kt.size(0) == G && kt.size(1) == 16 && kt.size(2) == L, "kt: (G, 16, W²)");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == (2 * W - 1) * (2 * W - 1) && G % heads == 0,
              "table: (heads, (2W-1)²), heads dividing G");
  const float *qp = q.const_data_ptr<float>(), *kp = kt.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  const float* tp = table.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = L / kAttnRows, tab = table.size(1);
  const float sc = static_cast<float>(scale);
  parallel_rows(G * blocks, [&] {
    auto scores = std::make_shared<std::vector<float>>(kAttnRows * L);
    return [&, scores](int64_t t) {
      const int64_t g = t / blocks, i0 = (t % blocks) * kAttnRows;
      attn_rows(qp + g * L * 16, kp + g * 16 * L, vp + g * L * 16, tp + (g % heads) * tab, L, W, sc, i0,
                scores->data(), op + g * L * 16);
    };
  });
#else
  TORCH_CHECK(false, "window_attention needs the AVX2 or AVX-512 build");
#endif
}

// A dense k x k conv (zero padding k/2, stride 1) whose kernel is D4-symmetric in space, as ESC's shared large
// kernel is (§3.3): w[o, c, r + dy, r + dx] depends on the orbit {|dy|, |dx|} only. The taps of an orbit share
// one weight, so their inputs are summed first, z[p, orbit, c], and the conv is one GEMM of z with the
// (orbits * C, O) weight: for 13 x 13, 28 orbits instead of 169 taps, 6x fewer multiply-adds. Per output row:
// u_a = x[y + a] + x[y - a] (a = 0..r, zero-padded rows), then per block of pixels z from u_a at columns x +- b,
// then the GEMM. x: (images*H*W, >= C) map; weight: (orbits * C, Cm), orbit (a, b), a <= b, in the order
// (0,0), (0,1) .. (0,r), (1,1) .. (r,r); out: (images*H*W, O) map, O <= Cm.
void sym_conv(const Tensor& x, int64_t images, int64_t H, int64_t W, int64_t C, int64_t ksize, const Tensor& weight,
              Tensor out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using S_ = Simd;
  constexpr int kW = S_::kW;
  check_map(x, "x");
  check_map(out, "out");
  const int64_t r = ksize / 2, orbits = (r + 1) * (r + 2) / 2, K = orbits * C, Cm = weight.size(1);
  TORCH_CHECK(ksize % 2 == 1 && C % kW == 0 && C <= x.size(1), "sym_conv: odd kernel, C a multiple of the vector");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == K && Cm % 16 == 0 &&
              out.size(1) <= Cm, "weight: (orbits * C, Cm)");
  TORCH_CHECK(x.size(0) == images * H * W && out.size(0) == images * H * W, "pixel count mismatch");
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0), O = out.size(1), PW = W + 2 * r;
  constexpr int64_t kBlk = 16;  // pixels per GEMM block: their z (16 x 448 floats for 13 x 13, C = 16) stays in L1
  parallel_rows(images * H, [&] {
    auto u = std::make_shared<std::vector<float>>((r + 1) * PW * C, 0.0f);  // zero columns stay zero
    auto z = std::make_shared<std::vector<float>>(kBlk * K);
    return [&, u, z](int64_t row) {
      const int64_t img = row / H, y = row % H;
      const float* base = xp + img * H * W * ldx;
      for (int64_t a = 0; a <= r; ++a) {
        float* ua = u->data() + (a * PW + r) * C;
        const bool up = y - a >= 0, down = y + a < H;
        for (int64_t px = 0; px < W; ++px)
          for (int64_t c = 0; c < C; c += kW) {
            S_::V v = S_::zero();
            if (down) v = S_::load(base + ((y + a) * W + px) * ldx + c);
            if (a > 0 && up) v = S_::add(v, S_::load(base + ((y - a) * W + px) * ldx + c));
            S_::store(ua + px * C + c, v);
          }
      }
      for (int64_t x0 = 0; x0 < W; x0 += kBlk) {
        const int64_t n = std::min(kBlk, W - x0);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t px = x0 + i + r;  // column in the padded u rows
          float* zp = z->data() + i * K;
          for (int64_t a = 0, o = 0; a <= r; ++a) {
            const float* ua = u->data() + a * PW * C;
            for (int64_t b = a; b <= r; ++b, ++o) {
              const float* ub = u->data() + b * PW * C;
              for (int64_t c = 0; c < C; c += kW) {
                S_::V v = S_::load(ua + (px + b) * C + c);  // (dy, dx) = (+-a, +b)
                if (b > 0) v = S_::add(v, S_::load(ua + (px - b) * C + c));
                if (b > a) {  // the transposed taps (+-b, +-a)
                  v = S_::add(v, S_::load(ub + (px + a) * C + c));
                  if (a > 0) v = S_::add(v, S_::load(ub + (px - a) * C + c));
                }
                S_::store(zp + o * C + c, v);
              }
            }
          }
        }
        gemm_block(z->data(), K, n, wp, Cm, K, op + (row * W + x0) * ldo, ldo, O, false);
      }
    };
  });
#else
  TORCH_CHECK(false, "sym_conv needs the AVX2 or AVX-512 build");
#endif
}

// ASID's spatial self-attention over groups of 64 tokens, read from and written to channels-last maps (the
// straight modules copy every group out and back). Group g = (image, i, j), token t = (u, v), both row-major,
// is pixel (8i + u, 8j + v) in a window, (u * H/8 + i, v * W/8 + j) in the dilated grid.
// Computing (attn_in absent): S = softmax(q kᵀ * scale + bias), q and k the columns [q_off, q_off + d) and
// [k_off, k_off + d) of src, bias (64, 64); attn_out (groups, 64, 64), when given, receives S (the map the
// later groups share). Sharing: S = attn_in[g]. Then out[token i] = sum_j S[i, j] v[token j], v the columns
// [v_off, v_off + d) of src; `accumulate`: out[token i] += that sum instead (ASID folds to_out into v's
// weights, and the sum is the block's residual update). Groups are independent, and each writes only its own
// pixels: the result does not depend on the thread count.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Query rows per register block: each product sums one dependent chain of FMAs per accumulator, so a lone row
// (4 vectors for 64 keys, NVD for d values) waits on FMA latency; R rows at a time keep R times as many chains
// in flight, each loaded vector feeding R FMAs (3/4 of the registers: the rest hold loads and broadcasts).
// Measured on ASID's shapes: 0-25% per call (the products were already near the FMA units' peak). Every loop
// over a block is unrolled in full, as in gram_tile: one left rolled indexes the accumulators at run time
// (the computing calls: 93 -> 84 ns per pixel at d = 36).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTokenAccumulators = 24;  // of 32 registers
#else
constexpr int kTokenAccumulators = 12;  // of 16
#endif
template <int N>
constexpr int kTokenRows = N * 8 <= kTokenAccumulators ? 8 : N * 4 <= kTokenAccumulators ? 4
                           : N * 2 <= kTokenAccumulators ? 2 : 1;

template <int NVD>
void token_group(const float* src, int64_t ld, const int64_t* pix, int64_t d, int64_t q_off, int64_t k_off,
                 int64_t v_off, const float* bias, float scale, const float* attn_in, float* attn_out, float* op,
                 int64_t ldo, bool accumulate, float* kt, float* vl, float* S) {
  using S_ = Simd;
  using V = S_::V;
  constexpr int T = 64, kW = S_::kW, NK = T / kW;
  constexpr int64_t Dp = NVD * kW;
  const float* P = attn_in;
  if (!P) {
    constexpr int RQ = kTokenRows<NK>;
    for (int t = 0; t < T; ++t)
      for (int64_t c = 0; c < d; ++c) kt[c * T + t] = src[pix[t] * ld + k_off + c];
    for (int i0 = 0; i0 < T; i0 += RQ) {
      V acc[RQ][NK];
      const float* q[RQ];
#pragma GCC unroll 8
      for (int r = 0; r < RQ; ++r) {
        q[r] = src + pix[i0 + r] * ld + q_off;
#pragma GCC unroll 8
        for (int v = 0; v < NK; ++v) acc[r][v] = S_::zero();
      }
      for (int64_t c = 0; c < d; ++c) {
        V kv[NK];
#pragma GCC unroll 8
        for (int v = 0; v < NK; ++v) kv[v] = S_::load(kt + c * T + v * kW);
#pragma GCC unroll 8
        for (int r = 0; r < RQ; ++r) {
          const V qc = S_::set1(q[r][c]);
#pragma GCC unroll 8
          for (int v = 0; v < NK; ++v) acc[r][v] = S_::fmadd(qc, kv[v], acc[r][v]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < RQ; ++r) {
        const int i = i0 + r;
        V mx = S_::set1(-INFINITY);
#pragma GCC unroll 8
        for (int v = 0; v < NK; ++v) {
          acc[r][v] = S_::fmadd(acc[r][v], S_::set1(scale), S_::load(bias + i * T + v * kW));
          mx = S_::max(mx, acc[r][v]);
        }
        const V m = S_::set1(S_::hmax(mx));
        V sum = S_::zero();
#pragma GCC unroll 8
        for (int v = 0; v < NK; ++v) {
          acc[r][v] = exp_fast(S_::sub(acc[r][v], m));
          sum = S_::add(sum, acc[r][v]);
        }
        const V inv = S_::set1(1.0f / S_::hsum(sum));
#pragma GCC unroll 8
        for (int v = 0; v < NK; ++v) S_::store(S + i * T + v * kW, S_::mul(acc[r][v], inv));
      }
    }
    if (attn_out) std::memcpy(attn_out, S, sizeof(float) * T * T);
    P = S;
  }
  for (int t = 0; t < T; ++t) {
    const float* v = src + pix[t] * ld + v_off;
    for (int64_t c = 0; c < d; ++c) vl[t * Dp + c] = v[c];
    for (int64_t c = d; c < Dp; ++c) vl[t * Dp + c] = 0.0f;
  }
  const auto tail = S_::mask(d - (NVD - 1) * kW);
  constexpr int RO = kTokenRows<NVD>;
  for (int i0 = 0; i0 < T; i0 += RO) {
    V o[RO][NVD];
#pragma GCC unroll 8
    for (int r = 0; r < RO; ++r)
#pragma GCC unroll 8
      for (int n = 0; n < NVD; ++n) o[r][n] = S_::zero();
    for (int j = 0; j < T; ++j) {
      V vv[NVD];
#pragma GCC unroll 8
      for (int n = 0; n < NVD; ++n) vv[n] = S_::load(vl + j * Dp + n * kW);
#pragma GCC unroll 8
      for (int r = 0; r < RO; ++r) {
        const V p = S_::set1(P[(i0 + r) * T + j]);
#pragma GCC unroll 8
        for (int n = 0; n < NVD; ++n) o[r][n] = S_::fmadd(p, vv[n], o[r][n]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RO; ++r) {
      float* dst = op + pix[i0 + r] * ldo;
      if (accumulate) {
#pragma GCC unroll 8
        for (int n = 0; n < NVD - 1; ++n) o[r][n] = S_::add(S_::load(dst + n * kW), o[r][n]);
        o[r][NVD - 1] = S_::add(S_::load(dst + (NVD - 1) * kW, tail), o[r][NVD - 1]);
      }
#pragma GCC unroll 8
      for (int n = 0; n < NVD - 1; ++n) S_::store(dst + n * kW, o[r][n]);
      S_::store(dst + (NVD - 1) * kW, tail, o[r][NVD - 1]);
    }
  }
}
#endif

void token_attention(const Tensor& src, int64_t images, int64_t H, int64_t W, bool grid, int64_t d, int64_t q_off,
                     int64_t k_off, int64_t v_off, const std::optional<Tensor>& bias, double scale,
                     const std::optional<Tensor>& attn_in, const std::optional<Tensor>& attn_out, Tensor out,
                     bool accumulate) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int kW = Simd::kW;
  check_map(src, "src");
  check_map(out, "out");
  TORCH_CHECK(H % 8 == 0 && W % 8 == 0 && src.size(0) == images * H * W && out.size(0) == src.size(0),
              "token_attention: sides multiples of 8");
  const int64_t nvd = (d + kW - 1) / kW;
  TORCH_CHECK(d >= 1 && d <= 64 && out.size(1) >= d && v_off + d <= src.size(1), "token_attention: d in 1..64");
  const int64_t nh = H / 8, nw = W / 8, groups = images * nh * nw;
  const float* ain = opt_ptr(attn_in);
  const float* bp = opt_ptr(bias);
  TORCH_CHECK(ain || (bp && bias->is_contiguous() && bias->numel() == 64 * 64 && q_off + d <= src.size(1) &&
                      k_off + d <= src.size(1)), "token_attention: a 64 x 64 bias to compute the attention");
  if (ain) TORCH_CHECK(attn_in->is_contiguous() && attn_in->numel() == groups * 64 * 64, "attn_in: (groups, 64, 64)");
  float* aout = nullptr;
  if (attn_out.has_value() && attn_out->defined()) {
    TORCH_CHECK(attn_out->is_contiguous() && attn_out->numel() == groups * 64 * 64, "attn_out: (groups, 64, 64)");
    aout = attn_out->data_ptr<float>();
  }
  const float* sp = src.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ld = src.stride(0), ldo = out.stride(0);
  const float sc = static_cast<float>(scale);
  parallel_rows(groups, [&] {
    auto buf = std::make_shared<std::vector<float>>(64 * 64 + 64 * 64 + 64 * 8 * kW + kW);
    return [&, buf](int64_t g) {
      const int64_t img = g / (nh * nw), i = g / nw % nh, j = g % nw;
      int64_t pix[64];
      for (int u = 0; u < 8; ++u)
        for (int v = 0; v < 8; ++v) {
          const int64_t y = grid ? u * nh + i : 8 * i + u, x = grid ? v * nw + j : 8 * j + v;
          pix[u * 8 + v] = (img * H + y) * W + x;
        }
      float* S = buf->data();
      float* kt = S + 64 * 64;
      float* vl = kt + 64 * 64;
      const float* a_in = ain ? ain + g * 64 * 64 : nullptr;
      float* a_out = aout ? aout + g * 64 * 64 : nullptr;
      switch (nvd) {
#define TOKEN_CASE(N) \
  case N: token_group<N>(sp, ld, pix, d, q_off, k_off, v_off, bp, sc, a_in, a_out, op, ldo, accumulate, kt, vl, S); break;
        TOKEN_CASE(1) TOKEN_CASE(2) TOKEN_CASE(3) TOKEN_CASE(4) TOKEN_CASE(5) TOKEN_CASE(6) TOKEN_CASE(7)
        default: token_group<8>(sp, ld, pix, d, q_off, k_off, v_off, bp, sc, a_in, a_out, op, ldo, accumulate, kt, vl, S);
#undef TOKEN_CASE
      }
    };
  });
#else
  TORCH_CHECK(false, "token_attention needs the AVX2 or AVX-512 build");
#endif
}

// Which vector code this build runs: AVX512 (own GEMM, depthwise sweep and GELU), AVX2 or DEFAULT (ATen's
// vector types, BLAS's sgemm)
std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

TORCH_LIBRARY(upscale_cpu, m) {
  m.def("capability() -> str", capability);
  m.def("dwconv3x3(Tensor x, int images, int H, int W, Tensor weight, Tensor? bias, int stride, bool reflect, "
        "Tensor? residual, int act, int mode, Tensor out, Tensor? side_in=None, Tensor? side_bias=None, "
        "Tensor? side_out=None) -> ()", dwconv3x3);
  m.def("pw_dwconv(Tensor x, int images, int H, int W, Tensor wpw, int conv_off, Tensor weight, Tensor? bias, "
        "bool reflect, Tensor? residual, int act, int mode, Tensor out, Tensor? side_bias=None, "
        "Tensor? side_out=None, Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=0.0, Tensor? epi_w=None, "
        "Tensor? epi_out=None) -> ()", pw_dwconv);
  m.def("distill_chain(Tensor u, int images, int H, int W, Tensor[] wpw, int dc, Tensor[] taps, Tensor[] dw_bias, "
        "Tensor[] side_bias, Tensor c4_taps, Tensor c4_bias, Tensor c5_wt, Tensor z, int strip=0) -> ()", distill_chain);
  m.def("bias_act", bias_act);
  m.def("gemm(Tensor x, Tensor w, Tensor out, bool accumulate, Tensor? ln_weight=None, Tensor? ln_bias=None, "
        "float ln_eps=0.0) -> ()", gemm);
  m.def("rcca_stats", rcca_stats);
  m.def("rcca_weight", rcca_weight);
  m.def("rcca_local_weight", rcca_local_weight);
  m.def("rcca_local(Tensor z, int images, int H, int W, int size, Tensor taps, Tensor dw_bias, Tensor du0, Tensor b0, "
        "Tensor du2, Tensor b2, Tensor dec_w, float dec_b, Tensor sigma, Tensor out) -> ()", rcca_local);
  m.def("rcca_combine", rcca_combine);
  m.def("mvsa_head", mvsa_head);
  m.def("mvsa_tail", mvsa_tail);
  m.def("cell_gram(Tensor qk, int images, int H, int W, int C, Tensor row_seg, Tensor col_seg, int ny, int nx, "
        "Tensor gram, Tensor sq, int heads=1, int offsets=0) -> ()", cell_gram);
  m.def("qkv_gram(Tensor x, int images, int H, int W, Tensor wpw, Tensor weight, Tensor? ln_weight, Tensor? ln_bias, "
        "float ln_eps, int C, Tensor row_seg, Tensor col_seg, int ny, int nx, int heads, Tensor v, Tensor gram, "
        "Tensor sq) -> ()", qkv_gram);
  m.def("cell_mats", cell_mats);
  m.def("cell_apply(Tensor v, Tensor z, Tensor mats, int images, int H, int W, Tensor row_seg, Tensor col_seg, "
        "int ny, int nx, Tensor out, Tensor? residual=None, Tensor? sum_out=None, int offsets=0) -> ()", cell_apply);
  m.def("mvsa_coarse", mvsa_coarse);
  m.def("pixel_shuffle(Tensor x, int images, int H, int W, int s, Tensor out, int row0=0) -> ()", pixel_shuffle);
  m.def("window_attention", window_attention);
  m.def("sym_conv", sym_conv);
  m.def("token_attention(Tensor src, int images, int H, int W, bool grid, int d, int q_off, int k_off, int v_off, "
        "Tensor? bias, float scale, Tensor? attn_in, Tensor? attn_out, Tensor out, bool accumulate=False) -> ()",
        token_attention);
}
