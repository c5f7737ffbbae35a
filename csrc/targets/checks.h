// Argument checks of relative_position_targets (csrc/ops.cpp) shared by the CPU (cpu.cpp) and
// CUDA (bind_cuda.cpp) kernels. Both convert the small per-view inputs to one dtype first, so
// any real dtype is taken.
#pragma once

#include <ATen/ATen.h>

#include "loca_kernels/torch_checks.h"

namespace loca_kernels {

inline void check_targets_inputs(const ErrorPrefix& where, const at::Tensor& query_boxes, const at::Tensor& ref_boxes,
                                 at::IntArrayRef query_grid, at::IntArrayRef ref_grid, const at::Tensor& query_flip,
                                 const at::Tensor& ref_flip, const at::Tensor& query_rot90,
                                 at::OptionalIntArrayRef query_size) {
  TORCH_CHECK_VALUE(query_boxes.dim() == 3 && query_boxes.size(2) == 4, where,
                    ": query_boxes must be (B, V, 4), got ", query_boxes.sizes());
  const int64_t batch = query_boxes.size(0), views = query_boxes.size(1);
  TORCH_CHECK_VALUE(ref_boxes.sizes() == at::IntArrayRef({batch, 4}), where, ": ref_boxes must be (B, 4) = (", batch,
                    ", 4), got ", ref_boxes.sizes());
  TORCH_CHECK_VALUE(query_flip.sizes() == at::IntArrayRef({batch, views}) &&
                        query_rot90.sizes() == at::IntArrayRef({batch, views}) &&
                        ref_flip.sizes() == at::IntArrayRef({batch}),
                    where, ": query_flip and query_rot90 must be (B, V) = (", batch, ", ", views,
                    ") and ref_flip (B,), got ", query_flip.sizes(), ", ", query_rot90.sizes(), " and ",
                    ref_flip.sizes());
  for (const at::Tensor* t : {&ref_boxes, &query_flip, &ref_flip, &query_rot90})
    TORCH_CHECK_VALUE(t->device() == query_boxes.device(), where, ": every tensor must be on query_boxes' device ",
                      query_boxes.device(), ", got one on ", t->device());
  TORCH_CHECK_VALUE(query_grid.size() == 2 && ref_grid.size() == 2, where,
                    ": query_grid and ref_grid must be (rows, cols), got ", query_grid, " and ", ref_grid);
  TORCH_CHECK_VALUE(query_grid[0] > 0 && query_grid[1] > 0 && ref_grid[0] > 0 && ref_grid[1] > 0, where,
                    ": grids must have positive sides, got query_grid ", query_grid, " and ref_grid ", ref_grid);
  TORCH_CHECK_VALUE(!query_size.has_value() || (query_size->size() == 2 && (*query_size)[0] > 0 &&
                                                (*query_size)[1] > 0),
                    where, ": query_size must be None or (rows, cols) of positive pixels, got ",
                    query_size.has_value() ? c10::str(*query_size) : std::string("None"));
}

}  // namespace loca_kernels
