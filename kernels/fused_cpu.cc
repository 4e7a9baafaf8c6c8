// CPU reference of the fused kernels (see fused.h).
#include "kernels/fused.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/fused_math.h"

namespace ftune::kernels {

using math::Bf16ToFloat;
using math::FloatToBf16;

Status CheckRmsNormArgs(const char* name, int64_t rows, int64_t h, float eps) {
  if (rows < 0 || h <= 0) {
    return Status::Error(std::string(name) + ": rows (" + std::to_string(rows) + ") must be >= 0 and h (" +
                         std::to_string(h) + ") > 0");
  }
  if (!(eps > 0.0f)) return Status::Error(std::string(name) + ": eps must be > 0");
  return Status::Ok();
}

Status CheckRopeArgs(const char* name, int64_t tokens, int64_t heads, int64_t hd) {
  if (tokens < 0 || heads <= 0 || hd <= 0 || hd % 2 != 0) {
    return Status::Error(std::string(name) + ": need tokens >= 0, heads > 0 and an even head_dim; got " +
                         std::to_string(tokens) + ", " + std::to_string(heads) + ", " +
                         std::to_string(hd));
  }
  return Status::Ok();
}

Status RmsNormForward(const uint16_t* x, const uint16_t* residual, const uint16_t* w,
                      int64_t rows, int64_t h, float eps, uint16_t* sum, uint16_t* y,
                      float* rstd) {
  if (Status s = CheckRmsNormArgs("RmsNormForward", rows, h, eps); !s.ok()) return s;
  if (residual != nullptr && sum == nullptr) {
    return Status::Error("RmsNormForward: a residual needs a sum output");
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * h;
    float ss = 0.0f;
    for (int64_t i = 0; i < h; ++i) {
      float v = Bf16ToFloat(xr[i]);
      if (residual != nullptr) {
        v = math::Bf(math::AddRn(v, Bf16ToFloat(residual[r * h + i])));
        sum[r * h + i] = FloatToBf16(v);
      }
      ss = math::AddRn(ss, math::MulRn(v, v));
    }
    const float rs = math::RmsNormRstd(ss, h, eps);
    rstd[r] = rs;
    const uint16_t* sr = residual != nullptr ? sum + r * h : xr;
    for (int64_t i = 0; i < h; ++i) {
      y[r * h + i] = FloatToBf16(math::RmsNormOutput(Bf16ToFloat(sr[i]), rs, Bf16ToFloat(w[i])));
    }
  }
  return Status::Ok();
}

Status RmsNormBackward(const uint16_t* dy, const uint16_t* s, const uint16_t* w,
                       const float* rstd, const uint16_t* dres, int64_t rows, int64_t h,
                       uint16_t* ds) {
  if (Status st = CheckRmsNormArgs("RmsNormBackward", rows, h, 1.0f); !st.ok()) return st;
  for (int64_t r = 0; r < rows; ++r) {
    float dot = 0.0f;
    for (int64_t i = 0; i < h; ++i) {
      const float dn = math::RmsNormGradIn(Bf16ToFloat(dy[r * h + i]), Bf16ToFloat(w[i]));
      dot = math::AddRn(dot, math::MulRn(dn, Bf16ToFloat(s[r * h + i])));
    }
    const float rs = rstd[r];
    const float coef = math::MulRn(math::MulRn(math::MulRn(rs, rs), rs),
                                   math::MulRn(dot, 1.0f / static_cast<float>(h)));
    for (int64_t i = 0; i < h; ++i) {
      const float dn = math::RmsNormGradIn(Bf16ToFloat(dy[r * h + i]), Bf16ToFloat(w[i]));
      float g = math::Bf(math::RmsNormBackward(dn, Bf16ToFloat(s[r * h + i]), rs, coef));
      if (dres != nullptr) g = math::AddRn(g, Bf16ToFloat(dres[r * h + i]));
      ds[r * h + i] = FloatToBf16(g);
    }
  }
  return Status::Ok();
}

Status CheckSwigluRows(const char* name, const SwigluRows& r, bool backward) {
  if (r.rows < 0 || r.cols < 0 || r.ld_gu < r.cols || r.ld_y < r.cols ||
      (backward && r.ld_d < r.cols)) {
    return Status::Error(std::string(name) + ": need rows, cols >= 0 and row strides >= cols; got " +
                         std::to_string(r.rows) + " x " + std::to_string(r.cols) + ", strides " +
                         std::to_string(r.ld_gu) + ", " + std::to_string(r.ld_y) +
                         (backward ? ", " + std::to_string(r.ld_d) : std::string()));
  }
  return Status::Ok();
}

Status SwigluForwardRows(const uint16_t* g, const uint16_t* u, const SwigluRows& r,
                         uint16_t* y) {
  if (Status s = CheckSwigluRows("SwigluForwardRows", r, false); !s.ok()) return s;
  for (int64_t row = 0; row < r.rows; ++row) {
    const uint16_t* gr = g + row * r.ld_gu;
    const uint16_t* ur = u + row * r.ld_gu;
    uint16_t* yr = y + row * r.ld_y;
    for (int64_t i = 0; i < r.cols; ++i) {
      yr[i] = FloatToBf16(math::SwigluForward(Bf16ToFloat(gr[i]), Bf16ToFloat(ur[i])));
    }
  }
  return Status::Ok();
}

Status SwigluBackwardRows(const uint16_t* dy, const uint16_t* g, const uint16_t* u,
                          const SwigluRows& r, uint16_t* dg, uint16_t* du) {
  if (Status s = CheckSwigluRows("SwigluBackwardRows", r, true); !s.ok()) return s;
  for (int64_t row = 0; row < r.rows; ++row) {
    const uint16_t* dyr = dy + row * r.ld_y;
    const uint16_t* gr = g + row * r.ld_gu;
    const uint16_t* ur = u + row * r.ld_gu;
    for (int64_t i = 0; i < r.cols; ++i) {
      float a, b;
      math::SwigluBackward(Bf16ToFloat(dyr[i]), Bf16ToFloat(gr[i]), Bf16ToFloat(ur[i]), &a, &b);
      dg[row * r.ld_d + i] = FloatToBf16(a);
      du[row * r.ld_d + i] = FloatToBf16(b);
    }
  }
  return Status::Ok();
}

// n contiguous values are one row of n.
Status SwigluForward(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* y) {
  if (n < 0) return Status::Error("SwigluForward: n must be >= 0");
  return SwigluForwardRows(g, u, SwigluRows{1, n, n, n, n}, y);
}

Status SwigluBackward(const uint16_t* dy, const uint16_t* g, const uint16_t* u, int64_t n,
                      uint16_t* dg, uint16_t* du) {
  if (n < 0) return Status::Error("SwigluBackward: n must be >= 0");
  return SwigluBackwardRows(dy, g, u, SwigluRows{1, n, n, n, n}, dg, du);
}

Status Rope(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
            int64_t heads, int64_t hd, bool backward, uint16_t* y) {
  if (Status s = CheckRopeArgs("Rope", tokens, heads, hd); !s.ok()) return s;
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const uint16_t* c = cos + t * hd;
    const uint16_t* sn = sin + t * hd;
    for (int64_t hh = 0; hh < heads; ++hh) {
      const uint16_t* xr = x + (t * heads + hh) * hd;
      uint16_t* yr = y + (t * heads + hh) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const bool first = i < half;
        const int64_t p = first ? i + half : i - half;
        const float v =
            backward ? math::RopeBackward(Bf16ToFloat(xr[i]), Bf16ToFloat(xr[p]),
                                          Bf16ToFloat(c[i]), Bf16ToFloat(sn[p]), first)
                     : math::RopeForward(Bf16ToFloat(xr[i]), Bf16ToFloat(xr[p]),
                                         Bf16ToFloat(c[i]), Bf16ToFloat(sn[i]), first);
        yr[i] = FloatToBf16(v);
      }
    }
  }
  return Status::Ok();
}

Status CheckCrossEntropyArgs(const char* name, int64_t rows, int64_t vocab) {
  if (rows < 0) return Status::Error(std::string(name) + ": rows must be >= 0");
  if (vocab < 1) return Status::Error(std::string(name) + ": vocab must be >= 1");
  return Status::Ok();
}

Status CrossEntropyRows(const uint16_t* logits, const int64_t* targets, int64_t rows,
                        int64_t vocab, float* loss, uint16_t* grad) {
  if (Status s = CheckCrossEntropyArgs("CrossEntropyRows", rows, vocab); !s.ok()) return s;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = targets[r];
    if (t < 0 || t >= vocab) {
      return Status::Error("CrossEntropyRows: target " + std::to_string(t) + " of row " +
                           std::to_string(r) + " is outside [0, " + std::to_string(vocab) + ")");
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = logits + r * vocab;
    float m = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) m = std::max(m, Bf16ToFloat(x[i]));
    const float shift = math::CrossEntropyShift(m);
    float sum = 0.0f;
    for (int64_t i = 0; i < vocab; ++i) {
      sum = math::AddRn(sum, math::ExpF(math::SubRn(Bf16ToFloat(x[i]), shift)));
    }
    const float lse = math::CrossEntropyLse(shift, sum);
    const int64_t t = targets[r];
    loss[r] = math::SubRn(lse, Bf16ToFloat(x[t]));  // before grad may overwrite x
    if (grad == nullptr) continue;
    uint16_t* g = grad + r * vocab;
    for (int64_t i = 0; i < vocab; ++i) {
      g[i] = FloatToBf16(math::CrossEntropyGrad(Bf16ToFloat(x[i]), lse, i == t));
    }
  }
  return Status::Ok();
}

}  // namespace ftune::kernels
