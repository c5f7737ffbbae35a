// Relative-position targets on the CPU: OpenMP over views; per view one reference column per
// query column and one reference row per query row, then one pass over the patches. The
// arithmetic is the reference's (loca_kernels/targets/reference.py), in float64 and in the
// same order, so that results are identical element for element. With query_size (rule
// "scenic") the source pixel of each patch and its reference patch come from TF's float32
// nearest-neighbour indices (tf_nearest), as the reference's _nearest computes them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"

namespace {

// TF's nearest-neighbour input index (half-pixel centres) of output index o for a side of n_in
// resized to n_out: each operation in float32, as tensorflow's resize_nearest_neighbor.
int64_t tf_nearest(int64_t o, int64_t n_in, int64_t n_out) {
  const float scale = static_cast<float>(n_in) / static_cast<float>(n_out);
  return std::min(static_cast<int64_t>(std::floor((static_cast<float>(o) + 0.5f) * scale)), n_in - 1);
}

at::Tensor relative_position_targets_cpu(const at::Tensor& query_boxes, const at::Tensor& ref_boxes,
                                         at::IntArrayRef query_grid, at::IntArrayRef ref_grid,
                                         const at::Tensor& query_flip, const at::Tensor& ref_flip,
                                         const at::Tensor& query_rot90, int64_t ignore_index,
                                         at::OptionalIntArrayRef query_size) {
  loca_kernels::check_targets_inputs({"relative_position_targets", "cpu"}, query_boxes, ref_boxes, query_grid,
                                     ref_grid, query_flip, ref_flip, query_rot90, query_size);
  const bool scenic = query_size.has_value();
  const int64_t ph = scenic ? (*query_size)[0] : 0, pw = scenic ? (*query_size)[1] : 0;
  const int64_t batch = query_boxes.size(0), views = query_boxes.size(1);
  const int64_t hq = query_grid[0], wq = query_grid[1], hr = ref_grid[0], wr = ref_grid[1];

  // Small per-view inputs: converting them is cheap and keeps one arithmetic (float64).
  const at::Tensor qb = query_boxes.to(at::kDouble).contiguous();
  const at::Tensor rb = ref_boxes.to(at::kDouble).contiguous();
  const at::Tensor qf = query_flip.to(at::kBool).contiguous();
  const at::Tensor rf = ref_flip.to(at::kBool).contiguous();
  const at::Tensor qr = query_rot90.to(at::kLong).contiguous();
  at::Tensor out = at::empty({batch, views, hq * wq}, query_boxes.options().dtype(at::kLong));

  const double* qbp = qb.data_ptr<double>();
  const double* rbp = rb.data_ptr<double>();
  const bool* qfp = qf.data_ptr<bool>();
  const bool* rfp = rf.data_ptr<bool>();
  const int64_t* qrp = qr.data_ptr<int64_t>();
  int64_t* outp = out.data_ptr<int64_t>();

  at::parallel_for(0, batch * views, 16, [&](int64_t begin, int64_t end) {
    // A centre's x depends only on its column c of the un-turned grid and y only on its row r,
    // so the reference column of every c and the reference row of every r (-1: outside the
    // reference box) are computed once per view and the patches only look them up.
    std::vector<int64_t> col_of, row_of;
    for (int64_t view = begin; view < end; ++view) {
      const int64_t b = view / views;
      const int64_t turns = qrp[view] & 3;
      // The crop is cut on the grid of the view before turning.
      const int64_t gh = turns % 2 == 0 ? hq : wq, gw = turns % 2 == 0 ? wq : hq;
      const double* box = qbp + view * 4;
      const double* ref = rbp + b * 4;
      col_of.resize(gw);
      row_of.resize(gh);
      if (scenic) {
        // Integer boxes; the view's pixel size before turning is (vh, vw).
        const int64_t vh = turns % 2 == 0 ? ph : pw, vw = turns % 2 == 0 ? pw : ph;
        int64_t qbox[4], rbox[4];
        for (int k = 0; k < 4; ++k) {
          qbox[k] = static_cast<int64_t>(std::floor(box[k]));
          rbox[k] = static_cast<int64_t>(std::floor(ref[k]));
        }
        for (int64_t c = 0; c < gw; ++c) {
          const int64_t x = qbox[0] + tf_nearest(tf_nearest(c, vw, gw), qbox[2] - qbox[0], vw);
          int64_t col = -1;
          if (x >= rbox[0] && x < rbox[2]) {
            col = tf_nearest(x - rbox[0], wr, rbox[2] - rbox[0]);
            if (rfp[b]) col = wr - 1 - col;
          }
          col_of[qfp[view] ? gw - 1 - c : c] = col;
        }
        for (int64_t r = 0; r < gh; ++r) {
          const int64_t y = qbox[1] + tf_nearest(tf_nearest(r, vh, gh), qbox[3] - qbox[1], vh);
          row_of[r] = y >= rbox[1] && y < rbox[3] ? tf_nearest(y - rbox[1], hr, rbox[3] - rbox[1]) : -1;
        }
      } else {
        const double step_x = (box[2] - box[0]) / gw, step_y = (box[3] - box[1]) / gh;
        const double scale_x = wr / (ref[2] - ref[0]), scale_y = hr / (ref[3] - ref[1]);
        for (int64_t c = 0; c < gw; ++c) {
          const double x = box[0] + (c + 0.5) * step_x;
          int64_t col = -1;
          if (x >= ref[0] && x < ref[2]) {
            col = std::clamp<int64_t>(static_cast<int64_t>(std::floor((x - ref[0]) * scale_x)), 0, wr - 1);
            if (rfp[b]) col = wr - 1 - col;
          }
          col_of[qfp[view] ? gw - 1 - c : c] = col;  // indexed by the column of the flipped grid
        }
        for (int64_t r = 0; r < gh; ++r) {
          const double y = box[1] + (r + 0.5) * step_y;
          row_of[r] = y >= ref[1] && y < ref[3]
                          ? std::clamp<int64_t>(static_cast<int64_t>(std::floor((y - ref[1]) * scale_y)), 0, hr - 1)
                          : -1;
        }
      }
      // Output (i, j) of torch.rot90(grid, turns) reads grid[r][c] of the flipped grid, with
      // r = r0 + i * ri + j * rj and c = c0 + i * ci + j * cj.
      static constexpr int64_t kSteps[4][4] = {{1, 0, 0, 1}, {0, 1, -1, 0}, {-1, 0, 0, -1}, {0, -1, 1, 0}};
      const int64_t ri = kSteps[turns][0], rj = kSteps[turns][1], ci = kSteps[turns][2], cj = kSteps[turns][3];
      const int64_t r0 = ri + rj < 0 ? gh - 1 : 0, c0 = ci + cj < 0 ? gw - 1 : 0;
      int64_t* target = outp + view * hq * wq;
      for (int64_t i = 0; i < hq; ++i) {
        for (int64_t j = 0; j < wq; ++j) {
          const int64_t row = row_of[r0 + i * ri + j * rj], col = col_of[c0 + i * ci + j * cj];
          target[i * wq + j] = row >= 0 && col >= 0 ? row * wr + col : ignore_index;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("relative_position_targets", &relative_position_targets_cpu);
}
