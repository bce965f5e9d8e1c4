// ASER W4A8 linear on x86 CPUs: packed int4 weights x int8 per-token activations in integer dot products, with the
// ASER extras (smoothing, low-rank branch) and the bias fused around one GEMM.
//
//   y = s_x * sum_g s_w[n, g] * (x_q . w_q)_g + (x~ @ down^T) @ up^T + bias,   x~ = x * inv_smooth,
//   x_q = clamp(round(x~ / s_x), +-qmax),   s_x = max|x~| / qmax   (per token, as the reference kernel).
// With `hadamard` = b > 0 each row is first rotated, x -> x blockdiag(H_b) (the layer's online input rotation,
// vllm_aser/kernels/hadamard.py; the 1/sqrt(b) is in inv_smooth), by a butterfly in float32 in the same pass.
//
// Weight layout (made by `pack_weight` in vllm_aser/kernels/cpu_w4a8.py): codes stored offset-binary (w + 8,
// 0..15), so that they are the unsigned operand of u8 x s8 dot products, in blocks of 16 output channels x 8 input
// channels = 64 bytes: byte 4n + j of block (nb, kb) holds channel 16nb + n, input 8kb + j in its low nibble and
// input 8kb + 4 + j in its high nibble. One 32-bit lane per output channel: a broadcast of 4 int8 activations
// against a block gives 16 channels' partial dot products with no horizontal sums (VNNI vpdpbusd, or vpmaddubsw +
// vpmaddwd before VNNI, where 2 x 15 x 127 stays far inside int16: nothing saturates). The offset is removed per
// group: sum (w + 8) x = sum w x + 8 sum x.
//
// One call = an activation pass (rows in parallel) + a GEMM pass (blocks of output channels in parallel; group
// scales, per-token scale, low-rank up-projection and bias in the epilogue). Threads: ATen's OpenMP pool, which
// vLLM's CPU worker binds.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace aser_w4a8 {

constexpr int kBlockN = 16;  // output channels per block
constexpr int kBlockK = 8;   // input channels per block
constexpr int kBlockBytes = kBlockN * kBlockK / 2;

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512Bw = 2, kAvx512Vnni = 3 };
enum LowRankType : int { kLowRankF32 = 0, kLowRankF16 = 1, kLowRankBF16 = 2 };  // kept in the artifact's dtype

int64_t detect_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) return kAvx512Vnni;
  if (avx512) return kAvx512Bw;
  return avx2 ? kAvx2 : kNone;
}

struct ActivationPass {
  int64_t M, K, Kp, G, group, rank, qmax;
  int64_t hadamard;         // > 0: rotate each row first, x blockdiag(H_b) (Sylvester, unscaled), b = hadamard
  const float* inv_smooth;  // [K] or nullptr
  const void* down;         // [K, rank] (transposed; rank padded to a multiple of 16) or nullptr
  int lowrank_type;         // LowRankType of down and up
  int8_t* xq;               // [M, Kp], zero padded
  float* x_scale;           // [M]
  int32_t* x_sum;           // [M, G]: sum of x_q per weight group (removes the weight offset)
  float* t;                 // [M, rank]: x~ @ down^T
};

struct GemmArgs {
  const uint8_t* w;      // [Nb, Kb, 64]
  const float* w_scale;  // [Nb, G, 16]
  const void* up;        // [Nb, rank, 16] (rank padded as down's) or nullptr
  const float* bias;     // [Nb * 16] or nullptr
  const int8_t* xq;
  const float* x_scale;
  const int32_t* x_sum;
  const float* t;
  int64_t M, N, Kb, G, group_kb, rank;
  int lowrank_type;
};

// Entry points each ISA namespace defines (non-template, so that they carry the namespace's target options).
#define ASER_ISA_ENTRY_POINTS                                                                                      \
  void act_pass(const float* x, const ActivationPass& p, int64_t m0, int64_t m1) { activation_rows(x, p, m0, m1); } \
  void act_pass(const c10::BFloat16* x, const ActivationPass& p, int64_t m0, int64_t m1) {                        \
    activation_rows(x, p, m0, m1);                                                                                 \
  }                                                                                                                \
  void act_pass(const c10::Half* x, const ActivationPass& p, int64_t m0, int64_t m1) {                            \
    activation_rows(x, p, m0, m1);                                                                                 \
  }                                                                                                                \
  void gemm_part(const GemmArgs& a, bool d, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* o) {           \
    gemm_range(a, d, m0, m1, n0, n1, o);                                                                           \
  }                                                                                                                \
  void gemm_part(const GemmArgs& a, bool d, int64_t m0, int64_t m1, int64_t n0, int64_t n1, c10::BFloat16* o) {   \
    gemm_range(a, d, m0, m1, n0, n1, o);                                                                           \
  }                                                                                                                \
  void gemm_part(const GemmArgs& a, bool d, int64_t m0, int64_t m1, int64_t n0, int64_t n1, c10::Half* o) {       \
    gemm_range(a, d, m0, m1, n0, n1, o);                                                                           \
  }

// ================================================ AVX-512 ======================================================
#define ASER_AVX512_HELPERS                                                                                        \
  constexpr int W = 16;                                                                                            \
  using VF = __m512;                                                                                               \
  using VI = __m512i;                                                                                              \
  inline VF vf_zero() { return _mm512_setzero_ps(); }                                                              \
  inline VF vf_set1(float v) { return _mm512_set1_ps(v); }                                                         \
  inline VF vf_load(const float* p) { return _mm512_loadu_ps(p); }                                                 \
  inline VF vf_load(const c10::BFloat16* p) {                                                                      \
    return _mm512_castsi512_ps(                                                                                    \
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));    \
  }                                                                                                                \
  inline VF vf_load(const c10::Half* p) {                                                                          \
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));                              \
  }                                                                                                                \
  inline void vf_store(float* p, VF v) { _mm512_storeu_ps(p, v); }                                                 \
  inline void vf_store(c10::BFloat16* p, VF v) {                                                                   \
    __m512i u = _mm512_castps_si512(v);                                                                            \
    __m512i r = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),                 \
                                 _mm512_set1_epi32(0x7FFF));                                                       \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),                                                             \
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16)));                     \
  }                                                                                                                \
  inline void vf_store(c10::Half* p, VF v) {                                                                       \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));             \
  }                                                                                                                \
  inline VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }                                                     \
  inline VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }                                                     \
  inline VF vf_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }                                                     \
  inline VF vf_div(VF a, VF b) { return _mm512_div_ps(a, b); }                                                     \
  inline VF vf_fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }                                        \
  /* the butterfly stages of spans 1, 2, 4, 8 inside one register: lo + hi in the low lanes, lo - hi in the    */ \
  /* high ones, as v * (+1 | -1) + swapped(v): exact, so the same sums as the scalar stages                    */ \
  inline VF vf_hadamard_lanes(VF v) {                                                                              \
    v = _mm512_fmadd_ps(v, _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1),                 \
                        _mm512_permute_ps(v, 0xB1));                                                               \
    v = _mm512_fmadd_ps(v, _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1),                 \
                        _mm512_permute_ps(v, 0x4E));                                                               \
    v = _mm512_fmadd_ps(v, _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1),                 \
                        _mm512_shuffle_f32x4(v, v, 0xB1));                                                         \
    return _mm512_fmadd_ps(v, _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1),             \
                           _mm512_shuffle_f32x4(v, v, 0x4E));                                                      \
  }                                                                                                                \
  inline VF vf_max(VF a, VF b) { return _mm512_max_ps(a, b); }                                                     \
  inline VF vf_abs(VF a) { return _mm512_abs_ps(a); }                                                              \
  inline float vf_hmax(VF a) { return _mm512_reduce_max_ps(a); }                                                   \
  inline float vf_hsum(VF a) { return _mm512_reduce_add_ps(a); }                                                   \
  inline VI vf_clamp_round(VF v, VF lim) {                                                                         \
    VF r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                 \
    return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));     \
  }                                                                                                                \
  inline void vf_store_i8(int8_t* p, VI v) {                                                                       \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));                                      \
  }                                                                                                                \
  inline VI vi_zero() { return _mm512_setzero_si512(); }                                                           \
  inline VI vi_set1(int32_t v) { return _mm512_set1_epi32(v); }                                                    \
  inline VF vi_sub_to_float(VI a, VI b) { return _mm512_cvtepi32_ps(_mm512_sub_epi32(a, b)); }                     \
  inline void unpack_nibbles(const uint8_t* p, VI& lo, VI& hi) {                                                   \
    const VI v = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0F);                                             \
    lo = _mm512_and_si512(v, mask);                                                                                \
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);                                                          \
  }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace avx512_vnni {
ASER_AVX512_HELPERS
inline VI dot8(VI acc, VI lo, VI xa, VI hi, VI xb) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, xa), hi, xb);
}
constexpr int kDecodeBlocks = 4, kPrefillRows = 4, kPrefillBlocks = 2, kRankVectors = 4;
#include "w4a8_cpu_isa.inc"
ASER_ISA_ENTRY_POINTS
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512_bw {
ASER_AVX512_HELPERS
inline VI dot8(VI acc, VI lo, VI xa, VI hi, VI xb) {
  const VI pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xa), _mm512_maddubs_epi16(hi, xb));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
constexpr int kDecodeBlocks = 4, kPrefillRows = 4, kPrefillBlocks = 2, kRankVectors = 4;
#include "w4a8_cpu_isa.inc"
ASER_ISA_ENTRY_POINTS
}  // namespace avx512_bw
#pragma GCC pop_options

// ================================================= AVX2 ========================================================
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int W = 8;
using VF = __m256;
using VI = __m256i;
inline VF vf_zero() { return _mm256_setzero_ps(); }
inline VF vf_set1(float v) { return _mm256_set1_ps(v); }
inline VF vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline VF vf_load(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline VF vf_load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vf_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline void vf_store(c10::BFloat16* p, VF v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i r = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                               _mm256_set1_epi32(0x7FFF));
  __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void vf_store(c10::Half* p, VF v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vf_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vf_div(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF vf_fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
// the butterfly stages of spans 1, 2, 4 inside one register (see the AVX-512 helper)
inline VF vf_hadamard_lanes(VF v) {
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1), _mm256_permute_ps(v, 0x4E));
  return _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1), _mm256_permute2f128_ps(v, v, 1));
}
inline VF vf_max(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF vf_abs(VF a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline float vf_hmax(VF a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float vf_hsum(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline VI vf_clamp_round(VF v, VF lim) {
  VF r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim));
}
inline void vf_store_i8(int8_t* p, VI v) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w16, w16));
}
inline VI vi_zero() { return _mm256_setzero_si256(); }
inline VI vi_set1(int32_t v) { return _mm256_set1_epi32(v); }
inline VF vi_sub_to_float(VI a, VI b) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(a, b)); }
inline void unpack_nibbles(const uint8_t* p, VI& lo, VI& hi) {
  const VI v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), mask = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}
inline VI dot8(VI acc, VI lo, VI xa, VI hi, VI xb) {
  const VI pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
constexpr int kDecodeBlocks = 2, kPrefillRows = 4, kPrefillBlocks = 1, kRankVectors = 2;
#include "w4a8_cpu_isa.inc"
ASER_ISA_ENTRY_POINTS
}  // namespace avx2
#pragma GCC pop_options

// ============================================== dispatch =======================================================

template <typename T>
void act_pass(int64_t isa, const T* x, const ActivationPass& p, int64_t m0, int64_t m1) {
  if (isa == kAvx512Vnni) return avx512_vnni::act_pass(x, p, m0, m1);
  if (isa == kAvx512Bw) return avx512_bw::act_pass(x, p, m0, m1);
  avx2::act_pass(x, p, m0, m1);
}

template <typename T>
void gemm_part(int64_t isa, const GemmArgs& a, bool decode, int64_t m0, int64_t m1, int64_t n0, int64_t n1, T* o) {
  if (isa == kAvx512Vnni) return avx512_vnni::gemm_part(a, decode, m0, m1, n0, n1, o);
  if (isa == kAvx512Bw) return avx512_bw::gemm_part(a, decode, m0, m1, n0, n1, o);
  avx2::gemm_part(a, decode, m0, m1, n0, n1, o);
}

constexpr int64_t kDecodeMaxRows = 3;  // up to here: bandwidth-bound, each weight block streamed once per row
constexpr int64_t kPrefillRowChunk = 64;

int64_t decode_blocks(int64_t isa) { return isa == kAvx2 ? avx2::kDecodeBlocks : avx512_vnni::kDecodeBlocks; }
int64_t prefill_blocks(int64_t isa) { return isa == kAvx2 ? avx2::kPrefillBlocks : avx512_vnni::kPrefillBlocks; }

template <typename T>
void run(int64_t isa, const T* x, const ActivationPass& p, const GemmArgs& a, T* out) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.K * (1 + p.rank)));
  at::parallel_for(0, p.M, grain, [&](int64_t m0, int64_t m1) { act_pass(isa, x, p, m0, m1); });
  const int64_t Nb = (a.N + kBlockN - 1) / kBlockN;
  const bool decode = a.M <= kDecodeMaxRows;
  const int64_t nb_unit = decode ? decode_blocks(isa) : prefill_blocks(isa);
  const int64_t units = (Nb + nb_unit - 1) / nb_unit;
  // rows in chunks (prefill): a thread's weight slice stays in cache while a chunk's activations stream past it
  const int64_t chunk = decode ? a.M : kPrefillRowChunk;
  for (int64_t mc = 0; mc < a.M; mc += chunk) {
    const int64_t mc1 = std::min(a.M, mc + chunk);
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      gemm_part(isa, a, decode, mc, mc1, u0 * nb_unit, std::min(Nb, u1 * nb_unit), out);
    });
  }
}

torch::Tensor w4a8_linear(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& w_scale,
                          int64_t group_size, const c10::optional<torch::Tensor>& inv_smooth,
                          const c10::optional<torch::Tensor>& down, const c10::optional<torch::Tensor>& up,
                          const c10::optional<torch::Tensor>& bias, int64_t n_out, int64_t act_bits, int64_t isa,
                          int64_t hadamard) {
  TORCH_CHECK(x_in.dim() == 2, "aser w4a8: x must be 2-D");
  const torch::Tensor x = x_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(2) == kBlockBytes && w.is_contiguous(),
              "aser w4a8: weight must be uint8 [N/16, K/8, 64] (pack_weight)");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 3 && w_scale.is_contiguous(),
              "aser w4a8: weight scale must be float32 [N/16, groups, 16]");
  TORCH_CHECK(isa >= kAvx2 && isa <= detect_isa(), "aser w4a8: ISA path ", isa, " is not available on this CPU");
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "aser w4a8: act_bits must be in 2..8");
  TORCH_CHECK(hadamard == 0 || (hadamard >= 2 && (hadamard & (hadamard - 1)) == 0 && x.size(1) % hadamard == 0),
              "aser w4a8: hadamard must be 0 or a power of two >= 2 dividing K = ", x.size(1), ", got ", hadamard);
  const int64_t M = x.size(0), K = x.size(1), Nb = w.size(0), Kb = w.size(1), G = w_scale.size(1);
  const int64_t Kp = Kb * kBlockK;
  TORCH_CHECK(Kp >= K && Kp - K < kBlockK, "aser w4a8: weight has ", Kp, " input channels for K = ", K);
  TORCH_CHECK(Nb * kBlockN >= n_out && Nb * kBlockN - n_out < kBlockN && w_scale.size(0) == Nb &&
                  w_scale.size(2) == kBlockN,
              "aser w4a8: weight / scale blocks do not match N = ", n_out);
  const int64_t group = group_size <= 0 ? Kp : group_size;
  TORCH_CHECK(group % kBlockK == 0 && (Kp + group - 1) / group == G, "aser w4a8: group size does not match scales");
  const int64_t rank = down.has_value() ? down->size(1) : 0;
  int lowrank_type = kLowRankF32;
  if (rank) {
    const auto dt = down->scalar_type();
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
                "aser w4a8: low-rank factors must be float16, bfloat16 or float32");
    lowrank_type = dt == at::kHalf ? kLowRankF16 : dt == at::kBFloat16 ? kLowRankBF16 : kLowRankF32;
    TORCH_CHECK(down->is_contiguous() && down->size(0) == K && rank % 16 == 0,
                "aser w4a8: down must be [K, rank] with rank a multiple of 16 (pack)");
    TORCH_CHECK(up.has_value() && up->scalar_type() == dt && up->is_contiguous() && up->size(0) == Nb &&
                    up->size(1) == rank && up->size(2) == kBlockN,
                "aser w4a8: up must be [N/16, rank, 16] of down's dtype");
  }
  if (inv_smooth.has_value())
    TORCH_CHECK(inv_smooth->scalar_type() == at::kFloat && inv_smooth->numel() == K && inv_smooth->is_contiguous(),
                "aser w4a8: inv_smooth must be float32 [K]");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == Nb * kBlockN && bias->is_contiguous(),
                "aser w4a8: bias must be float32 [N/16 * 16]");

  auto xq = torch::empty({M, Kp}, x.options().dtype(at::kChar));
  auto x_scale = torch::empty({M}, x.options().dtype(at::kFloat));
  auto x_sum = torch::empty({M, G}, x.options().dtype(at::kInt));
  auto t = torch::empty({M, std::max<int64_t>(rank, 1)}, x.options().dtype(at::kFloat));
  auto out = torch::empty({M, n_out}, x.options());
  const void* down_p = rank ? down->data_ptr() : nullptr;
  const void* up_p = rank ? up->data_ptr() : nullptr;
  ActivationPass p{M, K, Kp, G, group, rank, (int64_t{1} << (act_bits - 1)) - 1, hadamard,
                   inv_smooth.has_value() ? inv_smooth->data_ptr<float>() : nullptr, down_p, lowrank_type,
                   xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(), x_sum.data_ptr<int32_t>(), t.data_ptr<float>()};
  GemmArgs a{w.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), up_p,
             bias.has_value() ? bias->data_ptr<float>() : nullptr,
             xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(), x_sum.data_ptr<int32_t>(), t.data_ptr<float>(),
             M, n_out, Kb, G, group / kBlockK, rank, lowrank_type};
  if (M == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat:
      run(isa, x.data_ptr<float>(), p, a, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      run(isa, reinterpret_cast<const c10::BFloat16*>(x.data_ptr<at::BFloat16>()), p, a,
          reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>()));
      break;
    case at::kHalf:
      run(isa, reinterpret_cast<const c10::Half*>(x.data_ptr<at::Half>()), p, a,
          reinterpret_cast<c10::Half*>(out.data_ptr<at::Half>()));
      break;
    default:
      TORCH_CHECK(false, "aser w4a8: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

int64_t best_isa() { return detect_isa(); }

// One MoE layer's routed experts in one call (vllm_aser/moe_method.py): tokens grouped by expert with a counting
// sort, then per expert with tokens: gather its rows, w13 (gate and up stacked, gate rows first), the gated
// activation, w2, and the routing weight, accumulated in float32. Weights are stacked over experts ([E, ...] of
// each w4a8_linear operand; low-rank ranks padded to the layer's largest), so the loop over experts never returns
// to Python and nothing is read back to choose a path.
enum MoeActivation : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

static c10::optional<torch::Tensor> expert_slice(const c10::optional<torch::Tensor>& t, int64_t e) {
  if (!t.has_value()) return c10::nullopt;
  return t->select(0, e);
}

torch::Tensor w4a8_moe(const torch::Tensor& x_in, const torch::Tensor& topk_ids, const torch::Tensor& topk_weights,
                       const torch::Tensor& w13, const torch::Tensor& w13_scale,
                       const c10::optional<torch::Tensor>& w13_inv_smooth,
                       const c10::optional<torch::Tensor>& w13_down, const c10::optional<torch::Tensor>& w13_up,
                       const torch::Tensor& w2, const torch::Tensor& w2_scale,
                       const c10::optional<torch::Tensor>& w2_inv_smooth,
                       const c10::optional<torch::Tensor>& w2_down, const c10::optional<torch::Tensor>& w2_up,
                       int64_t group13, int64_t group2, int64_t inter, int64_t act_bits, int64_t isa,
                       int64_t activation) {
  TORCH_CHECK(x_in.dim() == 2, "aser w4a8_moe: x must be 2-D [tokens, hidden]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x_in.size(0) && topk_weights.sizes() == topk_ids.sizes(),
              "aser w4a8_moe: topk_ids and topk_weights must be [tokens, k]");
  TORCH_CHECK(w13.dim() == 4 && w2.dim() == 4 && w13.size(0) == w2.size(0),
              "aser w4a8_moe: w13 and w2 must be stacked packed weights [experts, N/16, K/8, 64]");
  TORCH_CHECK(activation >= kSilu && activation <= kGeluTanh, "aser w4a8_moe: unknown activation ", activation);
  const torch::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1), E = w13.size(0);
  const torch::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const torch::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "aser w4a8_moe: expert id ", id[i], " outside 0..", E - 1);
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  auto picks = torch::empty({T * k}, ids.options());  // flat (token, slot) indices, grouped by expert
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    int64_t* pk = picks.data_ptr<int64_t>();
    for (int64_t i = 0; i < T * k; ++i) pk[fill[id[i]]++] = i;
  }
  auto acc = torch::zeros({T, H}, x.options().dtype(at::kFloat));
  const torch::Tensor flat_weights = weights.reshape({-1});
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (!n) continue;
    const torch::Tensor slots = picks.narrow(0, start[e], n);
    const torch::Tensor tokens = at::floor_divide(slots, k);
    const torch::Tensor h = w4a8_linear(x.index_select(0, tokens), w13.select(0, e), w13_scale.select(0, e),
                                        group13, expert_slice(w13_inv_smooth, e), expert_slice(w13_down, e),
                                        expert_slice(w13_up, e), c10::nullopt, 2 * inter, act_bits, isa, 0);
    const torch::Tensor gate = h.narrow(1, 0, inter), up = h.narrow(1, inter, inter);
    const torch::Tensor act = activation == kSilu ? at::silu(gate)
                              : activation == kGelu ? at::gelu(gate) : at::gelu(gate, "tanh");
    const torch::Tensor y = w4a8_linear(act * up, w2.select(0, e), w2_scale.select(0, e), group2,
                                        expert_slice(w2_inv_smooth, e), expert_slice(w2_down, e),
                                        expert_slice(w2_up, e), c10::nullopt, H, act_bits, isa, 0);
    acc.index_add_(0, tokens, y.to(at::kFloat) * flat_weights.index_select(0, slots).unsqueeze(1));
  }
  return acc.to(x.scalar_type());
}


// The online input rotation (vllm_aser/kernels/hadamard.py): y = x blockdiag(H_b), unscaled (the layer's smoothing
// scale carries the 1/sqrt(b)), H_b the Sylvester matrix. An in-place butterfly per block in float32, rounded once
// to x's dtype: b log2(b) additions where a dense block would take b^2 multiply-adds.
template <typename T>
void hadamard_rows(const T* x, T* y, int64_t m0, int64_t m1, int64_t K, int64_t block) {
  std::vector<float> buf(block);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const T* src = x + m * K + k0;
      for (int64_t j = 0; j < block; ++j) buf[j] = static_cast<float>(src[j]);
      for (int64_t h = 1; h < block; h *= 2) {
        for (int64_t i = 0; i < block; i += 2 * h) {
          float* lo = buf.data() + i;
          float* hi = lo + h;
          for (int64_t j = 0; j < h; ++j) {
            const float a = lo[j], b = hi[j];
            lo[j] = a + b;
            hi[j] = a - b;
          }
        }
      }
      T* dst = y + m * K + k0;
      for (int64_t j = 0; j < block; ++j) dst[j] = static_cast<T>(buf[j]);
    }
  }
}

torch::Tensor hadamard(const torch::Tensor& x_in, int64_t block) {
  TORCH_CHECK(x_in.dim() == 2, "aser hadamard: x must be 2-D");
  TORCH_CHECK(block >= 2 && (block & (block - 1)) == 0, "aser hadamard: block must be a power of two >= 2");
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % block == 0, "aser hadamard: ", K, " features are not a multiple of the block ", block);
  auto y = torch::empty_like(x);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "aser_hadamard", [&] {
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      hadamard_rows(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), m0, m1, K, block);
    });
  });
  return y;
}

}  // namespace aser_w4a8

TORCH_LIBRARY(aser_cpu, m) {
  m.def("best_isa() -> int", &aser_w4a8::best_isa);
  m.def(
      "w4a8_linear(Tensor x, Tensor w, Tensor w_scale, int group_size, Tensor? inv_smooth, Tensor? down, "
      "Tensor? up, Tensor? bias, int n_out, int act_bits, int isa, int hadamard=0) -> Tensor");
  m.def("hadamard(Tensor x, int block) -> Tensor");
  m.def(
      "w4a8_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w13_scale, Tensor? w13_inv_smooth, "
      "Tensor? w13_down, Tensor? w13_up, Tensor w2, Tensor w2_scale, Tensor? w2_inv_smooth, Tensor? w2_down, "
      "Tensor? w2_up, int group13, int group2, int inter, int act_bits, int isa, int activation) -> Tensor");
}

// a CPU kernel (not a composite one), so that torch.compile can take the fake implementation registered in Python
TORCH_LIBRARY_IMPL(aser_cpu, CPU, m) {
  m.impl("w4a8_linear", &aser_w4a8::w4a8_linear);
  m.impl("hadamard", &aser_w4a8::hadamard);
  m.impl("w4a8_moe", &aser_w4a8::w4a8_moe);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "ASER W4A8 CPU kernel (ops in torch.ops.aser_cpu)"; }
