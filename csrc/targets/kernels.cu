// Relative-position targets on CUDA: one thread per query patch of the whole batch, in one
// launch. The arithmetic is the reference's (loca_kernels/targets/reference.py) in float64,
// with explicitly rounded operations (__dmul_rn, __dadd_rn, ...) so that nvcc cannot contract
// them into FMAs: results are identical to the reference element for element. Rule "scenic"
// (p.ph > 0): TF's float32 nearest-neighbour indices, rounded the same way (__fdiv_rn, ...).
#include "loca_kernels/targets.h"

namespace loca_kernels {
namespace {

// TF's nearest-neighbour input index (half-pixel centres, float32) of output index o for a side
// of n_in resized to n_out.
__device__ int64_t tf_nearest(int64_t o, int64_t n_in, int64_t n_out) {
  const float scale = __fdiv_rn(static_cast<float>(n_in), static_cast<float>(n_out));
  const int64_t index = static_cast<int64_t>(floorf(__fmul_rn(__fadd_rn(static_cast<float>(o), 0.5f), scale)));
  return index < n_in - 1 ? index : n_in - 1;
}

__global__ void targets_kernel(TargetsParams p) {
  const int64_t patches = p.hq * p.wq;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= p.batch * p.views * patches) return;
  const int64_t view = index / patches, lane = index % patches, b = view / p.views;
  const int64_t i = lane / p.wq, j = lane % p.wq;
  const int turns = p.query_rot90[view] & 3;
  const int64_t gh = turns % 2 == 0 ? p.hq : p.wq, gw = turns % 2 == 0 ? p.wq : p.hq;
  // Output (i, j) of torch.rot90(grid, turns) reads grid[r][c] of the flipped grid.
  int64_t r, c;
  switch (turns) {
    case 0: r = i; c = j; break;
    case 1: r = j; c = gw - 1 - i; break;
    case 2: r = gh - 1 - i; c = gw - 1 - j; break;
    default: r = gh - 1 - j; c = i; break;
  }
  if (p.query_flip[view]) c = gw - 1 - c;
  const double* box = p.query_boxes + view * 4;
  const double* ref = p.ref_boxes + b * 4;
  if (p.ph > 0) {
    // Integer boxes; the view's pixel size before turning is (vh, vw).
    const int64_t vh = turns % 2 == 0 ? p.ph : p.pw, vw = turns % 2 == 0 ? p.pw : p.ph;
    int64_t qbox[4], rbox[4];
    for (int k = 0; k < 4; ++k) {
      qbox[k] = static_cast<int64_t>(floor(box[k]));
      rbox[k] = static_cast<int64_t>(floor(ref[k]));
    }
    const int64_t x = qbox[0] + tf_nearest(tf_nearest(c, vw, gw), qbox[2] - qbox[0], vw);
    const int64_t y = qbox[1] + tf_nearest(tf_nearest(r, vh, gh), qbox[3] - qbox[1], vh);
    int64_t target = p.ignore_index;
    if (x >= rbox[0] && x < rbox[2] && y >= rbox[1] && y < rbox[3]) {
      int64_t col = tf_nearest(x - rbox[0], p.wr, rbox[2] - rbox[0]);
      if (p.ref_flip[b]) col = p.wr - 1 - col;
      target = tf_nearest(y - rbox[1], p.hr, rbox[3] - rbox[1]) * p.wr + col;
    }
    p.out[index] = target;
    return;
  }
  const double step_x = __ddiv_rn(__dsub_rn(box[2], box[0]), static_cast<double>(gw));
  const double step_y = __ddiv_rn(__dsub_rn(box[3], box[1]), static_cast<double>(gh));
  const double x = __dadd_rn(box[0], __dmul_rn(__dadd_rn(static_cast<double>(c), 0.5), step_x));
  const double y = __dadd_rn(box[1], __dmul_rn(__dadd_rn(static_cast<double>(r), 0.5), step_y));
  int64_t target = p.ignore_index;
  if (x >= ref[0] && x < ref[2] && y >= ref[1] && y < ref[3]) {
    const double scale_x = __ddiv_rn(static_cast<double>(p.wr), __dsub_rn(ref[2], ref[0]));
    const double scale_y = __ddiv_rn(static_cast<double>(p.hr), __dsub_rn(ref[3], ref[1]));
    int64_t col = static_cast<int64_t>(floor(__dmul_rn(__dsub_rn(x, ref[0]), scale_x)));
    int64_t row = static_cast<int64_t>(floor(__dmul_rn(__dsub_rn(y, ref[1]), scale_y)));
    col = col < 0 ? 0 : (col > p.wr - 1 ? p.wr - 1 : col);
    row = row < 0 ? 0 : (row > p.hr - 1 ? p.hr - 1 : row);
    if (p.ref_flip[b]) col = p.wr - 1 - col;
    target = row * p.wr + col;
  }
  p.out[index] = target;
}

}  // namespace

cudaError_t launch_relative_position_targets(const TargetsParams& params, cudaStream_t stream) {
  const int64_t total = params.batch * params.views * params.hq * params.wq;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  targets_kernel<<<blocks, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace loca_kernels
