// crop_features on the CPU (SPEC.md section 7). roi_align's bilinear weight of a sample is a
// product of a weight along y and one along x, and a bin averages a rectangular grid of samples,
// so the pooled map of one channel is A F B^T: F the (h, w) feature map as the network saw it,
// A (na, h) the summed y or x weights of each bin along F's rows, B (nb, w) along its columns.
// The view's flip and quarter turn only decide which axis of the crop lands on F's rows (x for
// odd turns, then the result is transposed) and whether an axis is read backwards: folded into
// the pixel indices of A and B, so the map is never turned or copied. Sample positions follow
// loca_kernels/crop/reference.py in float32, operation for operation (built with
// -ffp-contract=off); weights and sums in float32 (float64 for float64 maps).
// Backward: grad F = sum_r A_r^T G_r B_r / count_r, one task per (view, channel block) summing
// the regions in order: deterministic, no atomics, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "loca_kernels/torch_checks.h"

namespace {

// Adds, for each of `bins` bins along one axis of the crop (length `length` pixels in the crop's
// own orientation), the summed bilinear weights of its samples into weights[bin * length + pixel]
// (pixel counted backwards when `reverse`). Region [r0, r1) and view [v0, v1) in source
// coordinates. Returns the number of samples per bin along this axis.
template <typename acc_t>
int64_t axis_weights(float r0, float r1, float v0, float v1, int64_t length, int64_t bins, int64_t sampling_ratio,
                     bool reverse, acc_t* weights) {
  const float len = static_cast<float>(length);
  const float start = (r0 - v0) / (v1 - v0) * len - 0.5f;
  const float end = (r1 - v0) / (v1 - v0) * len - 0.5f;
  const float size = end - start;
  const float step = size / static_cast<float>(bins);
  // A region with a NaN or infinite coordinate has no samples (its result is NaN, the caller's
  // part); a finite one's count is bounded by the op's checks.
  const int64_t grid = sampling_ratio > 0 ? sampling_ratio
                       : std::isfinite(size)
                           ? std::max<int64_t>(static_cast<int64_t>(std::ceil(size / static_cast<float>(bins))), 0)
                           : 0;
  const float grid_f = static_cast<float>(std::max<int64_t>(grid, 1));
  std::fill(weights, weights + bins * length, acc_t(0));
  for (int64_t p = 0; p < bins; ++p) {
    acc_t* row = weights + p * length;
    for (int64_t s = 0; s < grid; ++s) {
      float pos = start + static_cast<float>(p) * step + (static_cast<float>(s) + 0.5f) * step / grid_f;
      if (!(pos >= -1.0f && pos <= len)) continue;  // roi_align: the sample is 0 (and a NaN one)
      pos = std::max(pos, 0.0f);
      int64_t low = static_cast<int64_t>(pos), high = low + 1;
      if (low >= length - 1) {
        low = high = length - 1;
        pos = static_cast<float>(low);
      }
      const float frac = pos - static_cast<float>(low);
      row[reverse ? length - 1 - low : low] += static_cast<acc_t>(1.0f - frac);
      row[reverse ? length - 1 - high : high] += static_cast<acc_t>(frac);
    }
  }
  return grid;
}

// Geometry of one view: u = the map turned back (rot90 by -turns) and unflipped.
struct View {
  int64_t turns;
  bool flip;
  int64_t h, w;  // F's sides
  bool odd() const { return turns % 2 == 1; }
  // u's rows run along F's rows for even turns, along F's columns for odd ones; they are read
  // backwards for 2 and 3 turns. u's columns (unflipped) are read backwards for 1 and 2 turns.
  bool reverse_y() const { return turns >= 2; }
  bool reverse_x() const { return flip != (turns == 1 || turns == 2); }
};

// The weights of one (view, region): a (na, h) along F's rows, b (nb, w) along F's columns,
// with na = oh, nb = ow for even turns (na = ow, nb = oh for odd). Returns 1 / count.
template <typename acc_t>
acc_t region_weights(const View& v, const float* view_box, const float* region, int64_t oh, int64_t ow,
                     int64_t sampling_ratio, acc_t* a, acc_t* b) {
  // u's height is F's width for odd turns.
  const int64_t hu = v.odd() ? v.w : v.h, wu = v.odd() ? v.h : v.w;
  acc_t* wy = v.odd() ? b : a;
  acc_t* wx = v.odd() ? a : b;
  const int64_t gy = axis_weights(region[1], region[3], view_box[1], view_box[3], hu, oh, sampling_ratio,
                                  v.reverse_y(), wy);
  const int64_t gx = axis_weights(region[0], region[2], view_box[0], view_box[2], wu, ow, sampling_ratio,
                                  v.reverse_x(), wx);
  return acc_t(1) / static_cast<acc_t>(std::max<int64_t>(gy * gx, 1));
}

// The small per-view inputs in one arithmetic (float32 boxes, as the reference), contiguous, and
// pointers to their data.
struct Inputs {
  at::Tensor boxes_tensor, regions_tensor, flip_tensor, turns_tensor;
  const float* boxes;    // (M, 4)
  const float* regions;  // (M, R, 4)
  const bool* flip;      // (M,)
  const int64_t* turns;  // (M,)
  // The geometry of view m of an (h, w) map.
  View view(int64_t m, int64_t h, int64_t w) const { return {turns[m] & 3, flip[m], h, w}; }
};

// Checks the per-view inputs of `views` views.
Inputs small_inputs(const loca_kernels::ErrorPrefix& where, const at::Tensor& view_boxes, const at::Tensor& regions,
                    const at::Tensor& view_flip, const at::Tensor& view_rot90, int64_t views) {
  TORCH_CHECK_VALUE(view_boxes.dim() == 2 && view_boxes.size(0) == views && view_boxes.size(1) == 4, where,
                    ": view_boxes must be (M, 4) with M = ", views, ", got ", view_boxes.sizes());
  TORCH_CHECK_VALUE(regions.dim() == 3 && regions.size(0) == views && regions.size(2) == 4, where,
                    ": regions must be (M, R, 4) with M = ", views, ", got ", regions.sizes());
  TORCH_CHECK_VALUE(view_flip.sizes() == at::IntArrayRef({views}), where, ": view_flip must be (M,) = (", views,
                    ",), got ", view_flip.sizes());
  TORCH_CHECK_VALUE(view_rot90.sizes() == at::IntArrayRef({views}), where, ": view_rot90 must be (M,) = (", views,
                    ",), got ", view_rot90.sizes());
  Inputs in{view_boxes.to(at::kFloat).contiguous(), regions.to(at::kFloat).contiguous(),
            view_flip.to(at::kBool).contiguous(), view_rot90.to(at::kLong).contiguous()};
  in.boxes = in.boxes_tensor.const_data_ptr<float>();
  in.regions = in.regions_tensor.const_data_ptr<float>();
  in.flip = in.flip_tensor.const_data_ptr<bool>();
  in.turns = in.turns_tensor.const_data_ptr<int64_t>();
  return in;
}

at::Tensor crop_features_cpu(const at::Tensor& features, const at::Tensor& view_boxes, const at::Tensor& regions,
                             at::IntArrayRef out_size, const at::Tensor& view_flip, const at::Tensor& view_rot90,
                             int64_t sampling_ratio) {
  const loca_kernels::ErrorPrefix where{"crop_features", "cpu"};
  TORCH_CHECK_VALUE(features.dim() == 4, where, ": features must be (M, C, h, w), got ", features.sizes());
  loca_kernels::check_cpu_float(where, "features", features);
  TORCH_CHECK_VALUE(out_size.size() == 2 && out_size[0] > 0 && out_size[1] > 0, where,
                    ": out_size must be 2 positive ints, got ", out_size);
  const int64_t views = features.size(0), channels = features.size(1), h = features.size(2), w = features.size(3);
  const Inputs in = small_inputs(where, view_boxes, regions, view_flip, view_rot90, views);
  const int64_t nreg = regions.size(1), oh = out_size[0], ow = out_size[1];
  const at::Tensor f = features.contiguous();
  at::Tensor out = at::empty({views, nreg, channels, oh, ow}, features.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "crop_features_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, views * nreg, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> a, b, fb, t;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / nreg;
        const View v = in.view(m, h, w);
        const int64_t na = v.odd() ? ow : oh, nb = v.odd() ? oh : ow;
        a.resize(na * h);
        b.resize(nb * w);
        fb.resize(h * nb);
        t.resize(na * nb);
        const float* region = in.regions + task * 4;
        // A NaN or infinite region coordinate makes the region's result NaN (SPEC.md section 7).
        const acc_t scale = region_weights<acc_t>(v, in.boxes + m * 4, region, oh, ow, sampling_ratio, a.data(),
                                                  b.data()) +
                            static_cast<acc_t>((region[0] + region[1] + region[2] + region[3]) * 0.0f);
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* fc = fp + (m * channels + c) * h * w;
          // fb = F B^T (h, nb), then t = A fb (na, nb). Only pixels of nonzero weight count: a NaN
          // or infinite one makes NaN the bins that weight it (x * 0), no other (SPEC.md section 7).
          for (int64_t i = 0; i < h; ++i) {
            for (int64_t q = 0; q < nb; ++q) {
              acc_t sum = 0;
              for (int64_t j = 0; j < w; ++j) {
                const acc_t x = static_cast<acc_t>(fc[i * w + j]), weight = b[q * w + j];
                sum += weight != acc_t(0) ? x * weight + x * acc_t(0) : acc_t(0);
              }
              fb[i * nb + q] = sum;
            }
          }
          std::fill(t.begin(), t.end(), acc_t(0));
          for (int64_t p = 0; p < na; ++p) {
            for (int64_t i = 0; i < h; ++i) {
              const acc_t weight = a[p * h + i];
              if (weight == acc_t(0)) continue;
              for (int64_t q = 0; q < nb; ++q) t[p * nb + q] += weight * fb[i * nb + q];
            }
          }
          scalar_t* oc = op + (task * channels + c) * oh * ow;
          for (int64_t p = 0; p < na; ++p) {
            for (int64_t q = 0; q < nb; ++q) {
              // t is (oh, ow) for even turns, (ow, oh) for odd ones.
              oc[v.odd() ? q * ow + p : p * ow + q] = static_cast<scalar_t>(t[p * nb + q] * scale);
            }
          }
        }
      }
    });
  });
  return out;
}

constexpr int64_t kChannelBlock = 16;

at::Tensor crop_features_backward_cpu(const at::Tensor& grad_out, const at::Tensor& view_boxes,
                                      const at::Tensor& regions, at::IntArrayRef feature_size,
                                      const at::Tensor& view_flip, const at::Tensor& view_rot90,
                                      int64_t sampling_ratio) {
  const loca_kernels::ErrorPrefix where{"crop_features_backward", "cpu"};
  TORCH_CHECK_VALUE(grad_out.dim() == 5, where, ": grad_out must be (M, R, C, oh, ow), got ", grad_out.sizes());
  loca_kernels::check_cpu_float(where, "grad_out", grad_out);
  TORCH_CHECK_VALUE(feature_size.size() == 2 && feature_size[0] > 0 && feature_size[1] > 0, where,
                    ": feature_size must be 2 positive ints, got ", feature_size);
  const int64_t views = grad_out.size(0), nreg = grad_out.size(1), channels = grad_out.size(2);
  const int64_t oh = grad_out.size(3), ow = grad_out.size(4), h = feature_size[0], w = feature_size[1];
  const Inputs in = small_inputs(where, view_boxes, regions, view_flip, view_rot90, views);
  TORCH_CHECK_VALUE(regions.size(1) == nreg, where, ": regions must have R = ", nreg, " regions like grad_out, got ",
                    regions.size(1));
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad = at::zeros({views, channels, h, w}, grad_out.options());
  if (grad.numel() == 0 || nreg == 0) return grad;
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "crop_features_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, views * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> a, b, scale, gb, acc;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / blocks, c0 = (task % blocks) * kChannelBlock;
        const int64_t c1 = std::min(c0 + kChannelBlock, channels);
        const View v = in.view(m, h, w);
        const int64_t na = v.odd() ? ow : oh, nb = v.odd() ? oh : ow;
        // The weights of every region of the view, computed once per task.
        a.resize(nreg * na * h);
        b.resize(nreg * nb * w);
        scale.resize(nreg);
        for (int64_t r = 0; r < nreg; ++r) {
          scale[r] = region_weights<acc_t>(v, in.boxes + m * 4, in.regions + (m * nreg + r) * 4, oh, ow,
                                           sampling_ratio, a.data() + r * na * h, b.data() + r * nb * w);
        }
        gb.resize(na * w);
        acc.resize(h * w);
        for (int64_t c = c0; c < c1; ++c) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t r = 0; r < nreg; ++r) {
            const scalar_t* gc = gp + ((m * nreg + r) * channels + c) * oh * ow;
            const acc_t* ar = a.data() + r * na * h;
            const acc_t* br = b.data() + r * nb * w;
            // gb = G B (na, w), with G the (na, nb) gradient (transposed for odd turns) / count.
            std::fill(gb.begin(), gb.end(), acc_t(0));
            for (int64_t p = 0; p < na; ++p) {
              for (int64_t q = 0; q < nb; ++q) {
                const acc_t gv = static_cast<acc_t>(gc[v.odd() ? q * ow + p : p * ow + q]) * scale[r];
                if (gv == acc_t(0)) continue;
                for (int64_t j = 0; j < w; ++j) gb[p * w + j] += gv * br[q * w + j];
              }
            }
            // acc += A^T gb (h, w).
            for (int64_t p = 0; p < na; ++p) {
              for (int64_t i = 0; i < h; ++i) {
                const acc_t weight = ar[p * h + i];
                if (weight == acc_t(0)) continue;
                for (int64_t j = 0; j < w; ++j) acc[i * w + j] += weight * gb[p * w + j];
              }
            }
          }
          scalar_t* dc = dp + (m * channels + c) * h * w;
          for (int64_t k = 0; k < h * w; ++k) dc[k] = static_cast<scalar_t>(acc[k]);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("crop_features", &crop_features_cpu);
  m.impl("crop_features_backward", &crop_features_backward_cpu);
}
