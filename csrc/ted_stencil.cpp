// CPU stencil of the fused TED adapter (forward and backward): all of the op's non-GEMM work.
//
// Layout: S, dS, dZ are (B·T·L, 2r) row-major, E half in columns [0, r), D half in [r, 2r);
// row (b·T + t)·L + l is token l of frame t of clip b, l = 0 the class token, l ≥ 1 the patch
// grid row-major. Z holds x·[W_e; W_d]ᵀ WITHOUT biases: b_e and b_d are applied here, so the down
// projection stays a plain GEMM and Z_d can be differenced across frames exactly. Z is read through
// ZRows: either one (B·T·L, 2r) tensor like S, or (what the backward gets) its patch rows
// ((B·T)·(L−1), 2r) and the E half of its class rows (B·T, r; the class row has no D branch) apart,
// because Z is what autograd saves and the class rows are cheaper to recompute (a GEMM of B·T rows)
// than to keep.
//
//   S_e[t]   = cb_e + Σ_k w_e[k]·(Z_e[t+k−1] + b_e)                       (zero padded in t)
//   U[t, p]  = [t ≥ 1]·(Z_d[t, p] − Z_d[t−1, p]) + b_d                    (= down_d(x_t − x_{t−1}))
//   S_d[t,p] = cb_d + Σ_{a,b} w_d[a,b]·U[t, p + (a−1, b−1)]              (zero padded on the grid)
//   S_d[class row] = 0
//
// Work unit = (clip, grid row or class token, channel chunk), walking every frame: the 3×3 conv is
// a sliding register window along the grid row (each U / dS column is loaded once, not 9 times),
// and the backward walks t downwards so dZ_d[t] = dU[t] − dU[t+1] is written as soon as dU[t] is
// known. A unit runs its parts (E, D, and the C-wide output / gradient rows) one after the other,
// each over all frames, so each part's rows stay cached across its frame taps. Each pass thus
// touches every C- or r-wide row once; the small gradients go to per-row partials (no atomics): a
// unit zeroes and fills only its own row's slot at its own channels, and the slots are summed in row
// order at the end, so the result is bitwise reproducible whatever the thread count or scheduling.
//
// Vectors are GCC vector extensions of W float lanes, so one source serves every ISA; setup.py
// builds for x86-64-v2, so the units are also compiled for AVX2 and AVX-512 and picked at run time.
#include "ted_stencil.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call

namespace m2clip {
namespace {

#define M2_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define M2_X86 1
#define M2_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define M2_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define M2_X86 0
#endif

using bf16 = uint16_t;  // raw bits

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef uint16_t H __attribute__((vector_size(2 * W)));
};

template <int W>
M2_INLINE typename Vec<W>::F vload(const float* p) {
  typename Vec<W>::F v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <int W>
M2_INLINE typename Vec<W>::F vload(const bf16* p) {
  typename Vec<W>::H h;
  __builtin_memcpy(&h, p, sizeof h);
  return __builtin_bit_cast(typename Vec<W>::F, __builtin_convertvector(h, typename Vec<W>::U) << 16);
}
template <int W>
M2_INLINE void vstore(float* p, typename Vec<W>::F v) {
  __builtin_memcpy(p, &v, sizeof v);
}
template <int W>
M2_INLINE void vstore(bf16* p, typename Vec<W>::F v) {
  // Round to nearest even like c10::BFloat16; a NaN stays a quiet NaN instead of rounding to inf.
  using U = typename Vec<W>::U;
  const U u = __builtin_bit_cast(U, v);
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U bits = (v != v) ? U{} + 0x7fc0u : rounded;
  const typename Vec<W>::H h = __builtin_convertvector(bits, typename Vec<W>::H);
  __builtin_memcpy(p, &h, sizeof h);
}
// Stores of finished output rows bypass the cache (streaming stores): the pass is bound by memory
// traffic, and a normal store first reads the line it overwrites. Unaligned addresses, single lanes
// and bf16 outputs use ordinary stores. Callers end with stream_fence() before the data is read.
#ifndef M2_STREAM
#define M2_STREAM 1
#endif
template <int W>
M2_INLINE void vstream(float* p, typename Vec<W>::F v) {
  vstore<W>(p, v);
}
template <int W>
M2_INLINE void vstream(bf16* p, typename Vec<W>::F v) {
  vstore<W>(p, v);
}
#if M2_X86 && M2_STREAM
template <>
M2_INLINE void vstream<4>(float* p, Vec<4>::F v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) _mm_stream_ps(p, reinterpret_cast<__m128>(v));
  else vstore<4>(p, v);
}
// Not always_inline: the generic callers are compiled for the baseline ISA before being inlined
// into the AVX2 / AVX-512 units, where GCC then inlines these.
template <>
inline M2_TARGET_AVX2 void vstream<8>(float* p, Vec<8>::F v) {
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
  else vstore<8>(p, v);
}
template <>
inline M2_TARGET_AVX512 void vstream<16>(float* p, Vec<16>::F v) {
  if (reinterpret_cast<uintptr_t>(p) % 64 == 0) _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
  else vstore<16>(p, v);
}
M2_INLINE void stream_fence() { _mm_sfence(); }
#else
M2_INLINE void stream_fence() {}
#endif

template <int W>
M2_INLINE typename Vec<W>::F vzero() {
  return typename Vec<W>::F{};
}
template <int W>
M2_INLINE void vaccumulate(float* p, typename Vec<W>::F v) {
  vstore<W>(p, vload<W>(p) + v);
}

struct Geometry {
  int64_t B, T, L, h, w, r, C;
};

// Conv weights arrive channel-major (r, k); the kernels read them tap-major (k, r) so that a tap is
// a contiguous channel vector. Biases and taps are float whatever the activation dtype.
struct Params {
  const float *b_e, *w_e /*3×r*/, *cb_e, *b_d, *w_d /*9×r*/, *cb_d;
};

// Clip b, grid row gi (−1: the class token), r channels [r0, r1), C channels [c0, c1).
struct Unit {
  int64_t b, gi, r0, r1, c0, c1;
  int64_t first_token(const Geometry& g) const { return gi < 0 ? 0 : 1 + gi * g.w; }
  int64_t tokens(const Geometry& g) const { return gi < 0 ? 1 : g.w; }
};

struct Split {
  int64_t chunks, r_per, c_per;
  int64_t units(const Geometry& g) const { return g.B * (g.h + 1) * chunks; }
  Unit unit(const Geometry& g, int64_t i) const {
    const int64_t k = i % chunks, row = i / chunks;
    return Unit{row / (g.h + 1), row % (g.h + 1) - 1, std::min(g.r, k * r_per), std::min(g.r, (k + 1) * r_per),
                std::min(g.C, k * c_per), std::min(g.C, (k + 1) * c_per)};
  }
};

Split split_for(const Geometry& g, int threads) {
  // Enough units for dynamic scheduling to even out the lighter class-token units and a shared
  // machine; chunk bounds are multiples of 16 lanes so every ISA's full blocks stay aligned.
  const int64_t rows = g.B * (g.h + 1);
  const int64_t want = std::max<int64_t>(1, (16 * threads + rows - 1) / rows);
  const int64_t chunks = std::min<int64_t>(want, std::max<int64_t>(1, g.r / 64));
  auto per = [chunks](int64_t n) { return (((n + chunks - 1) / chunks) + 15) / 16 * 16; };
  return Split{chunks, per(g.r), per(g.C)};
}

// Z's rows: frame f = b·T + t has its patch rows (2r apart) from patch + f·patch_frame and the E half
// of its class row at cls + f·cls_frame.
template <typename Tz>
struct ZRows {
  const Tz* patch;
  const Tz* cls;
  int64_t patch_frame, cls_frame;
  static ZRows full(const Tz* z, const Geometry& g) { return {z + 2 * g.r, z, g.L * 2 * g.r, g.L * 2 * g.r}; }
  static ZRows split(const Tz* patch, const Tz* cls, const Geometry& g) {
    return {patch, cls, (g.L - 1) * 2 * g.r, g.r};
  }
  // Token l of frame f, and the distance from a row to the same token one frame later.
  M2_INLINE const Tz* row(const Geometry& g, int64_t f, int64_t l) const {
    return l == 0 ? cls + f * cls_frame : patch + f * patch_frame + (l - 1) * 2 * g.r;
  }
  M2_INLINE int64_t frame_stride(bool class_row) const { return class_row ? cls_frame : patch_frame; }
};

// ---- forward ---------------------------------------------------------------------------------
template <typename Tz, typename To>
struct FwdArgs {
  Geometry g;
  Params p;
  ZRows<Tz> Z;
  Tz* S;
  const To* residual;       // null: no output initialisation requested
  To* out;                  // residual + up biases, completed in place by the up GEMM (beta = 1)
  const float* bias_cls;    // b_ue
  const float* bias_patch;  // b_ue + b_ud
};

// The E branch at frame t, channel block c: its taps, biases, and the neighbour frames' offsets, in
// Z and in the (B·T·L)-row tensors. Out-of-range neighbours point at the centre row and are scaled
// by 0: branch-free and in bounds.
template <int W, typename Tz>
struct TemporalTaps {
  using F = typename Vec<W>::F;
  F be, cb, w0, w1, w2;
  float fm, fp;        // 1 where frame t−1 / t+1 exists, else 0
  int64_t om, op;      // element offsets of frames t−1 / t+1 in S, dS, dZ
  int64_t zm, zp;      // the same in Z
  int64_t row0, rows;  // first row and count of the unit's tokens at frame t
  const Tz* z;         // Z row of the unit's first token at frame t, channel c
  M2_INLINE TemporalTaps(const Geometry& g, const Params& P, const ZRows<Tz>& Z, const Unit& u, int64_t t,
                         int64_t c)
      : be(vload<W>(P.b_e + c)), cb(vload<W>(P.cb_e + c)), w0(vload<W>(P.w_e + c)),
        w1(vload<W>(P.w_e + g.r + c)), w2(vload<W>(P.w_e + 2 * g.r + c)), fm(t > 0 ? 1.f : 0.f),
        fp(t + 1 < g.T ? 1.f : 0.f), om(t > 0 ? -g.L * 2 * g.r : 0), op(t + 1 < g.T ? g.L * 2 * g.r : 0),
        zm(t > 0 ? -Z.frame_stride(u.gi < 0) : 0), zp(t + 1 < g.T ? Z.frame_stride(u.gi < 0) : 0),
        row0((u.b * g.T + t) * g.L + u.first_token(g)), rows(u.tokens(g)),
        z(Z.row(g, u.b * g.T + t, u.first_token(g)) + c) {}
  // Y at frames t−1, t, t+1 (zero outside the clip) for the unit's token k.
  M2_INLINE void inputs(int64_t k, const Geometry& g, F& y0, F& y1, F& y2) const {
    const Tz* zk = z + k * 2 * g.r;
    y0 = fm * (vload<W>(zk + zm) + be);
    y1 = vload<W>(zk) + be;
    y2 = fp * (vload<W>(zk + zp) + be);
  }
};

template <int W, typename Tz>
M2_INLINE void e_forward(const Geometry& g, const Params& P, const ZRows<Tz>& Z, Tz* S, const Unit& u, int64_t t,
                         int64_t c) {
  using F = typename Vec<W>::F;
  const TemporalTaps<W, Tz> e(g, P, Z, u, t, c);
  for (int64_t k = 0; k < e.rows; ++k) {
    const int64_t off = (e.row0 + k) * 2 * g.r + c;
    F y0, y1, y2;
    e.inputs(k, g, y0, y1, y2);
    vstream<W>(S + off, e.cb + e.w0 * y0 + e.w1 * y1 + e.w2 * y2);
  }
}

// One grid column of U (rows gi−1, gi, gi+1) at channel c; zero outside the grid.
template <int W, typename Tz>
M2_INLINE void u_column(typename Vec<W>::F col[3], const Geometry& g, const Tz* zt, const Tz* zprev, int64_t gi,
                        int64_t j, float fm, typename Vec<W>::F bd) {
  for (int a = 0; a < 3; ++a) {
    const int64_t ii = gi + a - 1;
    if (ii < 0 || ii >= g.h || j < 0 || j >= g.w) {
      col[a] = vzero<W>();
    } else {
      const int64_t off = (ii * g.w + j) * 2 * g.r;
      col[a] = fm * (vload<W>(zt + off) - vload<W>(zprev + off)) + bd;
    }
  }
}

// Pointers and weights of the D branch at frame t, grid row u.gi, channel block c.
template <int W, typename Tz>
struct SpatialTaps {
  using F = typename Vec<W>::F;
  int64_t stride, rowi;  // row stride; row of the grid row's first token
  const Tz *zt, *zprev, *dst;
  float fm;
  F wd[9], bd, cb;
  M2_INLINE SpatialTaps(const Geometry& g, const Params& P, const ZRows<Tz>& Z, const Tz* dS, const Unit& u,
                        int64_t t, int64_t c) {
    stride = 2 * g.r;
    const int64_t patch0 = (u.b * g.T + t) * g.L + 1;
    rowi = patch0 + u.gi * g.w;
    zt = Z.row(g, u.b * g.T + t, 1) + g.r + c;
    zprev = t > 0 ? zt - Z.frame_stride(false) : zt;
    dst = dS + patch0 * stride + g.r + c;
    fm = t > 0 ? 1.f : 0.f;
    for (int k = 0; k < 9; ++k) wd[k] = vload<W>(P.w_d + k * g.r + c);
    bd = vload<W>(P.b_d + c);
    cb = vload<W>(P.cb_d + c);
  }
};

template <int W, typename Tz>
M2_INLINE void d_forward(const Geometry& g, const Params& P, const ZRows<Tz>& Z, Tz* S, const Unit& u, int64_t t,
                         int64_t c) {
  using F = typename Vec<W>::F;
  const SpatialTaps<W, Tz> d(g, P, Z, S, u, t, c);
  F prev[3] = {vzero<W>(), vzero<W>(), vzero<W>()}, cur[3], next[3];
  u_column<W>(cur, g, d.zt, d.zprev, u.gi, 0, d.fm, d.bd);
  for (int64_t j = 0; j < g.w; ++j) {
    u_column<W>(next, g, d.zt, d.zprev, u.gi, j + 1, d.fm, d.bd);
    F acc = d.cb;
    for (int a = 0; a < 3; ++a)
      acc += d.wd[3 * a] * prev[a] + d.wd[3 * a + 1] * cur[a] + d.wd[3 * a + 2] * next[a];
    vstream<W>(S + (d.rowi + j) * d.stride + g.r + c, acc);
    for (int a = 0; a < 3; ++a) {
      prev[a] = cur[a];
      cur[a] = next[a];
    }
  }
}

template <int W, typename Tz>
M2_INLINE void zero_rows(Tz* base, int64_t stride, int64_t rows, int64_t c) {
  for (int64_t k = 0; k < rows; ++k) vstream<W>(base + k * stride + c, vzero<W>());
}

template <int W, typename Tz, typename To>
M2_INLINE void fwd_e_block(const FwdArgs<Tz, To>& a, const Unit& u, int64_t t, int64_t c) {
  e_forward<W>(a.g, a.p, a.Z, a.S, u, t, c);
  if (u.gi < 0) zero_rows<W>(a.S + (u.b * a.g.T + t) * a.g.L * 2 * a.g.r + a.g.r, 2 * a.g.r, 1, c);
}

template <int W, typename Tz, typename To>
M2_INLINE void fwd_out_block(const FwdArgs<Tz, To>& a, const Unit& u, int64_t row0, int64_t c) {
  const auto bias = vload<W>((u.gi < 0 ? a.bias_cls : a.bias_patch) + c);
  for (int64_t k = 0; k < u.tokens(a.g); ++k) {
    const int64_t off = (row0 + k) * a.g.C + c;
    vstream<W>(a.out + off, vload<W>(a.residual + off) + bias);
  }
}

// Full W-lane blocks of a channel range, then the remainder one lane at a time (odd r or C).
#define M2_FOR_BLOCKS(c0, c1, CALL)          \
  do {                                       \
    int64_t c_ = (c0);                       \
    for (; c_ + W <= (c1); c_ += W) CALL(W); \
    for (; c_ < (c1); ++c_) CALL(1);         \
  } while (0)

// Parts (E; D; output initialisation) run one after the other over all frames, as in the backward.
template <int W, typename Tz, typename To>
M2_INLINE void fwd_unit_impl(const FwdArgs<Tz, To>& a, const Unit& u) {
  for (int64_t t = 0; t < a.g.T; ++t) {
#define M2_CALL(V) fwd_e_block<V>(a, u, t, c_)
    M2_FOR_BLOCKS(u.r0, u.r1, M2_CALL);
#undef M2_CALL
  }
  for (int64_t t = 0; u.gi >= 0 && t < a.g.T; ++t) {
#define M2_CALL(V) d_forward<V>(a.g, a.p, a.Z, a.S, u, t, c_)
    M2_FOR_BLOCKS(u.r0, u.r1, M2_CALL);
#undef M2_CALL
  }
  for (int64_t t = 0; a.out && t < a.g.T; ++t) {
    const int64_t row0 = (u.b * a.g.T + t) * a.g.L + u.first_token(a.g);
#define M2_CALL(V) fwd_out_block<V>(a, u, row0, c_)
    M2_FOR_BLOCKS(u.c0, u.c1, M2_CALL);
#undef M2_CALL
  }
  stream_fence();
}

// ---- backward --------------------------------------------------------------------------------
template <typename Tz, typename To>
struct BwdArgs {
  Geometry g;
  Params p;
  ZRows<Tz> Z;
  const Tz* dS;
  Tz* S;  // recomputed for dW_up = gᵀS rather than saved by the forward
  Tz* dZ;
  const To* grad;  // (M, C) incoming gradient: up-bias sums and the dx initialisation
  To* dx;          // null: the caller does not fold the residual gradient into dx
};

// Partial sums of every small gradient over one unit row (clip, grid row or class token), in the row's
// slot of slot_width(g) floats: w_e (3r), b_e, cb_e, b_d, w_d (9r), cb_d, g (C). Plus the unit's
// thread's double-buffered dU rows (scratch, fully written before being read).
constexpr int64_t kSmallR = 16;  // r-wide vectors per slot
int64_t slot_width(const Geometry& g) { return kSmallR * g.r + g.C; }

struct Partials {
  float *w_e, *b_e, *cb_e, *b_d, *w_d, *cb_d, *g, *du_cur, *du_next;
  // The slot at `slot`; zeroes the unit's channels [r0, r1) and [c0, c1) of it (and nothing else, so
  // units of one row on other threads are untouched).
  Partials(const Geometry& g_, float* slot, float* du, const Unit& u) {
    w_e = slot; b_e = w_e + 3 * g_.r; cb_e = b_e + g_.r; b_d = cb_e + g_.r; w_d = b_d + g_.r; cb_d = w_d + 9 * g_.r;
    g = cb_d + g_.r; du_cur = du; du_next = du + g_.w * g_.r;
    for (int64_t k = 0; k < kSmallR; ++k) std::fill(slot + k * g_.r + u.r0, slot + k * g_.r + u.r1, 0.f);
    std::fill(g + u.c0, g + u.c1, 0.f);
  }
};

template <int W, typename Tz>
M2_INLINE void e_backward(const Geometry& g, const Params& P, const ZRows<Tz>& Z, const Tz* dS, Tz* S, Tz* dZ,
                          Partials& pt, const Unit& u, int64_t t, int64_t c) {
  using F = typename Vec<W>::F;
  const TemporalTaps<W, Tz> e(g, P, Z, u, t, c);
  F dw0 = vzero<W>(), dw1 = vzero<W>(), dw2 = vzero<W>(), dbe = vzero<W>(), dcb = vzero<W>();
  for (int64_t k = 0; k < e.rows; ++k) {
    const int64_t off = (e.row0 + k) * 2 * g.r + c;
    const Tz* ds = dS + off;
    F y0, y1, y2;
    e.inputs(k, g, y0, y1, y2);
    const F d = vload<W>(ds);
    vstream<W>(S + off, e.cb + e.w0 * y0 + e.w1 * y1 + e.w2 * y2);
    dw0 += d * y0;
    dw1 += d * y1;
    dw2 += d * y2;
    dcb += d;
    // Y[t] feeds S[t+1] through tap 0, S[t] through tap 1 and S[t−1] through tap 2.
    const F dy = e.w0 * (e.fp * vload<W>(ds + e.op)) + e.w1 * d + e.w2 * (e.fm * vload<W>(ds + e.om));
    vstream<W>(dZ + off, dy);
    dbe += dy;
  }
  vaccumulate<W>(pt.w_e + c, dw0);
  vaccumulate<W>(pt.w_e + g.r + c, dw1);
  vaccumulate<W>(pt.w_e + 2 * g.r + c, dw2);
  vaccumulate<W>(pt.b_e + c, dbe);
  vaccumulate<W>(pt.cb_e + c, dcb);
}

// One grid column of dS (rows gi−1, gi, gi+1) at channel c; zero outside the grid.
template <int W, typename Tz>
M2_INLINE void ds_column(typename Vec<W>::F col[3], const Geometry& g, const Tz* ds, int64_t gi, int64_t j) {
  for (int a = 0; a < 3; ++a) {
    const int64_t ii = gi + a - 1;
    col[a] = (ii < 0 || ii >= g.h || j < 0 || j >= g.w) ? vzero<W>() : vload<W>(ds + (ii * g.w + j) * 2 * g.r);
  }
}

// S_d recomputed, and the tap and bias partials, from the U window and the centre dS.
template <int W, typename Tz>
M2_INLINE void d_backward_taps(const Geometry& g, const Params& P, const ZRows<Tz>& Z, const Tz* dS, Tz* S,
                               Partials& pt, const Unit& u, int64_t t, int64_t c) {
  using F = typename Vec<W>::F;
  const SpatialTaps<W, Tz> d(g, P, Z, dS, u, t, c);
  F dw[9];
  for (int k = 0; k < 9; ++k) dw[k] = vzero<W>();
  F dcb = vzero<W>();
  F prev[3] = {vzero<W>(), vzero<W>(), vzero<W>()}, cur[3], next[3];
  u_column<W>(cur, g, d.zt, d.zprev, u.gi, 0, d.fm, d.bd);
  for (int64_t j = 0; j < g.w; ++j) {
    u_column<W>(next, g, d.zt, d.zprev, u.gi, j + 1, d.fm, d.bd);
    const F ds = vload<W>(d.dst + (u.gi * g.w + j) * d.stride);
    F acc = d.cb;
    for (int a = 0; a < 3; ++a) {
      acc += d.wd[3 * a] * prev[a] + d.wd[3 * a + 1] * cur[a] + d.wd[3 * a + 2] * next[a];
      dw[3 * a] += ds * prev[a];
      dw[3 * a + 1] += ds * cur[a];
      dw[3 * a + 2] += ds * next[a];
    }
    dcb += ds;
    vstream<W>(S + (d.rowi + j) * d.stride + g.r + c, acc);
    for (int a = 0; a < 3; ++a) {
      prev[a] = cur[a];
      cur[a] = next[a];
    }
  }
  for (int k = 0; k < 9; ++k) vaccumulate<W>(pt.w_d + k * g.r + c, dw[k]);
  vaccumulate<W>(pt.cb_d + c, dcb);
}

// dU[p] = Σ_m w[−m]·dS[p+m] (tap 8−k mirrors tap k), then dZ_d[t] = [t ≥ 1]·dU[t] − dU[t+1], with
// dU[t+1] left in pt.du_next by the previous (later) frame.
template <int W, typename Tz>
M2_INLINE void d_backward_dz(const Geometry& g, const Params& P, const ZRows<Tz>& Z, const Tz* dS, Tz* dZ,
                             Partials& pt, const Unit& u, int64_t t, int64_t c) {
  using F = typename Vec<W>::F;
  const SpatialTaps<W, Tz> d(g, P, Z, dS, u, t, c);
  F dbd = vzero<W>();
  F prev[3] = {vzero<W>(), vzero<W>(), vzero<W>()}, cur[3], next[3];
  ds_column<W>(cur, g, d.dst, u.gi, 0);
  const int64_t ld = u.r1 - u.r0;
  for (int64_t j = 0; j < g.w; ++j) {
    ds_column<W>(next, g, d.dst, u.gi, j + 1);
    F du = vzero<W>();
    for (int a = 0; a < 3; ++a)
      du += d.wd[8 - 3 * a] * prev[a] + d.wd[7 - 3 * a] * cur[a] + d.wd[6 - 3 * a] * next[a];
    dbd += du;
    const int64_t at = j * ld + (c - u.r0);
    vstore<W>(pt.du_cur + at, du);
    vstream<W>(dZ + (d.rowi + j) * d.stride + g.r + c, d.fm * du - vload<W>(pt.du_next + at));
    for (int a = 0; a < 3; ++a) {
      prev[a] = cur[a];
      cur[a] = next[a];
    }
  }
  vaccumulate<W>(pt.b_d + c, dbd);
}

template <int W, typename Tz, typename To>
M2_INLINE void bwd_e_block(const BwdArgs<Tz, To>& a, const Unit& u, Partials& pt, int64_t t, int64_t c) {
  e_backward<W>(a.g, a.p, a.Z, a.dS, a.S, a.dZ, pt, u, t, c);
  if (u.gi < 0) {  // the class row has no D branch
    const int64_t off = (u.b * a.g.T + t) * a.g.L * 2 * a.g.r + a.g.r;
    zero_rows<W>(a.S + off, 2 * a.g.r, 1, c);
    zero_rows<W>(a.dZ + off, 2 * a.g.r, 1, c);
  }
}

template <int W, typename Tz, typename To>
M2_INLINE void bwd_g_block(const BwdArgs<Tz, To>& a, const Unit& u, Partials& pt, int64_t row0, int64_t c) {
  typename Vec<W>::F sum = vzero<W>();
  for (int64_t k = 0; k < u.tokens(a.g); ++k) {
    const int64_t off = (row0 + k) * a.g.C + c;
    const auto gv = vload<W>(a.grad + off);
    sum += gv;
    if (a.dx) vstream<W>(a.dx + off, gv);
  }
  vaccumulate<W>(pt.g + c, sum);
}

// The unit's four parts (E; D taps; D dZ; incoming-gradient sums) run one after the other, each over
// all frames: interleaving them per frame makes their streams evict one another (measured 2-3x slower
// than the parts' sum).
template <int W, typename Tz, typename To>
M2_INLINE void bwd_unit_impl(const BwdArgs<Tz, To>& a, const Unit& u, Partials& pt) {
  for (int64_t t = 0; t < a.g.T; ++t) {
#define M2_CALL(V) bwd_e_block<V>(a, u, pt, t, c_)
    M2_FOR_BLOCKS(u.r0, u.r1, M2_CALL);
#undef M2_CALL
  }
  if (u.gi >= 0) {
    for (int64_t t = 0; t < a.g.T; ++t) {
#define M2_CALL(V) d_backward_taps<V>(a.g, a.p, a.Z, a.dS, a.S, pt, u, t, c_)
      M2_FOR_BLOCKS(u.r0, u.r1, M2_CALL);
#undef M2_CALL
    }
    std::fill(pt.du_next, pt.du_next + a.g.w * a.g.r, 0.f);  // dU[T] = 0: the last frame has no successor
    for (int64_t t = a.g.T - 1; t >= 0; --t) {
#define M2_CALL(V) d_backward_dz<V>(a.g, a.p, a.Z, a.dS, a.dZ, pt, u, t, c_)
      M2_FOR_BLOCKS(u.r0, u.r1, M2_CALL);
#undef M2_CALL
      std::swap(pt.du_cur, pt.du_next);
    }
  }
  for (int64_t t = 0; t < a.g.T; ++t) {
    const int64_t row0 = (u.b * a.g.T + t) * a.g.L + u.first_token(a.g);
#define M2_CALL(V) bwd_g_block<V>(a, u, pt, row0, c_)
    M2_FOR_BLOCKS(u.c0, u.c1, M2_CALL);
#undef M2_CALL
  }
  stream_fence();
}

// ---- ISA variants ---------------------------------------------------------------------------
template <typename Tz, typename To>
using FwdUnit = void (*)(const FwdArgs<Tz, To>&, const Unit&);
template <typename Tz, typename To>
using BwdUnit = void (*)(const BwdArgs<Tz, To>&, const Unit&, Partials&);

template <typename Tz, typename To>
void fwd_unit_base(const FwdArgs<Tz, To>& a, const Unit& u) { fwd_unit_impl<4>(a, u); }
template <typename Tz, typename To>
void bwd_unit_base(const BwdArgs<Tz, To>& a, const Unit& u, Partials& p) { bwd_unit_impl<4>(a, u, p); }
#if M2_X86
template <typename Tz, typename To>
M2_TARGET_AVX2 void fwd_unit_avx2(const FwdArgs<Tz, To>& a, const Unit& u) { fwd_unit_impl<8>(a, u); }
template <typename Tz, typename To>
M2_TARGET_AVX2 void bwd_unit_avx2(const BwdArgs<Tz, To>& a, const Unit& u, Partials& p) { bwd_unit_impl<8>(a, u, p); }
template <typename Tz, typename To>
M2_TARGET_AVX512 void fwd_unit_avx512(const FwdArgs<Tz, To>& a, const Unit& u) { fwd_unit_impl<16>(a, u); }
template <typename Tz, typename To>
M2_TARGET_AVX512 void bwd_unit_avx512(const BwdArgs<Tz, To>& a, const Unit& u, Partials& p) {
  bwd_unit_impl<16>(a, u, p);
}
#endif

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#if M2_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa& active_isa() {
  static Isa isa = best_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The variant of a unit function for the active ISA.
template <typename Fn>
Fn pick(Fn base, Fn avx2, Fn avx512) {
  if (active_isa() == Isa::kAvx512) return avx512;
  if (active_isa() == Isa::kAvx2) return avx2;
  return base;
}
#if M2_X86
#define M2_PICK(name, Tz, To) pick(&name##_base<Tz, To>, &name##_avx2<Tz, To>, &name##_avx512<Tz, To>)
#else
#define M2_PICK(name, Tz, To) (&name##_base<Tz, To>)
#endif

// ---- drivers ----------------------------------------------------------------------------------
int team_size() { return std::max(1, at::get_num_threads()); }

template <typename Tz, typename To>
void run_forward(const FwdArgs<Tz, To>& a) {
  const FwdUnit<Tz, To> unit_fn = M2_PICK(fwd_unit, Tz, To);
  const int threads = team_size();
  const Split split = split_for(a.g, threads);
  const int64_t units = split.units(a.g);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < units; ++i) unit_fn(a, split.unit(a.g, i));
}

template <typename Tz, typename To>
std::vector<std::vector<float>> run_backward(const BwdArgs<Tz, To>& a) {
  const BwdUnit<Tz, To> unit_fn = M2_PICK(bwd_unit, Tz, To);
  const int threads = team_size();
  const Split split = split_for(a.g, threads);
  const int64_t units = split.units(a.g);
  const Geometry& g = a.g;
  // One slot per unit row (unit i belongs to row i / split.chunks): every (row, channel) entry is
  // written by exactly one unit, so which thread runs a unit, and when, cannot change any sum.
  const int64_t rows = g.B * (g.h + 1), width = slot_width(g), du_size = 2 * g.w * g.r;
  // Kept per calling thread (fresh multi-MB pages cost more than the combine). Never read before
  // being written in this call: each unit zeroes its own entries of its row's slot, and the units
  // cover every (row, channel); dU is scratch written before it is read.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(rows * width + threads * du_size);
  if (scratch.size() < need) scratch.assign(need, 0.f);
  float* const slots_base = scratch.data();
  float* const du_base = slots_base + rows * width;
#pragma omp parallel num_threads(threads)
  {
    float* mine = du_base + omp_get_thread_num() * du_size;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < units; ++i) {
      const Unit u = split.unit(g, i);
      Partials pt(g, slots_base + (i / split.chunks) * width, mine, u);
      unit_fn(a, u, pt);
    }
  }
  // Combine the slots in row order, on this thread: a second OpenMP region (one more join barrier)
  // costs more than these few hundred KB of adds on a loaded machine.
  // Row (b, gi) is b·(h+1) + gi + 1, so the class-token rows are the multiples of h+1.
  std::vector<float> small(static_cast<size_t>(width + g.C), 0.f);  // [.. slot fields .., g_all | g_patch]
  float* out = small.data();
  const float* src = slots_base;
  const int64_t block = 256, blocks = (width + block - 1) / block, small_end = kSmallR * g.r;
  auto combine = [&](int64_t k) {
    const int64_t j0 = k * block, j1 = std::min(width, j0 + block);
    for (int64_t row = 0; row < rows; ++row) {
      const float* s = src + row * width;
      for (int64_t j = j0; j < j1; ++j) out[j] += s[j];
      if (row % (g.h + 1) != 0)
        for (int64_t j = std::max(j0, small_end); j < j1; ++j) out[j + g.C] += s[j];
    }
  };
  for (int64_t k = 0; k < blocks; ++k) combine(k);
  auto field = [&](int64_t begin, int64_t n) { return std::vector<float>(out + begin, out + begin + n); };
  const int64_t r = g.r;
  return {field(0, 3 * r),     field(3 * r, r),     field(4 * r, r),     field(5 * r, r),
          field(6 * r, 9 * r), field(15 * r, r),    field(16 * r, g.C),  field(16 * r + g.C, g.C)};
}

// ---- argument handling -------------------------------------------------------------------------
at::Tensor as_float_vec(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n, name, ": expected ", n, " elements, got ", t.numel(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  return t.detach().reshape({n}).to(at::kFloat).contiguous();
}

// (r, 1, k[, k]) channel-major conv weight → (taps, r) tap-major float.
at::Tensor taps_major(const at::Tensor& w, int64_t r, int64_t taps, const char* name) {
  TORCH_CHECK(w.numel() == r * taps, name, ": expected ", r * taps, " elements (r=", r, ", ", taps,
              " taps), got shape ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), name, " must be a CPU tensor");
  return w.detach().reshape({r, taps}).to(at::kFloat).t().contiguous();
}

struct Checked {
  Geometry g;
  bool split;  // Z given as patch rows + Z_class (else whole)
  at::Tensor b_e, w_e, cb_e, b_d, w_d, cb_d;
  Params params() const {
    return {b_e.data_ptr<float>(), w_e.data_ptr<float>(), cb_e.data_ptr<float>(),
            b_d.data_ptr<float>(), w_d.data_ptr<float>(), cb_d.data_ptr<float>()};
  }
  // Shape of the (B·T·L, 2r) tensors S, dS, dZ.
  std::vector<int64_t> full_shape() const { return {g.B * g.T * g.L, 2 * g.r}; }
};


// Z: (B·T·L, 2r) with Z_class absent, or Z's patch rows (B·T·h·w, 2r) with Z_class (B·T, r).
Checked check_common(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class, int64_t C, int64_t T, int64_t h,
                     int64_t w, const at::Tensor& b_e, const at::Tensor& w_e, const at::Tensor& cb_e,
                     const at::Tensor& b_d, const at::Tensor& w_d, const at::Tensor& cb_d) {
  const bool split = Z_class.has_value() && Z_class->defined();
  auto check_tensor = [](const at::Tensor& z, const char* name) {
    TORCH_CHECK(z.device().is_cpu() && z.is_contiguous(), "ted_stencil: ", name, " must be a contiguous CPU tensor");
    TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16, "ted_stencil: ", name,
                " must be float32 or bfloat16, got ", z.scalar_type());
  };
  check_tensor(Z, "Z");
  TORCH_CHECK(Z.dim() == 2 && Z.size(1) % 2 == 0 && Z.size(1) > 0, "ted_stencil: Z must be (rows, 2r), got ",
              Z.sizes());
  TORCH_CHECK(T >= 1 && h >= 1 && w >= 1, "ted_stencil: need T, h, w >= 1, got ", T, ", ", h, ", ", w);
  const int64_t L = 1 + h * w, rows = Z.size(0), per_clip = T * (split ? L - 1 : L);
  TORCH_CHECK(rows > 0 && rows % per_clip == 0, "ted_stencil: Z's ", rows, " rows are not a positive multiple of ",
              split ? "T*h*w = " : "T*(1+h*w) = ", per_clip);
  const int64_t B = rows / per_clip;
  if (split) {
    check_tensor(*Z_class, "Z_class");
    TORCH_CHECK(Z_class->dim() == 2 && Z_class->size(0) == B * T && Z_class->size(1) == Z.size(1) / 2,
                "ted_stencil: Z_class must be (", B * T, ", ", Z.size(1) / 2, ") to match Z, got ", Z_class->sizes());
    TORCH_CHECK(Z_class->scalar_type() == Z.scalar_type(), "ted_stencil: Z_class dtype ", Z_class->scalar_type(),
                " != Z dtype ", Z.scalar_type());
  }
  Checked ck;
  ck.g = Geometry{B, T, L, h, w, Z.size(1) / 2, C};
  ck.split = split;
  const int64_t r = ck.g.r;
  ck.b_e = as_float_vec(b_e, r, "down_e.bias");
  ck.w_e = taps_major(w_e, r, 3, "conv_e.weight");
  ck.cb_e = as_float_vec(cb_e, r, "conv_e.bias");
  ck.b_d = as_float_vec(b_d, r, "down_d.bias");
  ck.w_d = taps_major(w_d, r, 9, "conv_d.weight");
  ck.cb_d = as_float_vec(cb_d, r, "conv_d.bias");
  return ck;
}

void check_rows(const at::Tensor& t, const Geometry& g, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == g.B * g.T * g.L && t.size(1) == cols, name, ": expected (",
              g.B * g.T * g.L, ", ", cols, "), got ", t.sizes());
}

template <typename F>
void dispatch_types(at::ScalarType z, at::ScalarType o, F&& f) {
  if (z == at::kFloat && o == at::kFloat) return f(float{}, float{});
  if (z == at::kBFloat16 && o == at::kFloat) return f(bf16{}, float{});
  if (z == at::kBFloat16 && o == at::kBFloat16) return f(bf16{}, bf16{});
  TORCH_CHECK(false, "ted_stencil: unsupported dtype pair (Z ", z, ", residual/grad ", o,
              "); supported: (float32, float32), (bfloat16, float32), (bfloat16, bfloat16)");
}

// A caller-provided buffer (a reused workspace: fresh pages cost more than the stencil) or a new one.
at::Tensor buffer(const c10::optional<at::Tensor>& given, at::IntArrayRef shape, at::ScalarType dtype,
                  const char* name) {
  if (!given.has_value() || !given->defined()) return at::empty(shape, at::TensorOptions().dtype(dtype));
  TORCH_CHECK(given->sizes() == shape && given->scalar_type() == dtype && given->is_contiguous() &&
                  given->device().is_cpu(),
              name, ": buffer must be a contiguous CPU ", dtype, " tensor of shape ", shape);
  return *given;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename Tz>
ZRows<Tz> z_rows(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class, const Checked& ck) {
  return ck.split ? ZRows<Tz>::split(ptr<const Tz>(Z), ptr<const Tz>(*Z_class), ck.g)
                  : ZRows<Tz>::full(ptr<const Tz>(Z), ck.g);
}

template <typename Ts, typename Td>
void copy_rows(const Ts* src, Td* dst, int64_t rows, int64_t cols, int64_t ss0, int64_t ss1, int64_t ds0,
               int64_t ds1) {
  constexpr int W = 16;
  for (int64_t i = 0; i < rows; ++i) {
    const Ts* s = src + i * ss0;
    Td* d = dst + i * ds0;
    if (ss1 == 1 && ds1 == 1) {
#define M2_CALL(V) vstore<V>(d + c_, vload<V>(s + c_))
      M2_FOR_BLOCKS(0, cols, M2_CALL);
#undef M2_CALL
    } else {
      for (int64_t j = 0; j < cols; ++j) vstore<1>(d + j * ds1, vload<1>(s + j * ss1));
    }
  }
}


}  // namespace

// S (Z's dtype) and, when residual is given, out = residual + up_e.bias + [patch rows]·up_d.bias in
// residual's dtype, for the up GEMM to accumulate into.
std::vector<at::Tensor> ted_stencil_forward(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class,
                                            const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& down_e_b, const at::Tensor& conv_e_w,
                                            const at::Tensor& conv_e_b, const at::Tensor& down_d_b,
                                            const at::Tensor& conv_d_w, const at::Tensor& conv_d_b,
                                            const c10::optional<at::Tensor>& up_e_b,
                                            const c10::optional<at::Tensor>& up_d_b, int64_t T, int64_t h,
                                            int64_t w, const c10::optional<at::Tensor>& s_buffer) {
  const bool with_out = residual.has_value() && residual->defined();
  const int64_t C = with_out ? residual->size(-1) : 0;
  Checked ck = check_common(Z, Z_class, C, T, h, w, down_e_b, conv_e_w, conv_e_b, down_d_b, conv_d_w, conv_d_b);
  const at::ScalarType z_type = Z.scalar_type();
  at::Tensor S = buffer(s_buffer, ck.full_shape(), z_type, "s_buffer");
  at::Tensor out, bias_cls, bias_patch;
  if (with_out) {
    check_rows(*residual, ck.g, C, "residual");
    TORCH_CHECK(up_e_b.has_value() && up_d_b.has_value(), "ted_stencil_forward: residual needs both up biases");
    bias_cls = as_float_vec(*up_e_b, C, "up_e.bias");
    bias_patch = bias_cls + as_float_vec(*up_d_b, C, "up_d.bias");
    out = at::empty_like(*residual);
  }
  const at::ScalarType out_type = with_out ? residual->scalar_type() : z_type;
  dispatch_types(z_type, out_type, [&](auto z_tag, auto o_tag) {
    using Tz = decltype(z_tag);
    using To = decltype(o_tag);
    FwdArgs<Tz, To> a{ck.g, ck.params(), z_rows<Tz>(Z, Z_class, ck), ptr<Tz>(S), nullptr, nullptr, nullptr,
                      nullptr};
    if (with_out) {
      a.residual = ptr<const To>(*residual);
      a.out = ptr<To>(out);
      a.bias_cls = bias_cls.data_ptr<float>();
      a.bias_patch = bias_patch.data_ptr<float>();
    }
    run_forward(a);
  });
  return {S, out};
}

// → (S, dZ, dconv_e.weight (r,1,3), dconv_e.bias, ddown_e.bias, dconv_d.weight (r,1,3,3), dconv_d.bias,
//    ddown_d.bias, dup_e.bias, dup_d.bias, dx_init or undefined); the small gradients in float32.
std::vector<at::Tensor> ted_stencil_backward(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class,
                                             const at::Tensor& dS, const at::Tensor& grad,
                                             const at::Tensor& down_e_b, const at::Tensor& conv_e_w,
                                             const at::Tensor& conv_e_b, const at::Tensor& down_d_b,
                                             const at::Tensor& conv_d_w, const at::Tensor& conv_d_b, int64_t T,
                                             int64_t h, int64_t w, bool init_dx,
                                             const c10::optional<at::Tensor>& s_buffer,
                                             const c10::optional<at::Tensor>& dz_buffer) {
  const int64_t C = grad.size(-1);
  Checked ck = check_common(Z, Z_class, C, T, h, w, down_e_b, conv_e_w, conv_e_b, down_d_b, conv_d_w, conv_d_b);
  const Geometry& g = ck.g;
  const at::ScalarType z_type = Z.scalar_type();
  check_rows(dS, g, 2 * g.r, "dS");
  TORCH_CHECK(dS.scalar_type() == z_type, "ted_stencil_backward: dS dtype ", dS.scalar_type(), " != Z dtype ",
              z_type);
  check_rows(grad, g, C, "grad");
  at::Tensor S = buffer(s_buffer, ck.full_shape(), z_type, "s_buffer");
  at::Tensor dZ = buffer(dz_buffer, ck.full_shape(), z_type, "dz_buffer");
  TORCH_CHECK(!S.is_same(dZ) && !S.is_same(dS) && !dZ.is_same(dS), "ted_stencil_backward: S, dZ and dS must differ");
  at::Tensor dx = init_dx ? at::empty_like(grad) : at::Tensor();
  std::vector<std::vector<float>> sums;
  dispatch_types(z_type, grad.scalar_type(), [&](auto z_tag, auto o_tag) {
    using Tz = decltype(z_tag);
    using To = decltype(o_tag);
    BwdArgs<Tz, To> a{g, ck.params(), z_rows<Tz>(Z, Z_class, ck), ptr<const Tz>(dS), ptr<Tz>(S), ptr<Tz>(dZ),
                      ptr<const To>(grad), init_dx ? ptr<To>(dx) : nullptr};
    sums = run_backward(a);
  });
  auto tensor = [](const std::vector<float>& v) {
    return at::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, at::kFloat).clone();
  };
  const int64_t r = g.r;
  at::Tensor d_w_e = tensor(sums[0]).view({3, r}).t().contiguous().view({r, 1, 3});
  at::Tensor d_w_d = tensor(sums[4]).view({9, r}).t().contiguous().view({r, 1, 3, 3});
  return {S,  dZ, d_w_e, tensor(sums[2]), tensor(sums[1]), d_w_d, tensor(sums[5]), tensor(sums[3]),
          tensor(sums[6]), tensor(sums[7]), dx};
}

// dst[i, j] = src[i, j] for 2-D float32/bfloat16 tensors of any strides, on the calling thread only.
// For the weight-sized copies around the GEMMs (packing [W_e; W_d], splitting dW_up): ATen would
// run them as OpenMP regions, and on a loaded machine waking a parked team costs milliseconds.
void copy_serial_(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.dim() == 2 && dst.sizes() == src.sizes(), "copy_serial_: need 2-D tensors of one shape, got ",
              dst.sizes(), " and ", src.sizes());
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "copy_serial_: CPU tensors only");
  const bool s32 = src.scalar_type() == at::kFloat, d32 = dst.scalar_type() == at::kFloat;
  TORCH_CHECK((s32 || src.scalar_type() == at::kBFloat16) && (d32 || dst.scalar_type() == at::kBFloat16),
              "copy_serial_: float32/bfloat16 only, got ", src.scalar_type(), " -> ", dst.scalar_type());
  const int64_t args[] = {dst.size(0), dst.size(1), src.stride(0), src.stride(1), dst.stride(0), dst.stride(1)};
  auto run = [&](auto* s, auto* d) { copy_rows(s, d, args[0], args[1], args[2], args[3], args[4], args[5]); };
  if (s32 && d32) run(ptr<const float>(src), ptr<float>(dst));
  else if (s32) run(ptr<const float>(src), ptr<bf16>(dst));
  else if (d32) run(ptr<const bf16>(src), ptr<float>(dst));
  else run(ptr<const bf16>(src), ptr<bf16>(dst));
}

std::string stencil_isa() { return isa_name(active_isa()); }

// Tests pin each compiled variant; only variants this CPU can execute are accepted.
void set_stencil_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa want = best;
  if (name == "avx512") want = Isa::kAvx512;
  else if (name == "avx2") want = Isa::kAvx2;
  else if (name == "baseline") want = Isa::kBase;
  else TORCH_CHECK(name == "best", "set_stencil_isa: unknown ISA '", name, "' (best, avx512, avx2, baseline)");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "set_stencil_isa: this CPU cannot run '", name,
              "' (best is ", isa_name(best), ")");
  active_isa() = want;
}

}  // namespace m2clip
